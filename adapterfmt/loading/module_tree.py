"""Find, replace and read modules and tensors of a torch model by path, for the loader.

Paths follow registered children only (``_modules``), never attribute fall-through, so a
:class:`~adapterfmt.layers.lora.LoraLayer`'s forwarded attributes cannot be mistaken for submodules.
The model's ``state_dict`` keys are parsed with :mod:`adapterfmt.checkpoint.keys` (prefix ``""``), never by
string surgery. This module imports torch only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..checkpoint.keys import KeyParts, Role, parse_wrapped, render_base
from ..errors import UnknownKeyError
from ..layers.full_copy import FullCopy
from ..layers.lora import LoraLayer

#: modules PEFT refuses to save in full (containers have no forward)
CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)
_BASE_ROLES = (Role.PLAIN, Role.BASE_LAYER, Role.ORIGINAL)


def find_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The module at ``path``, following registered children only (no attribute fall-through)."""
    module = model
    for seg in path.split(".") if path else []:
        module = module._modules.get(seg)
        if module is None:
            return None
    return module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (a non-empty path whose parent exists)."""
    parent_path, _, child = path.rpartition(".")
    parent = find_module(model, parent_path)
    setattr(parent, child, new)


def base_of(module: nn.Module) -> nn.Module:
    """The layer LoRA applies to: a LoraLayer's ``base_layer``, else ``module`` itself."""
    return module.base_layer if isinstance(module, LoraLayer) else module


def original_of(module: nn.Module) -> nn.Module:
    """The module a full copy stands for: a FullCopy's ``original_module``, else ``module`` itself."""
    return module.original_module if isinstance(module, FullCopy) else module


def set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the model's ``key`` (a frozen parameter where ``key`` is one, else a buffer)."""
    owner_path, _, leaf = key.rpartition(".")
    owner = find_module(model, owner_path)
    if leaf in owner._parameters:
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(owner, leaf, tensor)


def parse_model_key(key: str) -> Optional[KeyParts]:
    """A (possibly wrapped) model's ``state_dict`` key parsed by :mod:`adapterfmt.checkpoint.keys`, or ``None``."""
    try:
        return parse_wrapped(key, prefix="")
    except UnknownKeyError:
        return None


def base_view_keys(model: nn.Module) -> dict[str, str]:
    """Base key (``X.weight``) -> the model's own key for it (``X.base_layer.weight`` when wrapped)."""
    out: dict[str, str] = {}
    for key in model.state_dict(keep_vars=True):
        parts = parse_model_key(key)
        if parts is not None and parts.role in _BASE_ROLES:
            out.setdefault(render_base(parts), key)
        elif parts is None:
            out.setdefault(key, key)
    return out


def base_view(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their base keys, as if no adapter were applied."""
    state = model.state_dict(keep_vars=True)
    return {base: state[key] for base, key in base_view_keys(model).items()}
