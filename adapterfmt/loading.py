"""Put LoRA adapters on any torch model, in place, the way PEFT would — without importing PEFT.

:func:`load` rebuilds the wrappers from the checkpoint alone (:func:`~adapterfmt.describe.read_adapter`:
module paths, ranks from the tensors, scaling from the config), so the model's class needs no
table entry. The wrapped model has PEFT's module names and ``state_dict()`` keys
(``X.base_layer.weight``, ``X.lora_A.default.weight``, ``Y.modules_to_save.default.weight``) and
computes PEFT's outputs. :func:`save` writes PEFT's layout back; :func:`wrap` adds fresh adapters
as ``get_peft_model`` would. :func:`set_adapter`, :func:`disable_adapters`, :func:`merge`,
:func:`unmerge` and :func:`unload` manage several adapters on one model.

State lives on the model: the wrapper modules (:mod:`adapterfmt.layers`) and one small record of
the adapters' configs in the attribute ``_adapterfmt`` of the model passed in. Pass that same
(root) model to every function here. This module imports torch and safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .config import LoraConfig, parse_config
from .constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, DEFAULT_ADAPTER_NAME, PEFT_PREFIX
from .delta import CONV, CONV1D_TRANSPOSED, EMBEDDING, LINEAR
from .describe import AdapterCheckpoint, FullCopyModule, LoraModule, read_adapter
from .errors import (
    AmbiguousMatchError,
    InconsistentAdapterError,
    InvalidConfigError,
    MergeError,
    NonFiniteValuesError,
    OutputPathError,
    ShapeMismatchError,
    UnknownKeyError,
    UnresolvedModulesError,
    UnsupportedFeatureError,
)
from .findings import Finding
from .header import TensorInfo
from .keys import (
    LORA_ROLES,
    KeyParts,
    Role,
    parse_saved,
    parse_wrapped,
    render_base,
    render_saved,
    render_wrapped,
    split_prefix,
)
from .layers import FullCopy, LoraLayer, adapter_dtype, base_layout, iter_wrappers, make_lora_layer, plain_module_names
from .matching import TargetSelection, select_targets
from .resolution import suggest_prefix
from .scan import count_non_finite
from .torch_io import TensorReader

_REGISTRY_ATTR = "_adapterfmt"
_MAX_LISTED = 5
#: checkpoint layer kind -> base layouts it can apply to
_KIND_LAYOUTS = {
    "linear": (LINEAR, CONV1D_TRANSPOSED),
    "embedding": (EMBEDDING,),
    "conv1d": (CONV,),
    "conv2d": (CONV,),
    "conv3d": (CONV,),
}
#: modules PEFT refuses to save in full (containers have no forward)
_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


@dataclass
class AdapterInfo:
    """One adapter on a model.

    Attributes:
        name: the adapter name (``default``, ``second``, ...).
        config: the ``adapter_config.json`` content :func:`save` writes (as loaded, or built by :func:`wrap`).
        lora_modules: model paths of its LoRA layers.
        full_copies: model paths of its full copies.
        prefix_map: the module-path rewrite applied at load; :func:`save` undoes it.
        overrides: saved key (no prefix) -> model ``state_dict`` key, for base tensors the checkpoint
            replaced (embeddings saved in full, ``bias="all"``); written back by :func:`save`.
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
class _Registry:
    adapters: dict[str, AdapterInfo] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


