"""Where a wrapped ``PeftModel.state_dict()`` save keeps its weights, and whether a path is one.

:func:`locate_wrapped` finds the weight files (one safetensors file, shards with an index, or one
pickle) without reading them; :func:`is_wrapped_checkpoint` answers from headers alone (a
pickle's key names are sniffed with :mod:`pickletools`, nothing is unpickled).
"""

from __future__ import annotations

import json
import os
import pickletools
import zipfile
from dataclasses import dataclass
from typing import Any, Optional

from ...checkpoint.keys import LORA_ROLES, Role, parse_wrapped
from ...constants import ADAPTER_CONFIG_FILE, SAFETENSORS_INDEX_FILE, SAFETENSORS_WEIGHTS_FILE
from ...errors import CheckpointNotFoundError, UnknownKeyError
from ...storage.header import SafetensorsHeader, read_header

__all__ = ["ADAPTER_ROLES", "PICKLE_SUFFIXES", "PICKLE_WEIGHTS_FILE", "WrappedFiles", "is_wrapped_checkpoint", "is_wrapped_header", "locate_wrapped"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
#: The pickle a directory is read from when it holds several (trainer dirs add optimizer.pt ...).
PICKLE_WEIGHTS_FILE = "pytorch_model.bin"
#: Roles whose wrapped key carries an adapter name: the adapter's own tensors.
ADAPTER_ROLES = LORA_ROLES | {Role.FULL_COPY, Role.TOKENS_DELTA}
#: A ``data.pkl`` larger than this is not sniffed for key names.
_MAX_PICKLE_INDEX = 64 << 20


@dataclass(frozen=True)
class WrappedFiles:
    """Where a wrapped state dict's weights are: its directory, its files (or an index), the storage kind."""

    directory: str
    files: list[str]
    storage: str
    index: Optional[str] = None


def locate_wrapped(path: str) -> WrappedFiles:
    """The weight files of a wrapped checkpoint at ``path`` (file or directory), without reading them."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG_FILE)):
            raise CheckpointNotFoundError(
                f"is a PEFT adapter directory (it has {ADAPTER_CONFIG_FILE}), not a wrapped state dict",
                path=path,
                hint="read it as an adapter",
            )
        index = os.path.join(path, SAFETENSORS_INDEX_FILE)
        if os.path.isfile(index):
            return WrappedFiles(path, [], "safetensors-sharded", index)
        names = sorted(os.listdir(path))
        single = [n for n in names if n == SAFETENSORS_WEIGHTS_FILE] or [n for n in names if n.endswith(".safetensors")]
        if len(single) == 1:
            return WrappedFiles(path, [os.path.join(path, single[0])], "safetensors")
        pickles = [n for n in names if n == PICKLE_WEIGHTS_FILE] or [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if not single and len(pickles) == 1:
            return WrappedFiles(path, [os.path.join(path, pickles[0])], "pickle")
        found = single or pickles
        raise CheckpointNotFoundError(
            f"holds {len(found) or 'no'} weight files{' (' + ', '.join(found[:5]) + ')' if found else ''}",
            path=path,
            hint=f"name the state-dict file itself, or give a directory with one file or a {SAFETENSORS_INDEX_FILE}",
        )
    if not os.path.isfile(path):
        raise CheckpointNotFoundError("no such file or directory", path=path)
    directory = os.path.dirname(path) or "."
    if os.path.basename(path) == SAFETENSORS_INDEX_FILE:
        return WrappedFiles(directory, [], "safetensors-sharded", path)
    if path.endswith(".safetensors"):
        return WrappedFiles(directory, [path], "safetensors")
    if path.endswith(PICKLE_SUFFIXES):
        return WrappedFiles(directory, [path], "pickle")
    raise CheckpointNotFoundError(
        "is not a .safetensors, index .json or pickle (.bin/.pt/.pth) file", path=path, hint="name the state-dict file"
    )


def _pickle_key_names(path: str) -> list[str]:
    """Strings in a ``torch.save`` zip's ``data.pkl``, read with :mod:`pickletools` (nothing is executed).

    Lets :func:`is_wrapped_checkpoint` recognise a pickle without unpickling it; an old
    non-zip pickle gives ``[]``.
    """
    try:
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
            if len(members) != 1 or members[0].file_size > _MAX_PICKLE_INDEX:
                return []
            data = z.read(members[0])
        return [arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str) and "UNICODE" in op.name]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):  # damaged or exotic zip / pickle
        return []


def is_wrapped_header(header: SafetensorsHeader) -> bool:
    """Whether one safetensors header (a local file's or a Hub file's) is a wrapped state dict's."""
    return _has_adapter_key(header.tensors)


def _has_adapter_key(keys: "list[str] | Any") -> bool:
    for key in keys:
        try:
            parts = parse_wrapped(key)
        except UnknownKeyError:
            continue
        if parts.role in ADAPTER_ROLES and parts.adapter:
            return True
    return False


def is_wrapped_checkpoint(path: "str | os.PathLike[str]") -> bool:
    """Whether ``path`` is a local wrapped state dict: some key carries an adapter name
    (``….lora_A.<name>.weight``, ``….modules_to_save.<name>.…``).

    Reads headers only (a pickle's key names are sniffed with :mod:`pickletools`, nothing is
    unpickled); never raises for a path that is something else, and never touches the network.
    """
    spec = os.fspath(path)
    if not os.path.exists(spec):
        return False
    try:
        loc = locate_wrapped(spec)
        if loc.index is not None:
            with open(loc.index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            return isinstance(weight_map, dict) and _has_adapter_key(weight_map)
        if loc.storage == "pickle":
            return _has_adapter_key(_pickle_key_names(loc.files[0]))
        return is_wrapped_header(read_header(loc.files[0]))
    except (OSError, ValueError, AttributeError, CheckpointNotFoundError):
        return False
