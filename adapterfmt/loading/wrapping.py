"""Add a fresh, trainable LoRA adapter to any torch model, as PEFT's ``get_peft_model`` would.

Which modules are adapted follows PEFT's matching rules exactly (:mod:`adapterfmt.checkpoint.matching`); the
new layers get PEFT's initialisation in ``named_modules()`` order, so under the same seed the
tensors equal PEFT's. The adapter's ``adapter_config.json`` is built here and kept on the model
for :func:`~adapterfmt.save`. This module imports torch only.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from ..checkpoint.config import LoraConfig, parse_config
from ..checkpoint.matching import TargetSelection, select_targets
from ..constants import DEFAULT_ADAPTER_NAME
from ..deltas.lora import CONV, CONV1D_TRANSPOSED, EMBEDDING, LINEAR
from ..errors import AmbiguousMatchError, InvalidConfigError, UnresolvedModulesError, UnsupportedFeatureError
from ..formats.peft.memory import as_lora_config
from ..layers.full_copy import FullCopy, plain_module_names
from ..layers.lora import LoraLayer
from ..layers.types import base_layout, supported_layout
from .adapters import (
    AdapterInfo,
    LoadedAdapters,
    ModelLike,
    as_model,
    check_new_name,
    full_copy_at,
    get_registry,
    lora_layer_at,
    register,
    remove_adapter,
    set_trainable,
)
from .module_tree import CONTAINERS, base_of, original_of


def wrap(
    model: ModelLike,
    config: "LoraConfig | Mapping[str, Any] | Sequence[str] | str | None" = None,
    *,
    target_modules: "Sequence[str] | str | None" = None,
    exclude_modules: "Sequence[str] | str | None" = None,
    modules_to_save: Optional[Sequence[str]] = None,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    lora_bias: bool = False,
    rank_pattern: Optional[Mapping[str, int]] = None,
    alpha_pattern: Optional[Mapping[str, float]] = None,
    layers_to_transform: "int | Sequence[int] | None" = None,
    layers_pattern: "str | Sequence[str] | None" = None,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    init_lora_weights: "bool | str" = True,
) -> LoadedAdapters:
    """Add a fresh, trainable LoRA adapter, as ``get_peft_model`` with the same ``LoraConfig`` would.

    Matching (docs/FORMAT.md §5, :mod:`adapterfmt.checkpoint.matching`): a list entry matches a module named
    exactly so or ending in ``"." + entry``; a string is a regular expression the whole name must
    match (``r".*\\.(?!11)\\d+\\.fc1$"``); ``"all-linear"`` means every Linear / Conv1D except the
    model's output embedding; ``exclude_modules`` always wins. ``modules_to_save`` entries must each
    name exactly one module. Layers are created in ``named_modules()`` order with PEFT's
    initialisation, so under the same seed the new tensors equal ``get_peft_model``'s.

    Afterwards only this adapter's tensors and full copies require grad. The first adapter on a
    model becomes active; a later one is added inactive (see :func:`~adapterfmt.set_adapter`).

    ``wrap(model, config)`` takes an :class:`adapterfmt.LoraConfig` (or a decoded
    ``adapter_config.json`` dict), as ``get_peft_model(model, config)`` does; the keyword fields
    are a convenience for the same thing (``wrap(model, ["q_proj"], r=4)``) and cannot be mixed
    with a config object.

    Args:
        model (`torch.nn.Module`): any model (or a handle).
        config (:class:`~adapterfmt.LoraConfig`, `dict`, `list[str]` or `str`): the adapter's
            config; a list or a string here is ``target_modules`` (the keyword form).
        target_modules (`list[str]` or `str`): modules to give LoRA; required, since adapterfmt
            has no per-architecture defaults.
        exclude_modules (`list[str]` or `str`, *optional*): modules never to target.
        modules_to_save (`list[str]`, *optional*): modules to train and save in full.
        r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_bias, rank_pattern, alpha_pattern,
        layers_to_transform, layers_pattern, init_lora_weights: as in PEFT's ``LoraConfig``
            (``init_lora_weights``: `True`, `False` or `"gaussian"`).
        adapter_name (`str`, *optional*, defaults to `"default"`).

    Returns:
        A :class:`LoadedAdapters` handle; save the trained adapter with :func:`~adapterfmt.save`.

    Raises:
        AmbiguousMatchError: a ``modules_to_save`` entry matches several modules (or PEFT's loose
            suffix rule would bind others too), or a module is both a LoRA target and a module to save.
        UnresolvedModulesError: ``target_modules`` / ``modules_to_save`` match nothing.
        UnsupportedFeatureError: a target is a layer type LoRA cannot wrap, or ``lora_bias`` on an embedding.
        InvalidConfigError: invalid values (``r <= 0``, a bad regular expression, ...) or no
            ``target_modules``.
        ValueError: ``adapter_name`` is invalid or already present.
        TypeError: a config object together with field keywords.
    """
    fields = dict(
        target_modules=target_modules, exclude_modules=exclude_modules, modules_to_save=modules_to_save, r=r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora, lora_bias=lora_bias,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern, init_lora_weights=init_lora_weights,
    )
    if isinstance(config, (LoraConfig, Mapping)):
        given = sorted(k for k, v in fields.items() if v != _KEYWORD_DEFAULTS[k])
        if given:
            raise TypeError(f"wrap() got a config object and field keywords {given}: put them in the config")
        fields = _fields_of(as_lora_config(config))
    elif config is not None:
        if target_modules is not None:
            raise TypeError("wrap() got target_modules twice (positionally and as a keyword)")
        fields["target_modules"] = config
    return _wrap(model, adapter_name=adapter_name, **fields)


def _fields_of(cfg: LoraConfig) -> dict[str, Any]:
    """The keyword fields of :func:`wrap` from a config; refuses what ``wrap`` cannot create."""
    for name, value, default in (
        ("bias", cfg.bias, "none"),
        ("target_parameters", cfg.target_parameters, None),
        ("trainable_token_indices", cfg.trainable_token_indices, None),
    ):
        if value not in (default, [], {}):
            raise UnsupportedFeatureError(
                f"is {value!r}; wrap() creates only LoRA adapters without it", key=name, hint=f"set {name}={default!r}"
            )
    return dict(
        target_modules=cfg.target_modules,
        exclude_modules=cfg.exclude_modules,
        modules_to_save=cfg.modules_to_save,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=float(cfg.raw.get("lora_dropout", 0.0) or 0.0),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        lora_bias=cfg.lora_bias,
        rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern=dict(cfg.alpha_pattern),
        layers_to_transform=cfg.layers_to_transform,
        layers_pattern=cfg.layers_pattern,
        init_lora_weights=cfg.init_lora_weights,
    )


def _wrap(
    model: ModelLike,
    *,
    target_modules: Any,
    exclude_modules: Any,
    modules_to_save: Optional[Sequence[str]],
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    use_rslora: bool,
    use_dora: bool,
    lora_bias: bool,
    rank_pattern: Optional[Mapping[str, int]],
    alpha_pattern: Optional[Mapping[str, float]],
    layers_to_transform: Any,
    layers_pattern: Any,
    adapter_name: str,
    init_lora_weights: "bool | str",
) -> LoadedAdapters:
    """:func:`wrap` with its fields decided."""
    model = as_model(model)
    registry = get_registry(model, create=False)
    check_new_name(registry, adapter_name)
    if target_modules is None and not modules_to_save:
        raise InvalidConfigError(
            "is required: adapterfmt has no per-architecture defaults", key="target_modules", hint="list the modules to adapt"
        )
    named = [(n, m) for n, m in plain_module_names(model) if n]
    modules = dict(named)
    names = [n for n, _ in named]
    targets_spec: Any = list(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules
    if isinstance(targets_spec, str) and targets_spec.lower() == "all-linear":
        targets_spec = _all_linear(model, named)
    doc = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": targets_spec,
        "exclude_modules": list(exclude_modules) if isinstance(exclude_modules, (list, tuple, set)) else exclude_modules,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "lora_bias": lora_bias,
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "layers_to_transform": list(layers_to_transform) if isinstance(layers_to_transform, (list, tuple)) else layers_to_transform,
        "layers_pattern": layers_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": init_lora_weights,
        "inference_mode": False,
    }
    cfg = parse_config(doc)
    sel = select_targets(
        names,
        target_modules=cfg.target_modules,
        exclude_modules=cfg.exclude_modules,
        modules_to_save=cfg.modules_to_save,
        layers_to_transform=cfg.layers_to_transform,
        layers_pattern=cfg.layers_pattern,
    )
    _check_selection(model, sel, modules, cfg, lora_bias)
    if any(base_layout(base_of(modules[t])) == CONV1D_TRANSPOSED for t in sel.lora_targets):
        doc["fan_in_fan_out"] = True

    registry = get_registry(model, create=True)
    created: list[tuple[str, nn.Module]] = []
    copies = [ms[0] for ms in sel.full_copies.values()]
    try:
        for path in sel.lora_targets:
            layer = lora_layer_at(model, path, modules[path], registry.active or [adapter_name], created)
            rank = cfg.rank_for(path)
            layer.create_adapter(
                adapter_name,
                rank,
                alpha=cfg.alpha_for(path),
                scaling=cfg.scaling_for(path, rank),
                dropout=lora_dropout,
                lora_bias=lora_bias,
                use_dora=use_dora,
            )
            layer.init_adapter(adapter_name, init_lora_weights)
        for path in copies:
            full_copy_at(model, path, modules[path], registry.active or [adapter_name], created).add_copy(adapter_name)
    except BaseException:
        remove_adapter(model, registry, adapter_name, created)
        raise
    register(registry, AdapterInfo(adapter_name, doc, list(sel.lora_targets), copies))
    set_trainable(model, adapter_name, True)
    return LoadedAdapters(model)


#: The keyword fields' defaults (a config object may come only with these).
_KEYWORD_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(wrap).parameters.items() if p.kind is p.KEYWORD_ONLY and name != "adapter_name"
}


def _all_linear(model: nn.Module, named: list[tuple[str, nn.Module]]) -> list[str]:
    """``all-linear`` as PEFT expands it: every Linear / Conv1D by full name, minus the output embedding."""
    out_emb = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        out_emb = getter()
    return [
        n
        for n, m in named
        if base_layout(base_of(m)) in (LINEAR, CONV1D_TRANSPOSED) and not isinstance(m, FullCopy) and m is not out_emb
    ]


def _check_selection(model: nn.Module, sel: TargetSelection, modules: dict[str, nn.Module], cfg: LoraConfig, lora_bias: bool) -> None:
    for entry, loose in sel.peft_divergence.items():
        raise AmbiguousMatchError(
            f"PEFT's suffix rule for modules_to_save would also bind {', '.join(loose)}; the saved adapter would not load in PEFT",
            key=entry,
            hint="rename the entry to the full module path and make sure no other module name ends with it",
        )
    empty = [e for e, ms in sel.full_copies.items() if not ms]
    if empty:
        raise UnresolvedModulesError(
            f"modules_to_save entry matches no module of the {type(model).__name__}",
            unresolved=empty,
            key=empty[0],
            hint="give a module name or dotted suffix that exists",
        )
    if not sel.lora_targets and not sel.full_copies:
        raise UnresolvedModulesError(
            f"target_modules matches no module of the {type(model).__name__}"
            + (f" (all {len(sel.excluded)} matches are excluded)" if sel.excluded else ""),
            unresolved=[cfg.target_modules] if isinstance(cfg.target_modules, str) else list(cfg.target_modules or []),
            key="target_modules",
            hint="list module names or dotted suffixes, or give a regular expression matching whole names",
        )
    for path in sel.lora_targets:
        module = modules[path]
        if isinstance(module, FullCopy):
            raise AmbiguousMatchError("is saved in full by another adapter and cannot also get LoRA", key=path)
        base = base_of(module)
        layout = supported_layout(base, path, hint="narrow target_modules to supported layers")
        if lora_bias and layout == EMBEDDING:
            raise UnsupportedFeatureError("lora_bias is not supported on embedding layers", key=path)
        rank = cfg.rank_for(path)
        if layout == CONV and rank % base.groups:
            raise UnsupportedFeatureError(f"rank {rank} is not divisible by the convolution's groups={base.groups}", key=path)
    for entry, matched in sel.full_copies.items():
        module = modules[matched[0]]
        if isinstance(module, LoraLayer):
            raise AmbiguousMatchError("has LoRA from another adapter and cannot also be saved in full", key=matched[0])
        original = original_of(module)
        if isinstance(original, CONTAINERS):
            raise UnsupportedFeatureError(f"a {type(original).__name__} cannot be saved in full", key=matched[0])


__all__ = ["wrap"]