class LoadedAdapters:
    """What :func:`load` and :func:`wrap` return: the model (changed in place) and its adapters.

    Every function of this module also accepts this handle in place of the model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return _registry(self.model).adapters

    @property
    def active(self) -> list[str]:
        return list(_registry(self.model).active)

    def __repr__(self) -> str:
        return f"LoadedAdapters({type(self.model).__name__}, adapters={list(self.adapters)}, active={self.active})"


ModelLike = Union[nn.Module, LoadedAdapters]


# ---------------------------------------------------------------------------------------------
# LOAD
# ---------------------------------------------------------------------------------------------


@dataclass
class _LoraTarget:
    record: LoraModule
    path: str  #: in the model
    module: nn.Module  #: what is there now (plain layer or an existing LoraLayer)
    base: nn.Module


@dataclass
class _CopyTarget:
    record: FullCopyModule
    path: str
    module: nn.Module  #: plain module or an existing FullCopy
    original: nn.Module


@dataclass
class _Plan:
    lora: list[_LoraTarget] = field(default_factory=list)
    copies: list[_CopyTarget] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)  #: saved key -> base key in the model


def load(
    model: ModelLike,
    path_or_hub_id: "str | os.PathLike[str]",
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    is_trainable: bool = False,
    prefix_map: Optional[Mapping[str, str]] = None,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    allow_pickle: bool = False,
) -> LoadedAdapters:
    """Wrap every module a LoRA adapter targets, in place, and load its tensors.

    The checkpoint alone decides what is wrapped: every LoRA module and full copy it holds must be
    found in ``model`` (module paths relative to the model, without ``base_model.model.``), every
    tensor is used exactly once, and nothing is changed unless all of that holds. The result has
    PEFT's module names and ``state_dict()`` keys and gives ``PeftModel.from_pretrained``'s outputs.

    The first adapter on a model becomes active; later ones are added inactive (switch with
    :func:`set_adapter`), as ``PeftModel.load_adapter`` does.

    Args:
        model (`torch.nn.Module`): any model; a transformers or diffusers model, or your own.
        path_or_hub_id (`str` or `os.PathLike`): adapter directory (``<dir>/<name>`` for a
            sub-adapter) or Hub repo id.
        adapter_name (`str`, *optional*, defaults to `"default"`): the name to load it under.
        is_trainable (`bool`, *optional*, defaults to `False`): `True`: this adapter's LoRA tensors
            and full copies require grad (and the biases its ``bias`` setting trains, as in PEFT)
            and every other parameter is frozen. `False`: no parameter requires grad and the
            model is put in eval mode.
        prefix_map (`dict`, *optional*): module-path prefix rewrites applied to the checkpoint's
            paths, e.g. ``{"model.": "language_model.model."}`` when the model nests the base
            differently from the one the adapter was trained on.
        subfolder / revision: passed to :func:`~adapterfmt.read_adapter`.
        allow_pickle (`bool`, *optional*, defaults to `False`): permit an ``adapter_model.bin``.

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
    model = _as_model(model)
    registry = _registry(model, create=False)
    _check_new_name(registry, adapter_name)
    ckpt = read_adapter(path_or_hub_id, subfolder=subfolder, revision=revision, allow_pickle=allow_pickle)
    _refuse_unloadable(ckpt)
    prefix_map = dict(prefix_map or {})
    plan = _plan(model, ckpt, prefix_map)
    tensors = _read_tensors(ckpt, plan, adapter_name)

    registry = _registry(model, create=True)
    created: list[tuple[str, nn.Module]] = []
    try:
        _build(model, plan, adapter_name, registry, created, dropout=_dropout(ckpt.config))
        _assign_all(model, plan, tensors, adapter_name, ckpt)
        overrides = _apply_overrides(model, plan, ckpt)
    except BaseException:
        _remove_adapter(model, adapter_name, created)
        if not registry.adapters:
            _drop_registry(model)
        raise
    info = AdapterInfo(
        name=adapter_name,
        config=dict(ckpt.config.raw),
        lora_modules=[t.path for t in plan.lora],
        full_copies=[c.path for c in plan.copies],
        prefix_map=prefix_map,
        overrides=overrides,
        source=ckpt.directory,
        findings=list(ckpt.findings),
    )
    _register(registry, info)
    _set_trainable(model, adapter_name, is_trainable)
    return LoadedAdapters(model)


