"""Put LoRA adapters on any torch model, in place, the way PEFT would — without importing PEFT.

:func:`load` rebuilds the wrappers from the checkpoint alone (:func:`~adapterfmt.formats.peft.reading.read_adapter`:
module paths, ranks from the tensors, scaling from the config), so the model's class needs no
table entry. The wrapped model has PEFT's module names and ``state_dict()`` keys
(``X.base_layer.weight``, ``X.lora_A.default.weight``, ``Y.modules_to_save.default.weight``) and
computes PEFT's outputs.

The loader's other parts: :mod:`adapterfmt.loading.plan` checks the checkpoint against the model
before anything changes; :mod:`adapterfmt.loading.saving` writes PEFT's layout back (:func:`~adapterfmt.save`);
:mod:`adapterfmt.loading.wrapping` adds fresh adapters as ``get_peft_model`` would (:func:`~adapterfmt.wrap`);
:mod:`adapterfmt.loading.adapters` keeps the record of the adapters on a model and manages several
(:func:`~adapterfmt.set_adapter`, :func:`~adapterfmt.merge`, :func:`~adapterfmt.unload`, ...).
This module imports torch and safetensors only.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..checkpoint.config import LoraConfig
from ..checkpoint.keys import parse_saved, render_wrapped, split_prefix
from ..constants import DEFAULT_ADAPTER_NAME
from ..errors import InconsistentAdapterError, NonFiniteValuesError
from ..formats.peft.memory import read_state_dict
from ..formats.peft.reading import AdapterCheckpoint, read_adapter
from ..layers.types import adapter_dtype
from ..reports.scan import count_non_finite
from ..storage.header import TensorInfo
from ..storage.tensor_source import TensorReader
from .adalora import load_adalora
from .adapters import (
    AdapterInfo,
    LoadedAdapters,
    ModelLike,
    Registry,
    as_model,
    check_new_name,
    full_copy_at,
    get_registry,
    lora_layer_at,
    register,
    remove_adapter,
    set_trainable,
)
from .lycoris import load_factor_modules
from .module_tree import base_view, base_view_keys, find_module, parse_model_key, set_tensor
from .params import load_param_loras
from .plan import LoadPlan, listing, plan_load, refuse_unloadable
from .tokens import load_token_rows


def load(
    model: ModelLike,
    path_or_hub_id: "str | os.PathLike[str] | Mapping[str, torch.Tensor]",
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    is_trainable: bool = False,
    prefix_map: Optional[Mapping[str, str]] = None,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    allow_pickle: bool = False,
    config: "LoraConfig | Mapping[str, Any] | None" = None,
    component: Optional[str] = None,
    weight_name: Optional[str] = None,
) -> LoadedAdapters:
    """Wrap every module a LoRA adapter targets, in place, and load its tensors.

    The checkpoint alone decides what is wrapped: every LoRA module and full copy it holds must be
    found in ``model`` (module paths relative to the model, without ``base_model.model.``), every
    tensor is used exactly once, and nothing is changed unless all of that holds. The result has
    PEFT's module names and ``state_dict()`` keys and gives ``PeftModel.from_pretrained``'s outputs.

    The first adapter on a model becomes active; later ones are added inactive (switch with
    :func:`~adapterfmt.set_adapter`), as ``PeftModel.load_adapter`` does.

    Args:
        model (`torch.nn.Module`): any model; a transformers or diffusers model, or your own.
        path_or_hub_id (`str`, `os.PathLike` or `dict`): adapter directory (``<dir>/<name>`` for a
            sub-adapter) or Hub repo id — PEFT LoRA, AdaLoRA, LoHa or LoKr; a kohya / LyCORIS or
            diffusers LoRA ``.safetensors`` file (or a folder or Hub repo holding one, see ``component``
            and ``weight_name``);
            or an in-memory state dict under PEFT's saved keys (what
            ``get_peft_model_state_dict`` returns), which then needs ``config``. Its tensors
            are copied, never shared with the caller's dict.
        adapter_name (`str`, *optional*, defaults to `"default"`): the name to load it under.
        is_trainable (`bool`, *optional*, defaults to `False`): `True`: this adapter's LoRA tensors
            and full copies require grad (and the biases its ``bias`` setting trains, as in PEFT)
            and every other parameter is frozen. `False`: no parameter requires grad and the
            model is put in eval mode.
        prefix_map (`dict`, *optional*): module-path prefix rewrites applied to the checkpoint's
            paths, e.g. ``{"model.": "language_model.model."}`` when the model nests the base
            differently from the one the adapter was trained on.
        subfolder / revision: a folder inside the directory or Hub repo, and the Hub revision
            (branch, tag or commit), as :func:`~adapterfmt.read_adapter` takes them; for a foreign
            file on the Hub the file is downloaded through huggingface_hub's cache at ``revision``.
        allow_pickle (`bool`, *optional*, defaults to `False`): permit an ``adapter_model.bin``.
        config (:class:`~adapterfmt.LoraConfig` or `dict`, *optional*): the adapter's config (a
            decoded ``adapter_config.json``: LoRA, AdaLoRA, LoHa or LoKr); only, and required,
            with a state dict.
        component (`str`, *optional*): for a kohya / LyCORIS or diffusers LoRA file (FORMAT §10),
            which part of it ``model`` is (``unet``, ``transformer``, ``text_encoder``,
            ``text_encoder_2``); optional when the file adapts one component. Its names are
            resolved against ``model``'s own modules.
        weight_name (`str`, *optional*): the foreign file inside the directory or Hub repo (as
            diffusers' ``load_lora_weights(weight_name=)``); without it the file is
            ``pytorch_lora_weights.safetensors``, else the only ``.safetensors`` file (several
            are an error naming them).

    Returns:
        A :class:`LoadedAdapters` handle (``.model``, ``.adapters``, ``.active``).

    Raises:
        UnresolvedModulesError: modules of the checkpoint are missing from the model (the message
            lists the first ones and, where one exists, the ``prefix_map`` that fixes them).
        ShapeMismatchError: a tensor does not fit its module (e.g. a resized vocabulary).
        UnsupportedFeatureError: the config uses a feature the loader does not implement, or a
            target is a layer type LoRA cannot wrap.
        InconsistentAdapterError / UnknownKeyError / AmbiguousMatchError: the checkpoint's tensors
            do not form a loadable adapter.
        ValueError: ``adapter_name`` is invalid or already loaded.

    Example:
        ```python
        model = AutoModelForCausalLM.from_pretrained("base")
        handle = adapterfmt.load(model, "my-adapter")
        model(**inputs)  # LoRA applied
        ```
    """
    model = as_model(model)
    check_new_name(get_registry(model, create=False), adapter_name)
    foreign = _foreign_file(path_or_hub_id, subfolder=subfolder, weight_name=weight_name, revision=revision)
    if foreign is not None:
        if prefix_map or allow_pickle or config is not None:
            raise TypeError("prefix_map / allow_pickle / config do not apply to a kohya or diffusers LoRA file")
        from .foreign import component_checkpoint

        return load_checkpoint(model, component_checkpoint(model, foreign, component=component), adapter_name, is_trainable)
    if component is not None:
        raise TypeError("component= applies to a kohya or diffusers LoRA file, not to a PEFT adapter")
    ckpt = _read(path_or_hub_id, config, adapter_name, subfolder=subfolder, revision=revision, allow_pickle=allow_pickle)
    return load_checkpoint(model, ckpt, adapter_name, is_trainable, prefix_map)


def load_checkpoint(
    model: ModelLike,
    ckpt: AdapterCheckpoint,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    is_trainable: bool = False,
    prefix_map: Optional[Mapping[str, str]] = None,
) -> LoadedAdapters:
    """:func:`load` of a checkpoint already read into records (a directory's, a state dict's, or a
    foreign file's component view, :mod:`adapterfmt.loading.foreign`)."""
    model = as_model(model)
    registry = get_registry(model, create=False)
    check_new_name(registry, adapter_name)
    refuse_unloadable(ckpt)
    prefix_map = dict(prefix_map or {})
    plan = plan_load(model, ckpt, prefix_map)
    tensors = _read_tensors(ckpt, plan, adapter_name)

    registry = get_registry(model, create=True)
    created: list[tuple[str, nn.Module]] = []
    try:
        _build(model, plan, adapter_name, registry, created, dropout=_dropout(ckpt.config))
        tied_values = _take_tied_values(plan, tensors, adapter_name, ckpt)
        _assign_all(model, plan, tensors, adapter_name, ckpt)
        _tie_copies(model, plan, tied_values, adapter_name, ckpt)
        # LoHa / LoKr wrap before the saved base tensors are copied in: the override keys that
        # save() reads back are then the wrapped ones (``lm_head.base_layer.weight``).
        factor_paths = load_factor_modules(model, ckpt, adapter_name, prefix_map, registry.active or [adapter_name], created)
        overrides = _apply_overrides(model, plan, ckpt)
        load_token_rows(model, ckpt, adapter_name, prefix_map, registry.active or [adapter_name], created)
        load_param_loras(model, ckpt, adapter_name, prefix_map, registry.active or [adapter_name], created)
        load_adalora(model, ckpt, adapter_name, prefix_map, registry.active or [adapter_name], created)
    except BaseException:
        remove_adapter(model, registry, adapter_name, created)
        raise
    info = AdapterInfo(
        name=adapter_name,
        config=dict(ckpt.source_config or ckpt.config.raw),
        lora_modules=[t.path for t in plan.lora] + factor_paths,
        full_copies=[c.path for c in plan.copies],
        prefix_map=prefix_map,
        overrides=overrides,
        source=ckpt.directory,
        findings=list(ckpt.findings),
    )
    register(registry, info)
    set_trainable(model, adapter_name, is_trainable)
    return LoadedAdapters(model)


def _foreign_file(source: Any, **where: Optional[str]) -> Optional[str]:
    """The local kohya / LyCORIS or diffusers LoRA file ``source`` names (a file, a folder or Hub
    repo holding one: downloaded through the cache), else ``None`` (:mod:`adapterfmt.formats.locate`)."""
    if isinstance(source, Mapping) or not isinstance(source, (str, os.PathLike)):
        if where.get("weight_name") is not None:
            raise TypeError("weight_name= names a file in a directory or Hub repo, not in a state dict")
        return None
    from ..formats.locate import locate_foreign

    found = locate_foreign(source, download=True, **where)
    return found.path if found is not None and found.format in ("kohya", "diffusers") else None


def _read(source: Any, config: Any, adapter_name: str, **read_options: Any) -> AdapterCheckpoint:
    """The checkpoint from a directory / Hub id (:func:`read_adapter`) or a state dict + config."""
    if isinstance(source, Mapping):
        if config is None:
            raise TypeError("load(model, state_dict) needs config= (an adapterfmt.LoraConfig or an adapter_config.json dict)")
        if any(read_options.values()):
            raise TypeError("subfolder / revision / allow_pickle apply to a path, not to a state dict")
        return read_state_dict(source, config, adapter_name)
    if config is not None:
        raise TypeError("config= is only for a state dict; a directory's adapter_config.json is its config")
    return read_adapter(source, **read_options)


def _read_tensors(ckpt: AdapterCheckpoint, plan: LoadPlan, name: str) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor under the model key it loads into, in its final dtype and device."""
    full_copy_modules = list(ckpt.full_copies)
    out: dict[str, torch.Tensor] = {}
    with TensorReader(ckpt.tensors_in_memory) as reader:
        for t in plan.lora:
            like = t.base.weight
            dtype = adapter_dtype(like)
            for slot, info in t.record.tensors.items():
                key = _model_key(t.record.keys[slot], t.path, name, full_copy_modules)
                out[key] = _finite(ckpt, info, reader.get(info)).to(device=like.device, dtype=dtype)
        for c in plan.copies:
            state = c.original.state_dict(keep_vars=True)
            for param, info in c.record.tensors.items():
                key = _model_key(c.record.keys[param], c.path, name, full_copy_modules)
                like = state[param]
                out[key] = _finite(ckpt, info, reader.get(info)).to(device=like.device, dtype=like.dtype)
    return out


def _finite(ckpt: AdapterCheckpoint, info: TensorInfo, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or NonFiniteValuesError: a NaN/Inf adapter would silently poison every output."""
    nan, inf = count_non_finite(tensor)
    if nan or inf:
        raise NonFiniteValuesError(
            f"holds {nan} NaN and {inf} Inf value(s) of {info.numel}",
            path=ckpt.weights_file,
            key=info.key,
            hint="the adapter is broken; retrain or re-export it",
        )
    return tensor


def _model_key(saved_key: str, model_path: str, name: str, full_copy_modules: list[str]) -> str:
    """The wrapped-model key a saved tensor loads into (keys.py's table; module path after prefix_map)."""
    parts = parse_saved(saved_key, full_copy_modules=full_copy_modules)
    return render_wrapped(parts._replace(module=model_path, prefix=""), adapter=name, prefix="")


def _build(
    model: nn.Module, plan: LoadPlan, name: str, registry: Registry, created: list[tuple[str, nn.Module]], *, dropout: float
) -> None:
    """Create the wrappers (or reuse existing ones) with empty ``meta`` placeholders for ``name``."""
    for t in plan.lora:
        layer = lora_layer_at(model, t.path, t.module, registry.active or [name], created)
        m = t.record
        layer.create_adapter(
            name,
            m.tensors["lora_A"].shape[0],
            alpha=m.alpha,
            scaling=m.scaling,
            dropout=dropout,
            lora_bias=m.lora_bias,
            use_dora=m.use_dora,
            device="meta",
        )
    for c in plan.copies:
        if c.tied_to is None:
            full_copy_at(model, c.path, c.module, registry.active or [name], created).add_copy(name, device="meta")
    for c in plan.copies:  # ensure_weight_tying heads: one parameter with the embedding's copy (tied again after loading)
        if c.tied_to is not None:
            source = find_module(model, c.tied_to).modules_to_save[name].weight
            full_copy_at(model, c.path, c.module, registry.active or [name], created).add_tied_copy(name, source)


def _dropout(cfg: LoraConfig) -> float:
    """``lora_dropout`` from the config (training only; eval mode never drops)."""
    value = cfg.raw.get("lora_dropout") or 0.0
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _assign_all(model: nn.Module, plan: LoadPlan, tensors: dict[str, torch.Tensor], name: str, ckpt: AdapterCheckpoint) -> None:
    """Put every tensor into its placeholder; each placeholder must get exactly one tensor."""
    placeholders: set[str] = set()
    for path in [t.path for t in plan.lora] + [c.path for c in plan.copies if c.tied_to is None]:
        wrapper = find_module(model, path)
        for key, value in wrapper.state_dict(keep_vars=True).items():
            parts = parse_model_key(f"{path}.{key}")
            if value.is_meta and parts is not None and parts.adapter == name:
                placeholders.add(f"{path}.{key}")
    unexpected = [k for k in tensors if k not in placeholders]
    if unexpected:
        raise InconsistentAdapterError(
            f"tensors with no place in the wrapped model: {listing(unexpected)}", path=ckpt.weights_file, key=unexpected[0]
        )
    for key, tensor in tensors.items():
        set_tensor(model, key, tensor)
    missing = sorted(placeholders - set(tensors))
    if missing:
        raise InconsistentAdapterError(
            f"the checkpoint has no value for {listing(missing)}", path=ckpt.weights_file, key=missing[0]
        )


def _take_tied_values(plan: LoadPlan, tensors: dict[str, torch.Tensor], name: str, ckpt: AdapterCheckpoint) -> dict[str, tuple[str, torch.Tensor]]:
    """Take the saved values of ``ensure_weight_tying`` head copies out of ``tensors``: head path ->
    (saved key, value). They share the embedding copy's parameter instead (:func:`_tie_copies`)."""
    full_copy_modules = list(ckpt.full_copies)
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for c in plan.copies:
        if c.tied_to is not None and "weight" in c.record.tensors:
            saved = c.record.keys["weight"]
            out[c.path] = (saved, tensors.pop(_model_key(saved, c.path, name, full_copy_modules)))
    return out


def _tie_copies(
    model: nn.Module, plan: LoadPlan, values: dict[str, tuple[str, torch.Tensor]], name: str, ckpt: AdapterCheckpoint
) -> None:
    """Point every tied head copy at its embedding copy's (now loaded) weight, as PEFT shares one
    parameter; a saved head value must equal it (PEFT saves the one tensor under both names)."""
    for c in plan.copies:
        if c.tied_to is None:
            continue
        source = find_module(model, c.tied_to).modules_to_save[name].weight
        if c.path in values:
            saved, value = values[c.path]
            if value.shape != source.shape or not torch.equal(value, source.detach()):
                raise InconsistentAdapterError(
                    f"ensure_weight_tying ties this copy to '{c.tied_to}', but the file holds different values for the two",
                    path=ckpt.weights_file,
                    key=saved,
                    hint="save both from one tied model, or set ensure_weight_tying to false to keep them apart",
                )
        find_module(model, c.path).modules_to_save[name].weight = source


def _apply_overrides(model: nn.Module, plan: LoadPlan, ckpt: AdapterCheckpoint) -> dict[str, str]:
    """Copy base tensors the checkpoint replaces into the (now wrapped) model, in place (keeps ties)."""
    if not plan.overrides:
        return {}
    infos = {ckpt.base_override_keys[k]: v for k, v in ckpt.base_overrides.items()}
    view = base_view(model)
    model_keys = base_view_keys(model)
    out: dict[str, str] = {}
    with TensorReader(ckpt.tensors_in_memory) as reader, torch.no_grad():
        for saved_key, base_key in plan.overrides.items():
            target = view[base_key]
            target.copy_(reader.get(infos[saved_key]).to(device=target.device, dtype=target.dtype))
            _, rest = split_prefix(saved_key)
            out[rest] = model_keys[base_key]
    return out


__all__ = ["load", "load_checkpoint"]
