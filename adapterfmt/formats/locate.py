"""Which foreign adapter a path or Hub id names, and where its bytes are (docs/BEHAVIOUR.md §7.5).

``inspect``, ``check``, ``merge``, ``convert --to peft`` and ``adapterfmt.load`` ask
:func:`locate_foreign` the same question: is this a kohya / LyCORIS or diffusers LoRA file, or a
PEFT LoHa / LoKr directory (read by :mod:`adapterfmt.formats`), or something else (a PEFT LoRA
adapter, a wrapped state dict: ``None``, the caller's own reader)? A Hub repo is judged from its
file listing exactly as a local folder from its files: ``adapter_config.json`` makes it PEFT;
otherwise the file is ``weight_name`` when given, else :func:`~adapterfmt.formats.detect.choose_foreign_file`'s
(``pytorch_lora_weights.safetensors``, else the only ``.safetensors`` file; several are an
error naming them). ``subfolder`` is a folder inside the path or repo, as in diffusers'
``load_lora_weights(..., subfolder=, weight_name=)``.

Header-only callers leave a Hub file where it is (:class:`ForeignSource.remote`: header and
``alpha`` scalars by range request, :mod:`adapterfmt.sources.hub_files`); callers that read tensors pass
``download=True`` and get the file from huggingface_hub's cache. With ``HF_HUB_OFFLINE`` set, the
repo's cached snapshot is read as a local folder (the rule then sees the files in the cache).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..constants import ADAPTER_CONFIG_FILE
from ..errors import CheckpointNotFoundError, UnknownKeyError
from ..sources.paths import ADAPTER_PATTERNS, looks_like_hub_id, resolve_dir
from ..storage.header import SafetensorsHeader, read_header
from .detect import COMFYUI, DIFFUSERS, KOHYA, PEFT, WRAPPED, XLABS, choose_foreign_file, describe_foreign, detect_format, foreign_file, header_format
from .diffusion.records import ForeignCheckpoint
from .peft.lycoris import PEFT_LYCORIS_TYPES, peft_lycoris_type, read_peft_lycoris

if TYPE_CHECKING:
    from ..sources.hub_files import RemoteFile


@dataclass(frozen=True)
class ForeignSource:
    """A foreign adapter found: ``format`` ``kohya`` / ``diffusers`` (a file) or ``peft`` (a PEFT
    LoHa / LoKr directory), ``path`` the local file or directory (a Hub file read in place: its
    ``hf://`` location, with ``remote`` and its ``header``)."""

    format: str
    path: str
    remote: Optional[RemoteFile] = None
    header: Optional[SafetensorsHeader] = None

    def read(self) -> ForeignCheckpoint:
        """The adapter's records, headers only (a Hub file's ``alpha`` scalars by range request)."""
        if self.format == PEFT:
            return read_peft_lycoris(self.path)
        header = self.header if self.header is not None else read_header(self.path)
        if self.remote is None:
            return describe_foreign(header)
        from ..storage.scalars import prefetched_scalars

        return describe_foreign(header, prefetched_scalars(header.tensors.values(), self.remote.read_ranges))


def locate_foreign(
    spec: "str | os.PathLike[str]",
    *,
    subfolder: Optional[str] = None,
    weight_name: Optional[str] = None,
    revision: Optional[str] = None,
    download: bool = False,
) -> Optional[ForeignSource]:
    """The foreign adapter ``spec`` names (a local file or folder, or a Hub repo id), or ``None``
    when it names something else (a PEFT LoRA adapter, a wrapped state dict, nothing).

    Args:
        subfolder: a folder inside the folder or repo.
        weight_name: the file inside it (``--weight-name``), instead of the rule.
        revision: Hub revision (branch, tag or commit); ignored for a local path.
        download: for a Hub file, download it through the cache (merge, load, convert) instead of
            reading its header by range request.

    Raises:
        CheckpointNotFoundError: ``weight_name`` is not there; several ``.safetensors`` files and
            no rule to choose one; the Hub repo, revision or file cannot be fetched (offline and
            not cached, not found, gated).
        UnknownKeyError: ``weight_name`` (or the Hub repo's file) is no kohya / diffusers file.
    """
    spec = os.fspath(spec)
    if os.path.exists(spec):
        return _local(spec, subfolder, weight_name)
    if not looks_like_hub_id(spec):
        return None  # the caller's reader says what is missing
    from ..sources.hub_base import cached_snapshot, is_offline

    if is_offline():
        return _local(cached_snapshot(spec, revision=revision, what="adapter path"), subfolder, weight_name)
    return _hub(spec, subfolder, weight_name, revision, download)


def _local(path: str, subfolder: Optional[str], weight_name: Optional[str]) -> Optional[ForeignSource]:
    folder = os.path.join(path, subfolder) if subfolder else path
    if weight_name is not None:
        return _file_source(foreign_file(folder, weight_name=weight_name))
    if os.path.isdir(folder):
        if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_FILE)):
            return ForeignSource(PEFT, folder) if peft_lycoris_type(folder) else None
        if detect_format(folder) not in (KOHYA, DIFFUSERS, COMFYUI, XLABS):  # wrapped, or no adapter file: the caller's reader
            return None
        return _file_source(foreign_file(folder))
    if not os.path.isfile(folder) or not folder.endswith(".safetensors"):
        return None
    header = read_header(folder)
    return None if header_format(header) == WRAPPED else _file_source(folder, header)