def _refuse_unloadable(ckpt: AdapterCheckpoint) -> None:
    cfg = ckpt.config
    if cfg.unsupported:
        name, why = next(iter(cfg.unsupported.items()))
        raise UnsupportedFeatureError(f"{why}; adapterfmt.load does not support it", path=cfg.path, key=name)
    if ckpt.token_deltas:
        first = next(iter(ckpt.token_deltas.values()))
        raise UnsupportedFeatureError(
            "trainable-token adapters (trainable_token_indices) cannot be loaded by adapterfmt.load yet",
            path=ckpt.weights_file,
            key=first.key,
        )
    if ckpt.unknown_keys:
        raise UnknownKeyError(
            f"{len(ckpt.unknown_keys)} tensor(s) fit no rule of the format (not LoRA, not under a modules_to_save entry): "
            + _listing(ckpt.unknown_keys),
            path=ckpt.weights_file,
            key=ckpt.unknown_keys[0],
            hint="every tensor must be used exactly once; check the adapter's modules_to_save and keys",
        )
    if not ckpt.lora and not ckpt.full_copies:
        raise InconsistentAdapterError("holds no LoRA tensors and no full copies", path=ckpt.weights_file)
    for path, m in ckpt.lora.items():
        missing = [s for s in ("lora_A", "lora_B") if s not in m.tensors]
        if missing:
            raise InconsistentAdapterError(
                f"module '{path}' has no {missing[0]} (orphan LoRA tensor)", path=ckpt.weights_file, key=next(iter(m.keys.values()))
            )
        for copy_path in ckpt.full_copies:
            if path == copy_path or path.startswith(copy_path + "."):
                raise AmbiguousMatchError(
                    f"is both a LoRA target and inside the full copy '{copy_path}'",
                    path=ckpt.weights_file,
                    key=path,
                    hint="PEFT keeps only the full copy; remove the LoRA tensors or the full copy",
                )
        if m.use_dora != cfg.use_dora:
            raise InconsistentAdapterError(
                f"module '{path}' {'has' if m.use_dora else 'lacks'} a DoRA magnitude but use_dora is {cfg.use_dora}",
                path=ckpt.weights_file,
                key=m.keys["lora_A"],
                hint="fix use_dora in adapter_config.json or re-export the adapter",
            )
        if m.lora_bias != cfg.lora_bias:
            raise InconsistentAdapterError(
                f"module '{path}' {'has' if m.lora_bias else 'lacks'} a lora_B.bias but lora_bias is {cfg.lora_bias}",
                path=ckpt.weights_file,
                key=m.keys["lora_B"],
                hint="fix lora_bias in adapter_config.json or re-export the adapter",
            )


def _plan(model: nn.Module, ckpt: AdapterCheckpoint, prefix_map: dict[str, str]) -> _Plan:
    """Find every module of the checkpoint in the model and check every shape; changes nothing."""
    plan = _Plan()
    unresolved: list[str] = []
    for saved_path, m in ckpt.lora.items():
        path = _rename(saved_path, prefix_map)
        if path == "":
            raise UnsupportedFeatureError("LoRA on the root module itself cannot be wrapped in place", path=ckpt.weights_file, key=saved_path)
        module = _find_module(model, path)
        if module is None:
            unresolved.append(saved_path)
            continue
        if isinstance(module, FullCopy):
            raise AmbiguousMatchError(
                "is saved in full by another adapter on this model and cannot also get LoRA", path=ckpt.weights_file, key=path
            )
        base = _base_of(module)
        _check_lora_shapes(ckpt, m, path, base)
        plan.lora.append(_LoraTarget(m, path, module, base))
    for saved_path, c in ckpt.full_copies.items():
        path = _rename(saved_path, prefix_map)
        if path == "":
            raise UnsupportedFeatureError("a full copy of the root module cannot be wrapped in place", path=ckpt.weights_file, key=saved_path)
        module = _find_module(model, path)
        if module is None:
            unresolved.extend(f"{saved_path}.{p}" for p in c.tensors)
            continue
        if isinstance(module, LoraLayer):
            raise AmbiguousMatchError(
                "has LoRA from another adapter on this model and cannot also be saved in full", path=ckpt.weights_file, key=path
            )
        original = module.original_module if isinstance(module, FullCopy) else module
        if isinstance(original, _CONTAINERS):
            raise UnsupportedFeatureError(
                f"a {type(original).__name__} has no forward and cannot be saved in full (PEFT refuses it too)",
                path=ckpt.weights_file,
                key=saved_path,
            )
        unresolved.extend(_check_copy(ckpt, c, saved_path, original))
        plan.copies.append(_CopyTarget(c, path, module, original))
    base_view = _base_view(model) if ckpt.base_overrides or unresolved else {}
    for base_key, info in ckpt.base_overrides.items():
        key = _rename(base_key, prefix_map)
        saved_key = ckpt.base_override_keys[base_key]
        target = base_view.get(key)
        if target is None:
            unresolved.append(base_key)
            continue
        if tuple(target.shape) != tuple(info.shape):
            raise ShapeMismatchError(
                f"replaces base tensor '{key}' but has shape {list(info.shape)} where the model has {list(target.shape)}",
                path=ckpt.weights_file,
                key=saved_key,
            )
        plan.overrides[saved_key] = key
    if unresolved:
        raise _unresolved_error(model, ckpt, unresolved, base_view)
    return plan


