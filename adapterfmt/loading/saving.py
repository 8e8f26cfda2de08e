"""Write an adapter on a model back in PEFT's layout: :func:`save` and :func:`adapter_state_dict`.

Keys are rendered through :mod:`adapterfmt.checkpoint.keys` from the model's ``state_dict`` keys, with the
``prefix_map`` applied at load undone, so the files load in PEFT and in :func:`~adapterfmt.load`
alike. This module imports torch and safetensors only.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import save_file

from ..checkpoint.keys import LORA_ROLES, Role, parse_saved, render_saved
from ..checkpoint.matching import undo_prefix_map
from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, DEFAULT_ADAPTER_NAME, PEFT_PREFIX
from ..errors import OutputPathError, UnsupportedFeatureError
from ..layers.adalora import AdaLoraLinear
from ..layers.full_copy import iter_wrappers
from ..layers.lycoris import FactorLayer
from ..storage.pause import pause_point
from ..storage.staging import StagedDirectory, clean_stale, write_text
from .adapters import ModelLike, adapter_info, as_model, get_registry
from .module_tree import find_module, parse_model_key


def save(model: ModelLike, path: "str | os.PathLike[str]", adapter_name: Optional[str] = None) -> None:
    """Write every adapter on the model (or one) in PEFT's layout, as ``PeftModel.save_pretrained`` does.

    Keys are PEFT's saved keys (``base_model.model.X.lora_A.weight``, full copies under the
    module's own path), rendered through :mod:`adapterfmt.checkpoint.keys`; tensors that share storage are
    cloned and the file carries ``{"format": "pt"}`` metadata. The adapter ``default`` goes into
    ``path``, any other adapter ``X`` into ``path/X/``, as ``PeftModel.save_pretrained`` does.
    The directory is staged beside ``path`` and renamed into place once, complete and fsynced;
    other files already in ``path`` are kept.

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
    files: dict[str, tuple[dict[str, torch.Tensor], str]] = {}
    root = os.path.realpath(os.fspath(path))
    for name in names:
        info = adapter_info(registry, name)
        sub = "" if name == DEFAULT_ADAPTER_NAME else name
        target = os.path.join(root, sub) if sub else root
        if os.path.exists(target) and not os.path.isdir(target):
            raise OutputPathError("exists and is not a directory", path=target, hint="choose another output path")
        config = dict(info.config)
        config["peft_type"] = str(config.get("peft_type") or "LORA").upper()  # LORA, ADALORA, LOHA or LOKR as loaded
        _refuse_lora_config_for_factors(model, name, config["peft_type"])
        config["inference_mode"] = True
        files[sub] = (_unshare(adapter_state_dict(model, name)), json.dumps(config, indent=2, sort_keys=True))
    _write_adapters(root, files)


def _write_adapters(root: str, files: "dict[str, tuple[dict[str, torch.Tensor], str]]") -> None:
    """Write every adapter's two files under ``root`` (sub-folder -> tensors, config text) at once.

    Through :mod:`adapterfmt.storage.staging`: the directory is staged beside ``root`` with the files it
    already holds, fsynced and swapped in by one rename, so a crash leaves the old directory (or
    none), never a config without its weights.
    """
    if os.path.exists(root) and not os.path.isdir(root):
        raise OutputPathError("exists and is not a directory", path=root, hint="choose another output path")
    clean_stale(root)
    with StagedDirectory(root, overwrite=True, keep_existing=True) as staged:
        for sub, (tensors, config_text) in files.items():
            save_file(tensors, staged.file(os.path.join(sub, ADAPTER_SAFETENSORS_FILE)), metadata={"format": "pt"})
            write_text(staged.file(os.path.join(sub, ADAPTER_CONFIG_FILE)), config_text)
        pause_point("files")
        staged.commit()


def adapter_state_dict(model: ModelLike, adapter_name: str = DEFAULT_ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The tensors :func:`save` writes for ``adapter_name``, under PEFT's saved keys (``base_model.model.`` prefix)."""
    model = as_model(model)
    info = adapter_info(get_registry(model), adapter_name)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = parse_model_key(key)
        if parts is None or parts.adapter != adapter_name or not (parts.role in LORA_ROLES or parts.role in (Role.FULL_COPY, Role.TOKENS_DELTA)):
            continue
        if parts.role is Role.TOKENS_DELTA and getattr(find_module(model, parts.module), "tied", False):
            continue  # a tied head's rows are the embedding's (PEFT saves them once)
        saved = parts._replace(module=undo_prefix_map(parts.module, info.prefix_map))
        out[render_saved(saved, prefix=PEFT_PREFIX)] = value
    for saved_key, model_key in info.overrides.items():
        out[render_saved(parse_saved(saved_key), prefix=PEFT_PREFIX)] = state[model_key]
    for path, w in iter_wrappers(model):  # ParameterDict entries, saved as X.<slot> (adapter name dropped)
        module = undo_prefix_map(path, info.prefix_map)
        if isinstance(w, AdaLoraLinear) and adapter_name in w.lora_A:
            for slot in ("lora_A", "lora_B", "lora_E"):
                out[f"{PEFT_PREFIX}{module}.{slot}"] = getattr(w, slot)[adapter_name]
        elif isinstance(w, FactorLayer):  # LoHa / LoKr: X.hada_w1_a, X.lokr_w1, ...
            for slot, tensor in w.factors(adapter_name).items():
                out[f"{PEFT_PREFIX}{module}.{slot}"] = tensor
    return out


def _refuse_lora_config_for_factors(model: torch.nn.Module, name: str, peft_type: str) -> None:
    """A LoHa / LoKr adapter loaded from a kohya / LyCORIS file has no PEFT config to write back."""
    if peft_type in ("LOHA", "LOKR"):
        return
    for path, w in iter_wrappers(model):
        if isinstance(w, FactorLayer) and name in w.scaling:
            raise UnsupportedFeatureError(
                f"adapter '{name}' has {w.kind} modules loaded from a kohya / LyCORIS file, which has no PEFT config to save",
                key=path, hint="write it as a PEFT adapter with `adapterfmt convert FILE --to peft --base DIR`",
            )


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


__all__ = ["adapter_state_dict", "save"]