def _file_source(file: str, header: Optional[SafetensorsHeader] = None, remote: Optional[RemoteFile] = None) -> ForeignSource:
    """A file chosen or named: kohya or diffusers; anything else is refused (UnknownKeyError)."""
    header = header if header is not None else read_header(file)
    fmt = header_format(header)
    if fmt == WRAPPED:
        raise UnknownKeyError(
            "is a wrapped PeftModel.state_dict() checkpoint, not a kohya or diffusers LoRA file",
            path=header.path,
            hint="give the local file or folder itself (adapterfmt reads wrapped checkpoints from local paths)",
        )
    return ForeignSource(fmt, header.path, remote=remote, header=header)


def _hub(repo: str, subfolder: Optional[str], weight_name: Optional[str], revision: Optional[str], download: bool) -> Optional[ForeignSource]:
    from ..sources import hub_files
    from ..sources.hub_base import remote_tree

    tree, sha = remote_tree(repo, revision=revision, what="adapter path")
    folder = (subfolder or "").strip("/")
    config = posixpath.join(folder, ADAPTER_CONFIG_FILE)
    if weight_name is None and tree.is_file(config):
        if _peft_type(tree.read_bytes(config)) not in PEFT_LYCORIS_TYPES:
            return None  # PEFT LoRA: read_adapter fetches it
        return ForeignSource(PEFT, resolve_dir(repo, patterns=ADAPTER_PATTERNS, subfolder=subfolder, revision=revision))
    if weight_name is not None:
        rel = posixpath.normpath(posixpath.join(folder, weight_name.replace("\\", "/")))
        if rel.startswith(("../", "/")) or rel == "..":
            raise CheckpointNotFoundError("points outside the repo", path=f"{repo}/{weight_name}", hint="give a file name inside the repo")
        if not tree.is_file(rel):
            found = [n for n in tree.names(folder) if n.endswith(".safetensors")]
            raise CheckpointNotFoundError(
                "no such file in the Hub repo", path=f"{repo}/{rel}" + (f"@{revision}" if revision else ""), hint=f"it holds {found or 'no .safetensors file'}"
            )
    else:
        chosen = choose_foreign_file(tree.names(folder), where=f"{repo}/{folder}".rstrip("/") + (f"@{revision}" if revision else ""))
        if chosen is None:
            return None  # no adapter file: read_adapter says what is missing
        rel = posixpath.join(folder, chosen)
    if download:
        return _file_source(hub_files.download_file(repo, rel, revision))
    remote = hub_files.RemoteFile(repo, rel, sha)
    cached = hub_files.cached_file(remote)
    if cached is not None:  # already in the cache at this commit: read it there
        return _file_source(cached)
    return _file_source(remote.location, remote.read_header(), remote)


def _peft_type(raw: bytes) -> Optional[str]:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None  # read_adapter reports the broken config
    return str(doc.get("peft_type", "")).upper() if isinstance(doc, dict) else None


__all__ = ["ForeignSource", "locate_foreign"]