def _check_lora_shapes(ckpt: AdapterCheckpoint, m: LoraModule, path: str, base: nn.Module) -> None:
    layout = base_layout(base)
    where = ckpt.weights_file
    if layout is None:
        raise UnsupportedFeatureError(
            f"is a {type(base).__name__}; LoRA can wrap nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding",
            path=where,
            key=path,
        )
    if layout not in _KIND_LAYOUTS.get(m.layer_kind, ()) or (layout == CONV and base.weight.dim() != len(m.tensors["lora_A"].shape)):
        raise ShapeMismatchError(
            f"the checkpoint holds {m.layer_kind} LoRA tensors (lora_A {list(m.tensors['lora_A'].shape)}) but the model's "
            f"module is a {type(base).__name__} with weight {list(base.weight.shape)}",
            path=where,
            key=m.keys["lora_A"],
        )
    w = tuple(base.weight.shape)
    rank = m.tensors["lora_A"].shape[0]
    groups = getattr(base, "groups", 1)
    if layout == CONV and rank % groups:
        raise ShapeMismatchError(
            f"rank {rank} is not divisible by the convolution's groups={groups}", path=where, key=m.keys["lora_A"]
        )
    if layout == LINEAR:
        out_f, in_f = w
    elif layout == CONV1D_TRANSPOSED:
        in_f, out_f = w
    elif layout == EMBEDDING:
        in_f, out_f = w  # (V, D)
    else:
        out_f, in_f = base.out_channels, base.in_channels
    ones = (1,) * (len(w) - 2)
    expected = {
        "lora_A": (rank, in_f) + (tuple(base.kernel_size) if layout == CONV else ()),
        "lora_B": (out_f, rank // groups) + ones,
        "lora_B.bias": (out_f,),
        "magnitude": (1, out_f) + ones if layout == CONV else (out_f,),
    }
    for slot, info in m.tensors.items():
        if tuple(info.shape) != expected[slot]:
            raise ShapeMismatchError(
                f"has shape {list(info.shape)} but the model's {type(base).__name__} '{path}' (weight "
                f"{list(w)}) needs {list(expected[slot])}",
                path=where,
                key=m.keys[slot],
                hint="the adapter was trained on a model with other dimensions (a resized vocabulary?)",
            )


def _check_copy(ckpt: AdapterCheckpoint, c: FullCopyModule, saved_path: str, original: nn.Module) -> list[str]:
    """Check a full copy against its module; returns the checkpoint entries with no place in it."""
    state = original.state_dict(keep_vars=True)
    missing = [p for p in state if p not in c.tensors]
    if missing:
        raise InconsistentAdapterError(
            f"full copy '{saved_path}' lacks {', '.join(missing)} that the model's {type(original).__name__} has",
            path=ckpt.weights_file,
            key=next(iter(c.keys.values())),
            hint="a full copy must hold every tensor of its module (PEFT raises KeyError on it too)",
        )
    extra = []
    for param, info in c.tensors.items():
        if param not in state:
            extra.append(f"{saved_path}.{param}")
        elif tuple(state[param].shape) != tuple(info.shape):
            raise ShapeMismatchError(
                f"full copy has shape {list(info.shape)} but the model's '{saved_path}.{param}' has {list(state[param].shape)}",
                path=ckpt.weights_file,
                key=c.keys[param],
                hint="the adapter was trained on a model with other dimensions (a resized vocabulary?)",
            )
    return extra


def _unresolved_error(
    model: nn.Module, ckpt: AdapterCheckpoint, unresolved: list[str], base_view: dict[str, torch.Tensor]
) -> UnresolvedModulesError:
    suggestion = suggest_prefix(unresolved, list(base_view), ckpt)
    if suggestion:
        hint = f"the model nests them under another path; pass prefix_map={{{suggestion[0]!r}: {suggestion[1]!r}}}"
    else:
        hint = "is this adapter for this model? if the model wraps the base under another name, pass prefix_map"
    return UnresolvedModulesError(
        f"{len(unresolved)} adapter module(s) not found in the {type(model).__name__}: {_listing(unresolved)}",
        unresolved=unresolved,
        suggestion=suggestion,
        path=ckpt.weights_file,
        key=unresolved[0],
        hint=hint,
    )


def _read_tensors(ckpt: AdapterCheckpoint, plan: _Plan, name: str) -> dict[str, torch.Tensor]:
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
    return render_wrapped(replace(parts, module=model_path, prefix=""), adapter=name, prefix="")


def _build(
    model: nn.Module, plan: _Plan, name: str, registry: _Registry, created: list[tuple[str, nn.Module]], *, dropout: float
) -> None:
    """Create the wrappers (or reuse existing ones) with empty ``meta`` placeholders for ``name``."""
    for t in plan.lora:
        layer = t.module
        if not isinstance(layer, LoraLayer):
            layer = make_lora_layer(t.module)
            layer.active_adapters = list(registry.active or [name])
            _replace_module(model, t.path, layer)
            created.append((t.path, t.module))
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
        wrapper = c.module
        if not isinstance(wrapper, FullCopy):
            wrapper = FullCopy(c.module)
            wrapper.active_adapters = list(registry.active or [name])
            _replace_module(model, c.path, wrapper)
            created.append((c.path, c.module))
        wrapper.add_copy(name, device="meta")


def _dropout(cfg: LoraConfig) -> float:
    """``lora_dropout`` from the config (training only; eval mode never drops)."""
    value = cfg.raw.get("lora_dropout") or 0.0
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _assign_all(model: nn.Module, plan: _Plan, tensors: dict[str, torch.Tensor], name: str, ckpt: AdapterCheckpoint) -> None:
    """Put every tensor into its placeholder; each placeholder must get exactly one tensor."""
    placeholders: set[str] = set()
    for path in [t.path for t in plan.lora] + [c.path for c in plan.copies]:
        wrapper = _find_module(model, path)
        for key, value in wrapper.state_dict(keep_vars=True).items():
            parts = _parse_model_key(f"{path}.{key}")
            if value.is_meta and parts is not None and parts.adapter == name:
                placeholders.add(f"{path}.{key}")
    unexpected = [k for k in tensors if k not in placeholders]
    if unexpected:
        raise InconsistentAdapterError(
            f"tensors with no place in the wrapped model: {_listing(unexpected)}", path=ckpt.weights_file, key=unexpected[0]
        )
    for key, tensor in tensors.items():
        _set_tensor(model, key, tensor)
    missing = sorted(placeholders - set(tensors))
    if missing:
        raise InconsistentAdapterError(
            f"the checkpoint has no value for {_listing(missing)}", path=ckpt.weights_file, key=missing[0]
        )


def _apply_overrides(model: nn.Module, plan: _Plan, ckpt: AdapterCheckpoint) -> dict[str, str]:
    """Copy base tensors the checkpoint replaces into the (now wrapped) model, in place (keeps ties)."""
    if not plan.overrides:
        return {}
    infos = {ckpt.base_override_keys[k]: v for k, v in ckpt.base_overrides.items()}
    base_view = _base_view(model)
    model_keys = _base_view_keys(model)
    out: dict[str, str] = {}
    with TensorReader(ckpt.tensors_in_memory) as reader, torch.no_grad():
        for saved_key, base_key in plan.overrides.items():
            target = base_view[base_key]
            target.copy_(reader.get(infos[saved_key]).to(device=target.device, dtype=target.dtype))
            _, rest = split_prefix(saved_key)
            out[rest] = model_keys[base_key]
    return out


# ---------------------------------------------------------------------------------------------
# SAVE
# ---------------------------------------------------------------------------------------------


def save(model: ModelLike, path: "str | os.PathLike[str]", adapter_name: Optional[str] = DEFAULT_ADAPTER_NAME) -> None:
    """Write an adapter in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Keys are PEFT's saved keys (``base_model.model.X.lora_A.weight``, full copies under the
    module's own path), rendered through :mod:`adapterfmt.keys`; tensors that share storage are
    cloned and the file carries ``{"format": "pt"}`` metadata. The adapter ``default`` goes into
    ``path``, any other adapter ``X`` into ``path/X/``, as ``PeftModel.save_pretrained`` does.
    Files are written to a temporary name and renamed into place.

    Args:
        model: a model with adapters (from :func:`load` or :func:`wrap`), or its handle.
        path: the output directory (created if needed).
        adapter_name (`str` or `None`, *optional*, defaults to `"default"`): the adapter to
            write; `None` writes every adapter.

    Raises:
        ValueError: the model has no adapter of that name.
        OutputPathError: ``path`` (or a sub-adapter folder) exists and is not a directory.
    """
    model = _as_model(model)
    registry = _registry(model)
    names = list(registry.adapters) if adapter_name is None else [adapter_name]
    for name in names:
        info = _info(registry, name)
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
    model = _as_model(model)
    info = _info(_registry(model), adapter_name)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = _parse_model_key(key)
        if parts is None or parts.adapter != adapter_name or not (parts.role in LORA_ROLES or parts.role is Role.FULL_COPY):
            continue
        saved = replace(parts, module=_unrename(parts.module, info.prefix_map))
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


# ---------------------------------------------------------------------------------------------
# WRAP
# ---------------------------------------------------------------------------------------------


def wrap(
    model: ModelLike,
    target_modules: "Sequence[str] | str | None" = None,
    *,
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

    Matching (docs/FORMAT.md §5, :mod:`adapterfmt.matching`): a list entry matches a module named
    exactly so or ending in ``"." + entry``; a string is a regular expression the whole name must
    match (``r".*\\.(?!11)\\d+\\.fc1$"``); ``"all-linear"`` means every Linear / Conv1D except the
    model's output embedding; ``exclude_modules`` always wins. ``modules_to_save`` entries must each
    name exactly one module. Layers are created in ``named_modules()`` order with PEFT's
    initialisation, so under the same seed the new tensors equal ``get_peft_model``'s.

    Afterwards only this adapter's tensors and full copies require grad. The first adapter on a
    model becomes active; a later one is added inactive (see :func:`set_adapter`).

    Args:
        model (`torch.nn.Module`): any model (or a handle).
        target_modules (`list[str]` or `str`): modules to give LoRA; required, since adapterfmt
            has no per-architecture defaults.
        exclude_modules (`list[str]` or `str`, *optional*): modules never to target.
        modules_to_save (`list[str]`, *optional*): modules to train and save in full.
        r, lora_alpha, lora_dropout, use_rslora, use_dora, lora_bias, rank_pattern, alpha_pattern,
        layers_to_transform, layers_pattern, init_lora_weights: as in PEFT's ``LoraConfig``
            (``init_lora_weights``: `True`, `False` or `"gaussian"`).
        adapter_name (`str`, *optional*, defaults to `"default"`).

    Returns:
        A :class:`LoadedAdapters` handle; save the trained adapter with :func:`save`.

    Raises:
        AmbiguousMatchError: a ``modules_to_save`` entry matches several modules (or PEFT's loose
            suffix rule would bind others too), or a module is both a LoRA target and a module to save.
        UnresolvedModulesError: ``target_modules`` / ``modules_to_save`` match nothing.
        UnsupportedFeatureError: a target is a layer type LoRA cannot wrap, or ``lora_bias`` on an embedding.
        InvalidConfigError: invalid values (``r <= 0``, a bad regular expression, ...) or no
            ``target_modules``.
        ValueError: ``adapter_name`` is invalid or already present.
    """
    model = _as_model(model)
    registry = _registry(model, create=False)
    _check_new_name(registry, adapter_name)
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
    if any(base_layout(_base_of(modules[t])) == CONV1D_TRANSPOSED for t in sel.lora_targets):
        doc["fan_in_fan_out"] = True

    registry = _registry(model, create=True)
    created: list[tuple[str, nn.Module]] = []
    copies = [ms[0] for ms in sel.full_copies.values()]
    try:
        for path in sel.lora_targets:
            layer = modules[path]
            if not isinstance(layer, LoraLayer):
                layer = make_lora_layer(modules[path])
                layer.active_adapters = list(registry.active or [adapter_name])
                _replace_module(model, path, layer)
                created.append((path, modules[path]))
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
            wrapper = modules[path]
            if not isinstance(wrapper, FullCopy):
                wrapper = FullCopy(modules[path])
                wrapper.active_adapters = list(registry.active or [adapter_name])
                _replace_module(model, path, wrapper)
                created.append((path, modules[path]))
            wrapper.add_copy(adapter_name)
    except BaseException:
        _remove_adapter(model, adapter_name, created)
        if not registry.adapters:
            _drop_registry(model)
        raise
    _register(registry, AdapterInfo(adapter_name, doc, list(sel.lora_targets), copies))
    _set_trainable(model, adapter_name, True)
    return LoadedAdapters(model)


def _all_linear(model: nn.Module, named: list[tuple[str, nn.Module]]) -> list[str]:
    """``all-linear`` as PEFT expands it: every Linear / Conv1D by full name, minus the output embedding."""
    out_emb = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        out_emb = getter()
    return [
        n
        for n, m in named
        if base_layout(_base_of(m)) in (LINEAR, CONV1D_TRANSPOSED) and not isinstance(m, FullCopy) and m is not out_emb
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
        base = _base_of(module)
        layout = base_layout(base)
        if layout is None:
            raise UnsupportedFeatureError(
                f"is a {type(base).__name__}; LoRA can wrap nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding",
                key=path,
                hint="narrow target_modules to supported layers",
            )
        if lora_bias and layout == EMBEDDING:
            raise UnsupportedFeatureError("lora_bias is not supported on embedding layers", key=path)
        rank = cfg.rank_for(path)
        if layout == CONV and rank % base.groups:
            raise UnsupportedFeatureError(f"rank {rank} is not divisible by the convolution's groups={base.groups}", key=path)
    for entry, matched in sel.full_copies.items():
        module = modules[matched[0]]
        if isinstance(module, LoraLayer):
            raise AmbiguousMatchError("has LoRA from another adapter and cannot also be saved in full", key=matched[0])
        original = module.original_module if isinstance(module, FullCopy) else module
        if isinstance(original, _CONTAINERS):
            raise UnsupportedFeatureError(f"a {type(original).__name__} cannot be saved in full", key=matched[0])


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
    model = _as_model(model)
    registry = _registry(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for name in names:
        _info(registry, name)
    wrappers = list(iter_wrappers(model))
    for path, w in wrappers:
        if isinstance(w, LoraLayer) and w.merged:
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
    model = _as_model(model)
    wrappers = [w for _, w in iter_wrappers(model)]
    merged = {id(w): list(w.merged_adapters) for w in wrappers if isinstance(w, LoraLayer) and w.merged}
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

    Uses :mod:`adapterfmt.delta` (``W + ΣΔW`` in float32, one rounding; DoRA's normalised weight),
    the same math as the merge engine. Forward then runs the base layers only; :func:`unmerge`
    takes the deltas out again (DoRA layers restore the exact previous weight). Full copies need no
    merge: the active copy is already in use.

    Raises:
        ValueError: an unknown adapter name.
        MergeError: a layer cannot be merged (DoRA together with another adapter, conv groups > 1,
            ``lora_bias`` without a base bias).
    """
    model = _as_model(model)
    registry = _registry(model)
    names = list(registry.active if adapter_names is None else adapter_names)
    for name in names:
        _info(registry, name)
    for path, w in iter_wrappers(model):
        if isinstance(w, LoraLayer):
            try:
                w.merge(names)
            except ValueError as e:
                raise MergeError(str(e), key=path) from None


def unmerge(model: ModelLike) -> None:
    """Take every merged adapter back out of the base weights."""
    model = _as_model(model)
    for _, w in iter_wrappers(model):
        if isinstance(w, LoraLayer):
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
    model = _as_model(model)
    registry = _registry(model)
    wrappers = list(iter_wrappers(model))
    if merge:
        for path, w in wrappers:
            if isinstance(w, LoraLayer):
                try:
                    w.merge(registry.active)
                except ValueError as e:
                    raise MergeError(str(e), key=path) from None
    for path, w in wrappers:
        if isinstance(w, LoraLayer):
            if not merge:
                w.unmerge()
            _replace_module(model, path, w.base_layer)
        else:
            _replace_module(model, path, w.active_module if merge else w.original_module)
    _drop_registry(model)
    return model


def freeze_full_copies(model: ModelLike, adapter_name: Optional[str] = None) -> None:
    """Stop gradients to the full copies (``modules_to_save``) of one adapter, or of all."""
    _full_copies_requires_grad(_as_model(model), adapter_name, False)


def unfreeze_full_copies(model: ModelLike, adapter_name: Optional[str] = None) -> None:
    """Let the full copies (``modules_to_save``) of one adapter, or of all, require grad."""
    _full_copies_requires_grad(_as_model(model), adapter_name, True)


def _full_copies_requires_grad(model: nn.Module, adapter_name: Optional[str], flag: bool) -> None:
    if adapter_name is not None:
        _info(_registry(model), adapter_name)
    for _, w in iter_wrappers(model):
        if isinstance(w, FullCopy):
            for name, copy in w.modules_to_save.items():
                if adapter_name is None or name == adapter_name:
                    copy.requires_grad_(flag)


def _set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Freeze everything; if ``trainable``, unfreeze adapter ``name`` as PEFT's training setup does:
    its LoRA tensors and full copies, plus the biases its config trains (``bias="all"``: every
    parameter named ``bias`` except in the originals of full copies; ``"lora_only"``: the biases
    of LoRA-wrapped layers)."""
    model.requires_grad_(False)
    if not trainable:
        model.eval()
        return
    bias = _registry(model).adapters[name].config.get("bias")
    for _, w in iter_wrappers(model):
        if isinstance(w, LoraLayer):
            for p in w.adapter_parameters(name):
                p.requires_grad_(True)
            if bias == "lora_only" and w.base_layer.bias is not None:
                w.base_layer.bias.requires_grad_(True)
        elif name in w.modules_to_save:
            w.modules_to_save[name].requires_grad_(True)
    if bias == "all":
        for key, p in model.named_parameters():
            if key.rpartition(".")[2] == "bias":
                p.requires_grad_(True)
        for _, w in iter_wrappers(model):
            if isinstance(w, FullCopy):
                w.original_module.requires_grad_(False)  # the original under a full copy stays frozen


# ---------------------------------------------------------------------------------------------
# HELPERS
# ---------------------------------------------------------------------------------------------


def _as_model(model: ModelLike) -> nn.Module:
    if isinstance(model, LoadedAdapters):
        return model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return model


def _registry(model: nn.Module, create: Optional[bool] = None) -> _Registry:
    """The adapter record of ``model``. ``create=None``: it must exist; ``False``: an empty one if absent."""
    reg = model.__dict__.get(_REGISTRY_ATTR)
    if reg is None:
        if create is None:
            raise ValueError(f"this {type(model).__name__} has no adapters; use adapterfmt.load or adapterfmt.wrap first")
        reg = _Registry()
        if create:
            model.__dict__[_REGISTRY_ATTR] = reg
    return reg


def _drop_registry(model: nn.Module) -> None:
    model.__dict__.pop(_REGISTRY_ATTR, None)


def _register(registry: _Registry, info: AdapterInfo) -> None:
    registry.adapters[info.name] = info
    if not registry.active:
        registry.active = [info.name]


def _info(registry: _Registry, name: str) -> AdapterInfo:
    if name not in registry.adapters:
        raise ValueError(f"no adapter named {name!r}; the model has {sorted(registry.adapters)}")
    return registry.adapters[name]


def _check_new_name(registry: _Registry, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in registry.adapters:
        raise ValueError(f"an adapter named {name!r} is already on this model; pick another adapter_name")


def _remove_adapter(model: nn.Module, name: str, created: list[tuple[str, nn.Module]]) -> None:
    """Undo a failed load/wrap: drop ``name`` everywhere and put back the modules it replaced."""
    for _, w in list(iter_wrappers(model)):
        w.delete_adapter(name)
    for path, original in reversed(created):
        _replace_module(model, path, original)


def _find_module(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The module at ``path``, following registered children only (no attribute fall-through)."""
    module = model
    for seg in path.split(".") if path else []:
        module = module._modules.get(seg)
        if module is None:
            return None
    return module


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = _find_module(model, parent_path)
    setattr(parent, child, new)


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = key.rpartition(".")
    owner = _find_module(model, owner_path)
    if leaf in owner._parameters:
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=False))
    else:
        setattr(owner, leaf, tensor)


