"""Put an adapter's parameter LoRAs (``target_parameters``) on a model, as PEFT does (FORMAT.md §3.9;
used by :func:`adapterfmt.load`).

For each module that owns targeted parameters, the parameters the config names are wrapped in
:class:`~adapterfmt.layers.params.ParamLora`, nested in the module's registration order (the first
registered innermost, as PEFT nests them), so a saved ``M.base_layer.lora_A.weight`` lands on the
same parameter PEFT gives it. ``r`` and scaling are looked up on the parameter key. Shapes are
checked before the module is replaced; replaced modules go to ``created`` so a failed load is
undone. This module imports torch only.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..checkpoint.matching import apply_prefix_map
from ..checkpoint.param_targets import ParamTarget, param_target, rank_and_scaling
from ..checkpoint.records import AdapterCheckpoint, LoraModule
from ..errors import NonFiniteValuesError, ShapeMismatchError, UnresolvedModulesError
from ..layers.params import ParamLora
from ..reports.scan import count_non_finite
from ..storage.tensor_source import TensorReader
from .module_tree import find_module, replace_module


def is_param_lora(ckpt: AdapterCheckpoint, saved_path: str) -> bool:
    return param_target(ckpt.config, saved_path) is not None


def load_param_loras(
    model: nn.Module,
    ckpt: AdapterCheckpoint,
    name: str,
    prefix_map: Mapping[str, str],
    active: Sequence[str],
    created: list[tuple[str, nn.Module]],
) -> None:
    """Wrap every targeted parameter the checkpoint has LoRA for and load the factors under ``name``."""
    groups: dict[str, dict[int, tuple[ParamTarget, LoraModule]]] = {}
    for saved_path, m in ckpt.lora.items():
        target = param_target(ckpt.config, saved_path)
        if target is not None:
            groups.setdefault(apply_prefix_map(target.owner, prefix_map), {})[target.depth] = (target, m)
    planned = []
    for owner_path, by_depth in groups.items():
        module = find_module(model, owner_path)
        if module is None:
            saved = [m.path for _, m in by_depth.values()]
            raise UnresolvedModulesError(
                f"parameter LoRA on '{owner_path}' matches no module of the model", unresolved=saved, path=ckpt.weights_file, key=saved[0]
            )
        chain = _chain(module) if isinstance(module, ParamLora) else None
        owner = chain[-1].owner if chain else module
        candidates = next(iter(by_depth.values()))[0].candidates
        params = [w.parameter_name for w in reversed(chain)] if chain else [p for p, _ in owner.named_parameters(recurse=False) if p in candidates]
        for depth, (target, m) in by_depth.items():
            if depth >= len(params):
                raise UnresolvedModulesError(
                    f"'{m.path}' is wrapper {depth + 1} of '{owner_path}', which has {len(params)} targeted parameter(s)",
                    unresolved=[m.path],
                    path=ckpt.weights_file,
                    key=m.keys.get("lora_A"),
                )
            param = params[len(params) - 1 - depth]
            _check(ckpt, m, target, param, owner._parameters[param], bool(getattr(owner, "is_transposed", False)))
        planned.append((owner_path, module, owner, params, by_depth))
    with TensorReader(ckpt.tensors_in_memory) as reader:
        for owner_path, module, owner, params, by_depth in planned:
            if isinstance(module, ParamLora):
                outer = module
            else:
                outer = owner
                for param in params:
                    outer = ParamLora(outer, param)
                    outer.active_adapters = list(active)
                replace_module(model, owner_path, outer)
                created.append((owner_path, module))
            chain = _chain(outer)
            for depth, (target, m) in by_depth.items():
                wrapper = chain[depth]
                r, scaling = rank_and_scaling(ckpt.config, f"{target.owner}.{wrapper.parameter_name}")
                wrapper.add_adapter(name, r, scaling)
                for slot in ("lora_A", "lora_B"):
                    tensor = reader.get(m.tensors[slot])
                    nan, inf = count_non_finite(tensor)
                    if nan or inf:
                        raise NonFiniteValuesError(f"holds {nan} NaN and {inf} Inf value(s)", path=ckpt.weights_file, key=m.keys[slot])
                    layer = getattr(wrapper, slot)[name]
                    layer.weight = nn.Parameter(tensor.to(device=layer.weight.device, dtype=layer.weight.dtype), requires_grad=False)


def _chain(outer: nn.Module) -> list[ParamLora]:
    """The nested wrappers, outermost first (index = depth = number of ``.base_layer`` in the saved path)."""
    out = []
    m = outer
    while isinstance(m, ParamLora):
        out.append(m)
        m = m.base_layer
    return out


def _check(ckpt: AdapterCheckpoint, m: LoraModule, target: ParamTarget, param: str, weight: torch.Tensor, transposed: bool) -> None:
    r, _ = rank_and_scaling(ckpt.config, f"{target.owner}.{param}")
    shape = tuple(weight.shape)
    if len(shape) == 3:
        experts = shape[0]
        out_f, in_f = (shape[1], shape[2]) if not transposed else (shape[2], shape[1])
    else:
        experts, out_f, in_f = 1, shape[0], shape[1] if len(shape) > 1 else 0
    a, b = tuple(m.tensors["lora_A"].shape), tuple(m.tensors["lora_B"].shape)
    want_a, want_b = (r * experts, in_f), (out_f, r * experts)
    if a != want_a or b != want_b:
        raise ShapeMismatchError(
            f"LoRA A {list(a)} / B {list(b)} does not fit parameter '{param}' {list(shape)} (expected A {list(want_a)}, B {list(want_b)} for r={r})",
            path=ckpt.weights_file,
            key=m.keys.get("lora_A"),
        )


__all__ = ["is_param_lora", "load_param_loras"]
