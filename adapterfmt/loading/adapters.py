"""The adapters on a model: their record, the :class:`LoadedAdapters` handle, and managing them.

State lives on the model: the wrapper modules (:mod:`adapterfmt.layers.lora`) and one small record of
the adapters' configs in the attribute ``_adapterfmt`` of the model passed to
:func:`~adapterfmt.load` / :func:`~adapterfmt.wrap`. Pass that same (root) model, or its handle,
to every function here. :func:`set_adapter`, :func:`disable_adapters`, :func:`merge`,
:func:`unmerge` and :func:`unload` manage several adapters on one model, as PEFT's ``PeftModel``
methods of those names do. This module imports torch only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from torch import nn

from ..checkpoint.findings import Finding
from ..errors import MergeError
from ..layers.adalora import AdaLoraLinear
from ..layers.full_copy import WEIGHT_WRAPPERS, FullCopy, iter_wrappers
from ..layers.lora import LoraLayer, make_lora_layer
from ..layers.lycoris import FactorLayer
from ..layers.params import ParamLora
from ..layers.tokens import TokenWrapper
from .module_tree import replace_module

_REGISTRY_ATTR = "_adapterfmt"


@dataclass
class AdapterInfo:
    """One adapter on a model.

    Attributes:
        name: the adapter name (``default``, ``second``, ...).
        config: the ``adapter_config.json`` content :func:`~adapterfmt.save` writes (as loaded, or
            built by :func:`~adapterfmt.wrap`).
        lora_modules: model paths of its LoRA layers.
        full_copies: model paths of its full copies.
        prefix_map: the module-path rewrite applied at load; :func:`~adapterfmt.save` undoes it.
        overrides: saved key (no prefix) -> model ``state_dict`` key, for base tensors the checkpoint
            replaced (embeddings saved in full, ``bias="all"``); written back by :func:`~adapterfmt.save`.
        source: the directory it was loaded from, if any.
        findings: warnings the checkpoint reader reported.
    """

    name: str
    config: dict[str, Any]
    lora_modules: list[str] = field(default_factory=list)
    full_copies: list[str] = field(default_factory=list)
    prefix_map: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    source: Optional[str] = None
    findings: list[Finding] = field(default_factory=list)


@dataclass
class Registry:
    """The record kept on a model: its adapters by name, and the active ones."""

    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


class LoadedAdapters:
    """What :func:`~adapterfmt.load` and :func:`~adapterfmt.wrap` return: the model (changed in place) and its adapters.

    A read-only view, not a second API: the primary style is the module-level functions called on
    the model itself (``adapterfmt.set_adapter(model, "x")``, docs/BEHAVIOUR.md §5); each of them
    also accepts this handle in place of the model, as a convenience.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return get_registry(self.model).adapters

    @property
    def active(self) -> list[str]:
        return list(get_registry(self.model).active)

    def __repr__(self) -> str:
        return f"LoadedAdapters({type(self.model).__name__}, adapters={list(self.adapters)}, active={self.active})"


ModelLike = Union[nn.Module, LoadedAdapters]


# ---------------------------------------------------------------------------------------------
# SEVERAL ADAPTERS, MERGE, UNLOAD, TRAINABILITY
# ---------------------------------------------------------------------------------------------