def _rename(path: str, prefix_map: Mapping[str, str]) -> str:
    for old, new in prefix_map.items():
        if path.startswith(old):
            return new + path[len(old) :]
    return path


def _unrename(path: str, prefix_map: Mapping[str, str]) -> str:
    for old, new in prefix_map.items():
        if path.startswith(new):
            return old + path[len(new) :]
    return path


def _parse_model_key(key: str) -> Optional[KeyParts]:
    try:
        return parse_wrapped(key, prefix="")
    except UnknownKeyError:
        return None


_BASE_ROLES = (Role.PLAIN, Role.BASE_LAYER, Role.ORIGINAL)


def _base_view_keys(model: nn.Module) -> dict[str, str]:
    """Base key (``X.weight``) -> the model's own key for it (``X.base_layer.weight`` when wrapped)."""
    out: dict[str, str] = {}
    for key in model.state_dict(keep_vars=True):
        parts = _parse_model_key(key)
        if parts is not None and parts.role in _BASE_ROLES:
            out.setdefault(render_base(parts), key)
        elif parts is None:
            out.setdefault(key, key)
    return out


def _base_view(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their base keys, as if no adapter were applied."""
    state = model.state_dict(keep_vars=True)
    return {base: state[key] for base, key in _base_view_keys(model).items()}


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


__all__ = [
    "AdapterInfo",
    "LoadedAdapters",
    "adapter_state_dict",
    "disable_adapters",
    "freeze_full_copies",
    "load",
    "merge",
    "save",
    "set_adapter",
    "unfreeze_full_copies",
    "unload",
    "unmerge",
    "wrap",
]
