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
from typing import Optional, Sequence

from ..constants import ADAPTER_CONFIG_FILE, PEFT_PREFIX
from ..errors import CheckpointNotFoundError, InconsistentAdapterError, UnknownKeyError
from ..storage.header import SafetensorsHeader, read_header
from ..storage.scalars import ScalarReader, read_scalar
from .diffusion.comfy import describe_comfy, describe_xlabs, is_comfy_key, is_xlabs_key
from .diffusion.diffusers_lora import DIFFUSERS_LORA_FILE, describe_diffusers, is_diffusers_lora_key
from .diffusion.kohya import describe_kohya, is_kohya_key
from .diffusion.records import ForeignCheckpoint

PEFT, KOHYA, DIFFUSERS, WRAPPED, COMFYUI, XLABS = "peft", "kohya", "diffusers", "wrapped", "comfyui", "xlabs"


def foreign_file(path: "str | os.PathLike[str]", *, weight_name: Optional[str] = None) -> str:
    """The ``.safetensors`` file a foreign-format path names: the path itself, ``path/weight_name``,
    or the file :func:`choose_foreign_file` picks from the folder's files.

    Raises:
        CheckpointNotFoundError: a directory with no such file, or with several and none named
            ``pytorch_lora_weights.safetensors``.
    """
    spec = os.fspath(path)
    if weight_name is not None:
        from ..sources.paths import safe_join

        file = safe_join(spec, weight_name, what="weight file")
        if not os.path.isfile(file):
            raise CheckpointNotFoundError("no such file", path=file, hint=f"the folder holds {_safetensors_in(spec)}")
        return file
    if os.path.isfile(spec):
        return spec
    if not os.path.isdir(spec):
        raise CheckpointNotFoundError("does not exist", path=spec)
    chosen = choose_foreign_file(_safetensors_in(spec), where=spec)
    if chosen is None:
        raise CheckpointNotFoundError(f"has no {ADAPTER_CONFIG_FILE} and no LoRA .safetensors file", path=spec, hint="is this an adapter?")
    return os.path.join(spec, chosen)


def _safetensors_in(directory: str) -> list[str]:
    try:
        return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors") and os.path.isfile(os.path.join(directory, f)))
    except OSError:
        return []


def choose_foreign_file(names: Sequence[str], *, where: str) -> Optional[str]:
    """Which of a folder's ``.safetensors`` file names (a local folder or a Hub repo's, FORMAT §10.4)
    is its adapter file: ``pytorch_lora_weights.safetensors`` (diffusers' name), else the only one;
    ``None`` when there is none.

    Raises:
        CheckpointNotFoundError: several, none of them diffusers' name; the message names them
            and how to choose one.
    """
    found = sorted(n for n in names if n.endswith(".safetensors"))
    if DIFFUSERS_LORA_FILE in found:
        return DIFFUSERS_LORA_FILE
    if len(found) <= 1:
        return found[0] if found else None
    raise CheckpointNotFoundError(
        f"has no {ADAPTER_CONFIG_FILE} and {len(found)} .safetensors files ({', '.join(found)}), none named {DIFFUSERS_LORA_FILE}",
        path=where,
        hint=f"choose the LoRA file with --weight-name NAME (weight_name= in Python), e.g. --weight-name {found[0]}; a PEFT adapter has {ADAPTER_CONFIG_FILE}",
    )


def header_format(header: SafetensorsHeader) -> str:
    """``kohya``, ``diffusers``, ``comfyui``, ``xlabs`` or ``wrapped`` from a safetensors header's keys
    (FORMAT §10.4; the ComfyUI and XLabs grammars: BEHAVIOUR §7.6).

    Raises:
        InconsistentAdapterError: kohya and diffusers keys mixed.
        UnknownKeyError: the keys fit no format adapterfmt knows.
    """
    file, keys = header.path, list(header.tensors)
    if keys and any(map(is_xlabs_key, keys)) and all(is_xlabs_key(k) or is_comfy_key(k) for k in keys):
        return XLABS  # [diffusion_model.]double_blocks.N.processor.qkv_lora1.down.weight (before ComfyUI: the prefix is shared)
    if keys and sum(map(is_comfy_key, keys)) > len(keys) // 2:
        return COMFYUI  # diffusion_model.<module>.lora_A.weight; keys that fit no rule are reported by the reader
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
    from .wrapped.files import is_wrapped_header

    if is_wrapped_header(header):
        return WRAPPED
    _refuse_peft_weights_alone(header)
    raise UnknownKeyError(
        f"is not an adapter file adapterfmt knows (PEFT, kohya/LyCORIS, diffusers LoRA, wrapped state dict): "
        f"none of its {len(keys)} tensors is named as one of their adapter tensors" + (f" (the first: {keys[0]!r})" if keys else ""),
        path=file,
        hint="is it a model's weights rather than an adapter? see docs/FORMAT.md §10 for the grammars",
    )