def set_adapter(model: ModelLike, adapter_name: "str | Sequence[str]") -> None:
    """Make ``adapter_name`` (or several names, applied in order) the active adapter(s).

    Requires grad flags are not changed.

    Raises:
        ValueError: an unknown name, or two active adapters with full copies of the same module.
        MergeError: adapters are merged (call :func:`unmerge` first).
    """
    model = as_model(model)
    registry = get_registry(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for name in names:
        adapter_info(registry, name)
    wrappers = list(iter_wrappers(model))
    for path, w in wrappers:
        if isinstance(w, WEIGHT_WRAPPERS) and w.merged:
            raise MergeError("adapters are merged into this layer", key=path, hint="call adapterfmt.unmerge(model) first")
        if isinstance(w, FullCopy) and sum(n in w.modules_to_save for n in names) > 1:
            raise ValueError(f"{path!r}: only one adapter's full copy can be active; {names} each have one")
    for _, w in wrappers:
        w.active_adapters = list(names)
    registry.active = list(names)


@contextlib.contextmanager
def disable_adapters(model: ModelLike) -> Iterator[None]:
    """Run the base model alone inside the ``with`` block (merged adapters are taken out and put back).

    Example:
        ```python
        with adapterfmt.disable_adapters(model):
            base_logits = model(input_ids).logits
        ```
    """
    model = as_model(model)
    wrappers = [w for _, w in iter_wrappers(model)]
    merged = {id(w): list(w.merged_adapters) for w in wrappers if isinstance(w, WEIGHT_WRAPPERS) and w.merged}
    before = {id(w): w.disabled for w in wrappers}
    for w in wrappers:
        if id(w) in merged:
            w.unmerge()
        w.disabled = True
    try:
        yield
    finally:
        for w in wrappers:
            w.disabled = before[id(w)]
            if id(w) in merged:
                w.merge(merged[id(w)])


def merge(model: ModelLike, adapter_names: Optional[Sequence[str]] = None) -> None:
    """Merge adapters (default: the active ones) into the base weights in memory.

    Uses :mod:`adapterfmt.deltas.lora` (``W + ΣΔW`` in float32, one rounding; DoRA's normalised weight),
    the same math as the merge engine. Forward then runs the base layers only; :func:`unmerge`
    takes the deltas out again (DoRA layers restore the exact previous weight). Full copies need no
    merge: the active copy is already in use.

    Raises:
        ValueError: an unknown adapter name.
        MergeError: a layer cannot be merged (DoRA together with another adapter, conv groups > 1,
            ``lora_bias`` without a base bias).
    """
    model = as_model(model)
    registry = get_registry(model)
    names = list(registry.active if adapter_names is None else adapter_names)
    for name in names:
        adapter_info(registry, name)
    _merge_lora_layers(model, names)


def unmerge(model: ModelLike) -> None:
    """Take every merged adapter back out of the base weights."""
    model = as_model(model)
    for _, w in iter_wrappers(model):
        if isinstance(w, WEIGHT_WRAPPERS):
            w.unmerge()


def unload(model: ModelLike, merge: bool = False) -> nn.Module:
    """Remove every adapter wrapper, returning the model with its plain modules back in place.

    ``merge=False`` (PEFT's ``unload``): LoRA is dropped (merged deltas are taken out first) and each
    full copy gives way to the original module. ``merge=True`` (PEFT's ``merge_and_unload``): the
    active adapters are merged into the base weights and each full copy is replaced by the active
    adapter's trained copy.

    Returns:
        The same model object, without wrappers or adapter records.
    """
    model = as_model(model)
    registry = get_registry(model)
    wrappers = list(iter_wrappers(model))
    if merge:
        _merge_lora_layers(model, registry.active)
    for path, w in wrappers:
        if isinstance(w, (LoraLayer, AdaLoraLinear, FactorLayer)):
            if not merge:
                w.unmerge()
            replace_module(model, path, w.base_layer)
        elif isinstance(w, ParamLora):  # nested wrappers: the outermost gives way to the owner
            if not merge:
                w.unmerge()
            if not path.endswith("base_layer"):
                replace_module(model, path, w.owner)
        else:
            replace_module(model, path, w.active_module if merge else w.original_module)
    drop_registry(model)
    return model


def _merge_lora_layers(model: nn.Module, names: Sequence[str]) -> None:
    for path, w in iter_wrappers(model):
        if isinstance(w, WEIGHT_WRAPPERS):
            try:
                w.merge(names)
            except ValueError as e:
                raise MergeError(str(e), key=path) from None


def freeze_full_copies(model: ModelLike, adapter_name: Optional[str] = None) -> None:
    """Stop gradients to the full copies (``modules_to_save``) of one adapter, or of all."""
    _full_copies_requires_grad(as_model(model), adapter_name, False)


def unfreeze_full_copies(model: ModelLike, adapter_name: Optional[str] = None) -> None:
    """Let the full copies (``modules_to_save``) of one adapter, or of all, require grad."""
    _full_copies_requires_grad(as_model(model), adapter_name, True)


def _full_copies_requires_grad(model: nn.Module, adapter_name: Optional[str], flag: bool) -> None:
    if adapter_name is not None:
        adapter_info(get_registry(model), adapter_name)
    for _, w in iter_wrappers(model):
        if isinstance(w, FullCopy):
            for name, copy in w.modules_to_save.items():
                if adapter_name is None or name == adapter_name:
                    copy.requires_grad_(flag)


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Freeze everything; if ``trainable``, unfreeze adapter ``name`` as PEFT's training setup does:
    its LoRA tensors and full copies, plus the biases its config trains (``bias="all"``: every
    parameter named ``bias`` except in the originals of full copies; ``"lora_only"``: the biases
    of LoRA-wrapped layers)."""
    model.requires_grad_(False)
    if not trainable:
        model.eval()
        return
    bias = get_registry(model).adapters[name].config.get("bias")
    for _, w in iter_wrappers(model):
        if isinstance(w, (TokenWrapper,) + WEIGHT_WRAPPERS):
            for p in w.adapter_parameters(name):
                p.requires_grad_(True)
            if bias == "lora_only" and w.base_layer.bias is not None:
                w.base_layer.bias.requires_grad_(True)
        elif isinstance(w, FullCopy) and name in w.modules_to_save:
            w.modules_to_save[name].requires_grad_(True)
    if bias == "all":
        for key, p in model.named_parameters():
            if key.rpartition(".")[2] == "bias":
                p.requires_grad_(True)
        for _, w in iter_wrappers(model):
            if isinstance(w, FullCopy):
                w.original_module.requires_grad_(False)  # the original under a full copy stays frozen


# ---------------------------------------------------------------------------------------------
# THE RECORD AND THE WRAPPERS (shared by load and wrap)
# ---------------------------------------------------------------------------------------------


def as_model(model: ModelLike) -> nn.Module:
    """The model behind a handle; ``TypeError`` for anything that is not a ``torch.nn.Module``."""
    if isinstance(model, LoadedAdapters):
        return model.model
    if not isinstance(model, nn.Module):
        if isinstance(getattr(model, "components", None), dict):  # a diffusers pipeline: its components are the modules
            raise TypeError(
                f"expected a torch.nn.Module, got the pipeline {type(model).__name__}; give one component, "
                "e.g. adapterfmt.load(pipe.unet, FILE, component='unet')"
            )
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model


def get_registry(model: nn.Module, create: Optional[bool] = None) -> Registry:
    """The adapter record of ``model``. ``create=None``: it must exist; ``False``: an empty one if absent."""
    reg = model.__dict__.get(_REGISTRY_ATTR)
    if reg is None:
        if create is None:
            raise ValueError(f"this {type(model).__name__} has no adapters; use adapterfmt.load or adapterfmt.wrap first")
        reg = Registry()
        if create:
            model.__dict__[_REGISTRY_ATTR] = reg
    return reg


def drop_registry(model: nn.Module) -> None:
    model.__dict__.pop(_REGISTRY_ATTR, None)


def register(registry: Registry, info: AdapterInfo) -> None:
    """Record a new adapter; the first one on a model becomes active."""
    registry.adapters[info.name] = info
    if not registry.active:
        registry.active = [info.name]


def adapter_info(registry: Registry, name: str) -> AdapterInfo:
    """The record of adapter ``name``; ``ValueError`` if the model has none of that name."""
    if name not in registry.adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(registry.adapters)}")
    return registry.adapters[name]


def check_new_name(registry: Registry, name: str) -> None:
    """``ValueError`` unless ``name`` is a valid adapter name not yet on the model."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in registry.adapters:
        raise ValueError(f"an adapter named {name!r} is already on this model; pick another adapter_name")


def _wrapper_at(
    model: nn.Module,
    path: str,
    module: nn.Module,
    active: Sequence[str],
    created: list[tuple[str, nn.Module]],
    wrapper_type: type,
    make: Callable[[nn.Module], nn.Module],
) -> Any:
    """``module`` if it is already a ``wrapper_type``, else ``make(module)`` put in its place with
    ``active`` adapters (the replaced module is appended to ``created`` for :func:`remove_adapter`)."""
    if isinstance(module, wrapper_type):
        return module
    wrapper = make(module)
    wrapper.active_adapters = list(active)
    replace_module(model, path, wrapper)
    created.append((path, module))
    return wrapper


def lora_layer_at(
    model: nn.Module, path: str, module: nn.Module, active: Sequence[str], created: list[tuple[str, nn.Module]]
) -> LoraLayer:
    """The LoraLayer at ``path``: ``module`` if already one, else a new wrapper put in its place."""
    return _wrapper_at(model, path, module, active, created, LoraLayer, make_lora_layer)


def full_copy_at(
    model: nn.Module, path: str, module: nn.Module, active: Sequence[str], created: list[tuple[str, nn.Module]]
) -> FullCopy:
    """The FullCopy at ``path``: ``module`` if already one, else a new wrapper put in its place."""
    return _wrapper_at(model, path, module, active, created, FullCopy, FullCopy)


def remove_adapter(model: nn.Module, registry: Registry, name: str, created: list[tuple[str, nn.Module]]) -> None:
    """Undo a failed load/wrap: drop ``name`` everywhere, put back the modules it replaced, and drop
    the record if no adapter is left on the model."""
    for _, w in list(iter_wrappers(model)):
        w.delete_adapter(name)
    for path, original in reversed(created):
        replace_module(model, path, original)
    if not registry.adapters:
        drop_registry(model)


__all__ = [
    "AdapterInfo",
    "LoadedAdapters",
    "disable_adapters",
    "freeze_full_copies",
    "merge",
    "set_adapter",
    "unfreeze_full_copies",
    "unload",
    "unmerge",
]
