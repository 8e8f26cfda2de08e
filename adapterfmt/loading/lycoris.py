"""Put LoHa / LoKr modules on a model, as PEFT does (FORMAT §10; used by :func:`adapterfmt.load`).

The checkpoint's factor modules (:attr:`~adapterfmt.checkpoint.records.LoraModule.factors` ``loha`` /
``lokr``: a PEFT LOHA / LOKR directory, or a kohya / LyCORIS file's component) are found in the
model after ``prefix_map``, checked (layer type, product shape) and wrapped in
:class:`~adapterfmt.layers.lycoris.LoHaLayer` / ``LoKrLayer`` with their factors loaded. A LoCon
Tucker core (``lora_mid``) has no PEFT form and is refused. Everything is checked before the
model changes; replaced modules go to ``created`` so a failed load is undone. Imports torch only.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import nn

from ..checkpoint.config import pattern_key
from ..checkpoint.factors import fits, product_shape
from ..checkpoint.matching import apply_prefix_map
from ..checkpoint.records import AdapterCheckpoint, LoraModule
from ..errors import (
    AmbiguousMatchError,
    NonFiniteValuesError,
    ShapeMismatchError,
    UnresolvedModulesError,
    UnsupportedFeatureError,
)
from ..layers.lycoris import LAYER_CLASSES, FactorLayer, can_wrap
from ..layers.types import adapter_dtype
from ..reports.scan import count_non_finite
from ..storage.tensor_source import TensorReader
from .module_tree import find_module, replace_module


def factor_modules(ckpt: AdapterCheckpoint) -> dict[str, LoraModule]:
    """The checkpoint's LoHa / LoKr / Tucker LoCon modules (saved path -> record)."""
    return {p: m for p, m in ckpt.lora.items() if m.factors is not None}


def refuse_unloadable_factors(ckpt: AdapterCheckpoint) -> None:
    """Raise for factor modules :func:`load_factor_modules` cannot apply (checked before the model changes)."""
    for path, m in factor_modules(ckpt).items():
        if m.factors not in LAYER_CLASSES:
            raise UnsupportedFeatureError(
                "a LoCon Tucker core (lora_mid) has no form in PEFT, so adapterfmt.load cannot apply it",
                path=ckpt.weights_file, key=next(iter(m.keys.values()), path), hint="merge it instead (adapterfmt merge)",
            )


def load_factor_modules(
    model: nn.Module,
    ckpt: AdapterCheckpoint,
    name: str,
    prefix_map: Mapping[str, str],
    active: Sequence[str],
    created: list[tuple[str, nn.Module]],
) -> list[str]:
    """Wrap every LoHa / LoKr module of ``ckpt`` and load its factors under adapter ``name``.

    Returns:
        The model paths wrapped.

    Raises:
        UnresolvedModulesError: modules missing from the model (all listed together).
        UnsupportedFeatureError: a target that is not ``nn.Linear`` / ``nn.ConvNd``.
        AmbiguousMatchError: the module already has another kind of adapter.
        ShapeMismatchError: the factors' product does not fit the module's weight.
        NonFiniteValuesError: a factor holds NaN / Inf.
    """
    records = factor_modules(ckpt)
    if not records:
        return []
    refuse_unloadable_factors(ckpt)
    planned: list[tuple[str, nn.Module, nn.Module, LoraModule]] = []
    missing = []
    for saved_path, m in records.items():
        path = apply_prefix_map(saved_path, prefix_map)
        module = find_module(model, path) if path else None
        if module is None:
            missing.append(saved_path)
            continue
        layer_class = LAYER_CLASSES[m.factors]  # type: ignore[index]
        if isinstance(module, FactorLayer) and not isinstance(module, layer_class):
            raise AmbiguousMatchError(
                f"has {module.kind} from another adapter on this model and cannot also get {m.factors}", path=ckpt.weights_file, key=path
            )
        base = module.base_layer if isinstance(module, layer_class) else module
        key = next(iter(m.keys.values()), saved_path)
        if not can_wrap(base):
            raise UnsupportedFeatureError(
                f"{m.factors} wraps nn.Linear and nn.Conv1d/2d/3d layers (as PEFT); '{path}' is a {type(base).__name__}",
                path=ckpt.weights_file, key=key,
            )
        shapes = {slot: tuple(info.shape) for slot, info in m.tensors.items()}
        if not fits(m.factors, shapes, tuple(base.weight.shape)):  # type: ignore[arg-type]
            raise ShapeMismatchError(
                f"the {m.factors} product {list(product_shape(m.factors, shapes) or ())} does not fit the weight "  # type: ignore[arg-type]
                f"{list(base.weight.shape)} of '{path}'",
                path=ckpt.weights_file, key=key, hint="the adapter was trained on a model with other dimensions",
            )
        planned.append((path, module, base, m))
    if missing:
        raise UnresolvedModulesError(
            f"{len(missing)} LoHa/LoKr module(s) match no module of the model, e.g. '{missing[0]}'",
            unresolved=missing, path=ckpt.weights_file, key=missing[0],
            hint="is this adapter for this model? if the model nests the base under another name, pass prefix_map",
        )
    options = _layer_options(ckpt.source_config)
    with TensorReader(ckpt.tensors_in_memory) as reader:
        tensors = []
        for path, module, base, m in planned:
            dtype = adapter_dtype(base.weight)
            factors = {}
            for slot, info in m.tensors.items():
                t = reader.get(info)
                nan, inf = count_non_finite(t)
                if nan or inf:
                    raise NonFiniteValuesError(f"holds {nan} NaN and {inf} Inf value(s)", path=ckpt.weights_file, key=m.keys[slot])
                factors[slot] = t.to(device=base.weight.device, dtype=dtype)
            tensors.append(factors)
    for (path, module, base, m), factors in zip(planned, tensors):
        if isinstance(module, FactorLayer):
            layer = module
        else:
            layer = LAYER_CLASSES[m.factors](base)  # type: ignore[index]
            layer.active_adapters = list(active)
            replace_module(model, path, layer)
            created.append((path, base))
        r, alpha = _rank_and_alpha(ckpt.source_config, m)
        layer.add_adapter(name, factors, r=r, alpha=alpha, scaling=m.scaling, peft_kron=m.peft_kron, **options)
    return [p for p, *_ in planned]


def _rank_and_alpha(config: Optional[Mapping[str, Any]], m: LoraModule) -> tuple[int, float]:
    """PEFT's ``r`` and ``alpha`` for the layer: from a PEFT config's patterns, else the record's."""
    if config is None:
        return int(m.rank or m.config_rank or 1), float(m.alpha)
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rk, ak = pattern_key(ranks, m.path), pattern_key(alphas, m.path)
    return int(ranks[rk] if rk is not None else config.get("r", 8)), float(alphas[ak] if ak is not None else config.get("alpha", 8))


def _layer_options(config: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Training-time dropouts of a PEFT LOHA / LOKR config (a kohya file has none)."""
    config = config or {}

    def number(key: str) -> float:
        v = config.get(key) or 0.0
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0

    scale = config.get("rank_dropout_scale", False)
    return {"rank_dropout": number("rank_dropout"), "module_dropout": number("module_dropout"), "rank_dropout_scale": bool(scale)}


__all__ = ["factor_modules", "load_factor_modules", "refuse_unloadable_factors"]
