"""Put an AdaLoRA adapter on a model, as PEFT does (FORMAT.md §3.10; used by :func:`adapterfmt.load`).

Every module of an AdaLoRA checkpoint must be an ``nn.Linear`` of the model (after ``prefix_map``)
with shapes that fit; it is wrapped in :class:`~adapterfmt.layers.adalora.AdaLoraLinear` and its
``lora_A``/``lora_B``/``lora_E`` loaded, the rank being the tensors' (the pruned rank of a
budget-allocated adapter). Everything is checked before the model changes; replaced modules go to
``created`` so a failed load is undone. This module imports torch only.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import nn

from ..checkpoint.adalora import is_adalora
from ..checkpoint.matching import apply_prefix_map
from ..checkpoint.records import AdapterCheckpoint
from ..errors import NonFiniteValuesError, ShapeMismatchError, UnresolvedModulesError, UnsupportedFeatureError
from ..layers.adalora import AdaLoraLinear
from ..layers.types import adapter_dtype
from ..reports.scan import count_non_finite
from ..storage.tensor_source import TensorReader
from .module_tree import find_module, replace_module


def is_adalora_checkpoint(ckpt: AdapterCheckpoint) -> bool:
    return is_adalora(ckpt.config.raw)


def load_adalora(
    model: nn.Module,
    ckpt: AdapterCheckpoint,
    name: str,
    prefix_map: Mapping[str, str],
    active: Sequence[str],
    created: list[tuple[str, nn.Module]],
) -> None:
    """Wrap every module of an AdaLoRA checkpoint and load its factors under adapter ``name``."""
    if not is_adalora_checkpoint(ckpt):
        return
    planned = []
    missing = []
    for saved_path, m in ckpt.lora.items():
        path = apply_prefix_map(saved_path, prefix_map)
        module = find_module(model, path) if path else None
        if module is None:
            missing.append(saved_path)
            continue
        base = module.base_layer if isinstance(module, AdaLoraLinear) else module
        if type(base) is not nn.Linear:
            raise UnsupportedFeatureError(f"AdaLoRA wraps nn.Linear layers; '{path}' is a {type(base).__name__}", path=ckpt.weights_file, key=saved_path)
        if set(m.tensors) != {"lora_A", "lora_B", "lora_E"}:
            raise UnsupportedFeatureError(f"AdaLoRA module '{saved_path}' needs lora_A, lora_B and lora_E only", path=ckpt.weights_file, key=saved_path)
        out_f, in_f = base.weight.shape
        a, b, e = (tuple(m.tensors[s].shape) for s in ("lora_A", "lora_B", "lora_E"))
        r = a[0] if a else 0
        if a != (r, in_f) or b != (out_f, r) or e != (r, 1):
            raise ShapeMismatchError(
                f"AdaLoRA A {list(a)} / B {list(b)} / E {list(e)} does not fit nn.Linear({in_f}, {out_f})", path=ckpt.weights_file, key=m.keys["lora_A"]
            )
        planned.append((path, module, base, m, r))
    if missing:
        raise UnresolvedModulesError(
            f"{len(missing)} AdaLoRA module(s) match no module of the model, e.g. '{missing[0]}'", unresolved=missing, path=ckpt.weights_file, key=missing[0]
        )
    dropout = ckpt.config.raw.get("lora_dropout") or 0.0
    with TensorReader(ckpt.tensors_in_memory) as reader:
        for path, module, base, m, r in planned:
            if isinstance(module, AdaLoraLinear):
                layer = module
            else:
                layer = AdaLoraLinear(base)
                layer.active_adapters = list(active)
                replace_module(model, path, layer)
                created.append((path, base))
            dtype = adapter_dtype(base.weight)
            layer.add_adapter(name, r, ckpt.config.lora_alpha, dtype=dtype, dropout=float(dropout) if isinstance(dropout, (int, float)) else 0.0)
            for slot in ("lora_A", "lora_B", "lora_E"):
                tensor = reader.get(m.tensors[slot])
                nan, inf = count_non_finite(tensor)
                if nan or inf:
                    raise NonFiniteValuesError(f"holds {nan} NaN and {inf} Inf value(s)", path=ckpt.weights_file, key=m.keys[slot])
                getattr(layer, slot)[name] = nn.Parameter(tensor.to(device=base.weight.device, dtype=dtype), requires_grad=False)


__all__ = ["is_adalora_checkpoint", "load_adalora"]
