"""Write an adapter on a model back in PEFT's layout: :func:`save` and :func:`adapter_state_dict`.

Keys are rendered through :mod:`adapterfmt.keys` from the model's ``state_dict`` keys, with the
``prefix_map`` applied at load undone, so the files load in PEFT and in :func:`~adapterfmt.load`
alike. This module imports torch and safetensors only.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from .adapter_state import ModelLike, adapter_info, as_model, get_registry
from .constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, DEFAULT_ADAPTER_NAME, PEFT_PREFIX
from .errors import OutputPathError
from .keys import LORA_ROLES, Role, parse_saved, render_saved
from .matching import undo_prefix_map
from .module_tree import parse_model_key


def save(model: ModelLike, path: "str | os.PathLike[str]", adapter_name: Optional[str] = None) -> None:
    """Write every adapter on the model (or one) in PEFT's layout, as ``PeftModel.save_pretrained`` does.

    Keys are PEFT's saved keys (``base_model.model.X.lora_A.weight``, full copies under the
    module's own path), rendered through :mod:`adapterfmt.keys`; tensors that share storage are
    cloned and the file carries ``{"format": "pt"}`` metadata. The adapter ``default`` goes into
    ``path``, any other adapter ``X`` into ``path/X/``, as ``PeftModel.save_pretrained`` does.
    Files are written to a temporary name and renamed into place.

    Args:
        model: a model with adapters (from :func:`~adapterfmt.load` or :func:`~adapterfmt.wrap`), or its handle.
        path: the output directory (created if needed).
        adapter_name (`str` or `None`, *optional*, defaults to `None`): `None` writes every
            adapter on the model (``save_pretrained``'s ``selected_adapters=None``); a name writes
            only that one (still ``path`` for ``default``, ``path/<name>/`` otherwise).

    Raises:
        ValueError: the model has no adapter of that name.
        OutputPathError: ``path`` (or a sub-adapter folder) exists and is not a directory.
    """
    model = as_model(model)
    registry = get_registry(model)
    names = list(registry.adapters) if adapter_name is None else [adapter_name]
    for name in names:
        info = adapter_info(registry, name)
        target = os.fspath(path) if name == DEFAULT_ADAPTER_NAME else os.path.join(os.fspath(path), name)
        if os.path.exists(target) and not os.path.isdir(target):
            raise OutputPathError("exists and is not a directory", path=target, hint="choose another output path")
        os.makedirs(target, exist_ok=True)
        tensors = _unshare(adapter_state_dict(model, name))
        config = dict(info.config)
        config["peft_type"] = "LORA"
        config["inference_mode"] = True
        _atomic_write(target, ADAPTER_SAFETENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        text = json.dumps(config, indent=2, sort_keys=True)
        _atomic_write(target, ADAPTER_CONFIG_FILE, lambda tmp: _write_text(tmp, text))


def adapter_state_dict(model: ModelLike, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The tensors :func:`save` writes for ``adapter_name``, under PEFT's saved keys (``base_model.model.`` prefix)."""
    model = as_model(model)
    info = adapter_info(get_registry(model), adapter_name)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = parse_model_key(key)
        if parts is None or parts.adapter != adapter_name or not (parts.role in LORA_ROLES or parts.role is Role.FULL_COPY):
            continue
        saved = replace(parts, module=undo_prefix_map(parts.module, info.prefix_map))
        out[render_saved(saved, prefix=PEFT_PREFIX)] = value
    for saved_key, model_key in info.overrides.items():
        out[render_saved(parse_saved(saved_key), prefix=PEFT_PREFIX)] = state[model_key]
    return out


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; a later name sharing storage with an earlier one gets a clone."""
    seen: set[tuple[str, int]] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach()
        storage = (str(t.device), t.untyped_storage().data_ptr())
        if storage in seen:
            t = t.clone()
        seen.add(storage)
        out[key] = t.contiguous().cpu()
    return out


def _atomic_write(directory: str, name: str, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, os.path.join(directory, name))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


__all__ = ["adapter_state_dict", "save"]