def _refuse_peft_weights_alone(header: SafetensorsHeader) -> None:
    """A PEFT adapter's weights found without the config that PEFT saves beside them (its keys
    are PEFT's saved names: ``base_model.model.`` and a method's tensor names, FORMAT §3): name
    the missing ``adapter_config.json`` rather than any key.

    Raises:
        CheckpointNotFoundError: the file holds PEFT tensors and no config is beside it.
    """
    from ..checkpoint.methods import methods_of

    keys = list(header.tensors)
    named = sum(methods_of(key) is not None for key in keys)
    if not named and not (keys and all(k.startswith(PEFT_PREFIX) for k in keys)):
        return
    folder = os.path.dirname(os.path.abspath(header.path))
    raise CheckpointNotFoundError(
        f"has no {ADAPTER_CONFIG_FILE} beside {os.path.basename(header.path)}, whose {len(keys)} tensors are named as PEFT saves an adapter's",
        path=folder,
        hint=f"copy the adapter's {ADAPTER_CONFIG_FILE} (PEFT's save_pretrained writes it with the weights) into this folder",
    )


def detect_format(path: "str | os.PathLike[str]") -> str:
    """``peft``, ``kohya``, ``diffusers`` or ``wrapped`` for a local path (headers only).

    A directory that holds neither ``adapter_config.json`` nor a ``.safetensors`` file is reported
    as ``peft``, so that the PEFT reader gives its own, more specific error (sub-adapters, ``.bin``).

    Raises:
        CheckpointNotFoundError: a directory with several ``.safetensors`` files and no rule to
            choose one (:func:`choose_foreign_file`).
    """
    spec = os.fspath(path)
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, ADAPTER_CONFIG_FILE)):
            return PEFT
        from .wrapped.reading import is_wrapped_checkpoint

        if not os.path.isfile(os.path.join(spec, DIFFUSERS_LORA_FILE)) and is_wrapped_checkpoint(spec):
            return WRAPPED
        chosen = choose_foreign_file(_safetensors_in(spec), where=spec)
        return PEFT if chosen is None else header_format(read_header(os.path.join(spec, chosen)))
    if not spec.endswith(".safetensors"):
        from .wrapped.reading import is_wrapped_checkpoint

        return WRAPPED if is_wrapped_checkpoint(spec) else PEFT  # pickles: the readers say what to do
    return header_format(read_header(spec))


def read_foreign(path: "str | os.PathLike[str]", *, weight_name: Optional[str] = None) -> ForeignCheckpoint:
    """Read a kohya / LyCORIS or diffusers LoRA file (or a directory holding one), headers only.

    Raises:
        CheckpointNotFoundError, HeaderError: no readable file there.
        UnknownKeyError: the file is in neither format.
        InconsistentAdapterError: it mixes the two, or one module mixes two kinds.
    """
    return describe_foreign(read_header(foreign_file(path, weight_name=weight_name)))


def describe_foreign(header: SafetensorsHeader, scalar: ScalarReader = read_scalar) -> ForeignCheckpoint:
    """The records of a kohya / LyCORIS or diffusers LoRA file from its header; ``scalar`` reads
    each ``alpha`` (from the local file, or prefetched by range request for a Hub file).

    Raises:
        UnknownKeyError: the file is in neither format (a wrapped state dict included).
        InconsistentAdapterError: it mixes the two, or one module mixes two kinds.
    """
    fmt = header_format(header)
    if fmt == KOHYA:
        return describe_kohya(header, scalar)
    if fmt == DIFFUSERS:
        return describe_diffusers(header, scalar)
    if fmt == COMFYUI:
        return describe_comfy(header, scalar)
    if fmt == XLABS:
        return describe_xlabs(header, scalar)
    raise UnknownKeyError(f"is a {fmt} checkpoint, not a kohya or diffusers LoRA file", path=header.path, hint="use read_adapter / read_wrapped")
