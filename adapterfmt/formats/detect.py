"""Which adapter format a path holds, decided from file names and key names alone (FORMAT.md §10.4).

* a directory with ``adapter_config.json``: ``peft``;
* a ``.safetensors`` file (or a directory holding ``pytorch_lora_weights.safetensors``, or exactly
  one ``.safetensors`` file): ``kohya`` when its keys carry kohya prefixes (``lora_unet_``,
  ``lora_te_``, ...), ``diffusers`` when they carry component prefixes with PEFT LoRA roles
  (``unet.….lora_A.weight``) or diffusers' older spellings (``unet.….processor.to_q_lora.down.weight``,
  also with no prefix: the UNet's), ``wrapped`` for a whole ``PeftModel.state_dict()`` (§9);
  a file that mixes kohya and diffusers keys, or fits none, is refused.
"""

from __future__ import annotations

import os

from ..constants import ADAPTER_CONFIG_FILE
from ..errors import CheckpointNotFoundError, InconsistentAdapterError, UnknownKeyError
from ..header import read_header
from .diffusers_lora import DIFFUSERS_LORA_FILE, describe_diffusers, is_diffusers_lora_key
from .kohya import describe_kohya, is_kohya_key
from .records import ForeignCheckpoint

PEFT, KOHYA, DIFFUSERS, WRAPPED = "peft", "kohya", "diffusers", "wrapped"


def foreign_file(path: "str | os.PathLike[str]") -> str:
    """The ``.safetensors`` file a foreign-format path names.

    Raises:
        CheckpointNotFoundError: a directory with no such file, or with several and none named
            ``pytorch_lora_weights.safetensors``.
    """
    spec = os.fspath(path)
    if os.path.isfile(spec):
        return spec
    if not os.path.isdir(spec):
        raise CheckpointNotFoundError("does not exist", path=spec)
    default = os.path.join(spec, DIFFUSERS_LORA_FILE)
    if os.path.isfile(default):
        return default
    found = sorted(f for f in os.listdir(spec) if f.endswith(".safetensors"))
    if len(found) == 1:
        return os.path.join(spec, found[0])
    hint = f"it holds {found}; name the file" if found else "is this an adapter?"
    raise CheckpointNotFoundError(f"has no {ADAPTER_CONFIG_FILE} and no single LoRA .safetensors file", path=spec, hint=hint)


def _file_format(file: str) -> str:
    keys = list(read_header(file).tensors)
    kohya = sum(map(is_kohya_key, keys))
    diffusers = sum(map(is_diffusers_lora_key, keys))
    if kohya and diffusers:
        raise InconsistentAdapterError(
            f"mixes {kohya} kohya keys (lora_unet_…) and {diffusers} diffusers keys (unet.….lora_A…)", path=file, hint="split the file by format"
        )
    if kohya:
        return KOHYA
    if diffusers:
        return DIFFUSERS
    from ..wrapped import is_wrapped_checkpoint

    if is_wrapped_checkpoint(file):
        return WRAPPED
    raise UnknownKeyError(
        "is not an adapter file adapterfmt knows (PEFT, kohya/LyCORIS, diffusers LoRA, wrapped state dict)",
        path=file,
        key=keys[0] if keys else None,
        hint="see docs/FORMAT.md §10 for the grammars",
    )


def detect_format(path: "str | os.PathLike[str]") -> str:
    """``peft``, ``kohya``, ``diffusers`` or ``wrapped`` for a local path (headers only).

    A directory that holds neither ``adapter_config.json`` nor a foreign file is reported as
    ``peft``, so that the PEFT reader gives its own, more specific error (sub-adapters, ``.bin``)."""
    spec = os.fspath(path)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, ADAPTER_CONFIG_FILE)):
            return PEFT
        from ..wrapped import is_wrapped_checkpoint

        if not os.path.isfile(os.path.join(spec, DIFFUSERS_LORA_FILE)) and is_wrapped_checkpoint(spec):
            return WRAPPED
        try:
            file = foreign_file(spec)
        except CheckpointNotFoundError:
            return PEFT
        return _file_format(file)
    if not spec.endswith(".safetensors"):
        from ..wrapped import is_wrapped_checkpoint

        return WRAPPED if is_wrapped_checkpoint(spec) else PEFT  # pickles: the readers say what to do
    return _file_format(spec)


def read_foreign(path: "str | os.PathLike[str]") -> ForeignCheckpoint:
    """Read a kohya / LyCORIS or diffusers LoRA file (or a directory holding one), headers only.

    Raises:
        CheckpointNotFoundError, HeaderError: no readable file there.
        UnknownKeyError: the file is in neither format.
        InconsistentAdapterError: it mixes the two, or one module mixes two kinds.
    """
    file = foreign_file(path)
    fmt = _file_format(file)
    header = read_header(file)
    if fmt == KOHYA:
        return describe_kohya(header)
    if fmt == DIFFUSERS:
        return describe_diffusers(header)
    raise UnknownKeyError(f"is a {fmt} checkpoint, not a kohya or diffusers LoRA file", path=file, hint="use read_adapter / read_wrapped")
