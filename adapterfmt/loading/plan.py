"""Decide what :func:`~adapterfmt.load` will do to a model, or refuse, before anything changes.

:func:`refuse_unloadable` checks the checkpoint on its own (every tensor has a place in the
format, no unsupported feature, LoRA and config agree); :func:`plan_load` finds every LoRA module,
full copy and replaced base tensor of the checkpoint in the model (after ``prefix_map``) and checks
every shape. Modules missing from the model are collected and reported together, with the
``prefix_map`` that would fix them where one exists. This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..base.resolution import suggest_prefix
from ..checkpoint.matching import apply_prefix_map, is_within
from ..checkpoint.weight_tying import ensures_tying
from ..deltas.lora import CONV, CONV1D_TRANSPOSED, EMBEDDING, LINEAR
from ..errors import (
    AmbiguousMatchError,
    InconsistentAdapterError,
    InvalidConfigError,
    ShapeMismatchError,
    UnknownKeyError,
    UnresolvedModulesError,
    UnsupportedFeatureError,
)
from ..formats.peft.reading import AdapterCheckpoint, FullCopyModule, LoraModule
from ..layers.full_copy import FullCopy, plain_module_names
from ..layers.lora import LoraLayer
from ..layers.types import supported_layout
from ..merging.checks import refuse_non_float
from .adalora import is_adalora_checkpoint
from .lycoris import refuse_unloadable_factors
from .module_tree import CONTAINERS, base_of, base_view, find_module, original_of
from .params import is_param_lora

_MAX_LISTED = 5
#: checkpoint layer kind -> base layouts it can apply to
_KIND_LAYOUTS = {
    "linear": (LINEAR, CONV1D_TRANSPOSED),
    "embedding": (EMBEDDING,),
    "conv1d": (CONV,),
    "conv2d": (CONV,),
    "conv3d": (CONV,),
}


@dataclass
class LoraTarget:
    record: LoraModule
    path: str  #: in the model
    module: nn.Module  #: what is there now (plain layer or an existing LoraLayer)
    base: nn.Module


@dataclass
class CopyTarget:
    record: FullCopyModule
    path: str
    module: nn.Module  #: plain module or an existing FullCopy
    original: nn.Module
    #: ``ensure_weight_tying``: the path of the embedding copy whose weight this (head) copy shares
    tied_to: Optional[str] = None


@dataclass
class LoadPlan:
    lora: list[LoraTarget] = field(default_factory=list)
    copies: list[CopyTarget] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)  #: saved key -> base key in the model


def refuse_unloadable(ckpt: AdapterCheckpoint) -> None:
    """Raise unless the checkpoint on its own forms an adapter :func:`~adapterfmt.load` can apply."""
    cfg = ckpt.config
    if cfg.unsupported:
        name, why = next(iter(cfg.unsupported.items()))
        raise UnsupportedFeatureError(f"{why}; adapterfmt.load does not support it", path=cfg.path, key=name)
    for td in ckpt.token_deltas.values():
        if td.indices is None:
            raise InvalidConfigError(
                f"trainable_token_indices names no indices for '{td.path}'", path=cfg.path, key="trainable_token_indices", hint="fix adapter_config.json"
            )
    if ckpt.unknown_keys:
        raise UnknownKeyError(
            f"{len(ckpt.unknown_keys)} tensor(s) fit no rule of the format (not LoRA, not under a modules_to_save entry): "
            + listing(ckpt.unknown_keys),
            path=ckpt.weights_file,
            key=ckpt.unknown_keys[0],
            hint="every tensor must be used exactly once; check the adapter's modules_to_save and keys",
        )
    if not ckpt.lora and not ckpt.full_copies:
        raise InconsistentAdapterError("holds no LoRA tensors and no full copies", path=ckpt.weights_file)
    refuse_unloadable_factors(ckpt)
    for path, m in ckpt.lora.items():
        for info in m.tensors.values():  # an integer or float8 "LoRA" would be cast silently, or crash the finite check
            refuse_non_float(info, info.key, ckpt.weights_file)
        for copy_path in ckpt.full_copies:
            if is_within(path, copy_path):
                raise AmbiguousMatchError(
                    f"is both a {m.factors or 'LoRA'} target and inside the full copy '{copy_path}'",
                    path=ckpt.weights_file,
                    key=path,
                    hint=f"PEFT keeps only the full copy; remove the {m.factors or 'LoRA'} tensors or the full copy",
                )
        if m.factors is not None:
            continue  # LoHa / LoKr: lycoris_loading.py
        missing = [s for s in ("lora_A", "lora_B") if s not in m.tensors]
        if missing:
            raise InconsistentAdapterError(
                f"module '{path}' has no {missing[0]} (orphan LoRA tensor)", path=ckpt.weights_file, key=next(iter(m.keys.values()))
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


def plan_load(model: nn.Module, ckpt: AdapterCheckpoint, prefix_map: dict[str, str]) -> LoadPlan:
    """Find every module of the checkpoint in the model and check every shape; changes nothing."""
    plan = LoadPlan()
    unresolved: list[str] = []
    for saved_path, m in ckpt.lora.items():
        if is_param_lora(ckpt, saved_path) or is_adalora_checkpoint(ckpt) or m.factors is not None:
            continue  # LoRA on a parameter: param_loading.py; AdaLoRA: adalora_loading.py; LoHa / LoKr: lycoris_loading.py
        path = apply_prefix_map(saved_path, prefix_map)
        if path == "":
            raise UnsupportedFeatureError("LoRA on the root module itself cannot be wrapped in place", path=ckpt.weights_file, key=saved_path)
        module = find_module(model, path)
        if module is None:
            unresolved.append(saved_path)
            continue
        if isinstance(module, FullCopy):
            raise AmbiguousMatchError(
                "is saved in full by another adapter on this model and cannot also get LoRA", path=ckpt.weights_file, key=path
            )
        base = base_of(module)
        _check_lora_shapes(ckpt, m, path, base)
        plan.lora.append(LoraTarget(m, path, module, base))
    for saved_path, c in ckpt.full_copies.items():
        path = apply_prefix_map(saved_path, prefix_map)
        if path == "":
            raise UnsupportedFeatureError("a full copy of the root module cannot be wrapped in place", path=ckpt.weights_file, key=saved_path)
        module = find_module(model, path)
        if module is None:
            unresolved.extend(f"{saved_path}.{p}" for p in c.tensors)
            continue
        if isinstance(module, LoraLayer):
            raise AmbiguousMatchError(
                "has LoRA from another adapter on this model and cannot also be saved in full", path=ckpt.weights_file, key=path
            )
        original = original_of(module)
        if isinstance(original, CONTAINERS):
            raise UnsupportedFeatureError(
                f"a {type(original).__name__} has no forward and cannot be saved in full (PEFT refuses it too)",
                path=ckpt.weights_file,
                key=saved_path,
            )
        unresolved.extend(_check_copy(ckpt, c, saved_path, original))
        plan.copies.append(CopyTarget(c, path, module, original))
    if ensures_tying(ckpt):
        _plan_tied_copies(model, ckpt, plan)
    view = base_view(model) if ckpt.base_overrides or unresolved else {}
    for base_key, info in ckpt.base_overrides.items():
        key = apply_prefix_map(base_key, prefix_map)
        saved_key = ckpt.base_override_keys[base_key]
        target = view.get(key)
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
        raise _unresolved_error(model, ckpt, unresolved, view)
    return plan


def _plan_tied_copies(model: nn.Module, ckpt: AdapterCheckpoint, plan: LoadPlan) -> None:
    """``ensure_weight_tying`` with an embedding saved in full: every ``nn.Linear`` head whose weight
    is that embedding's weight gets a copy sharing the embedding copy's weight, as PEFT builds it
    (``modules_to_tie``), whether or not the file holds the head's tensor (PEFT saves it, equal)."""
    by_path = {c.path: c for c in plan.copies}
    for emb in list(plan.copies):
        if not isinstance(emb.original, nn.Embedding):
            continue
        for path, module in plain_module_names(model):
            head = original_of(module)
            if head is emb.original or not isinstance(head, nn.Linear) or head.weight is not emb.original.weight:
                continue
            if isinstance(module, LoraLayer):
                raise AmbiguousMatchError(
                    f"is tied to '{emb.path}' (ensure_weight_tying) but has LoRA from another adapter on this model",
                    path=ckpt.weights_file, key=path,
                )
            target = by_path.get(path)
            if target is None:
                target = CopyTarget(FullCopyModule(path), path, module, head)
                plan.copies.append(target)
            extra = sorted(set(target.record.tensors) - {"weight"})
            if extra:
                raise InconsistentAdapterError(
                    f"is tied to '{emb.path}' (ensure_weight_tying), whose copy has a weight only, but the file also holds its {', '.join(extra)}",
                    path=ckpt.weights_file, key=target.record.keys[extra[0]],
                )
            target.tied_to = emb.path


def _check_lora_shapes(ckpt: AdapterCheckpoint, m: LoraModule, path: str, base: nn.Module) -> None:
    where = ckpt.weights_file
    layout = supported_layout(base, path, path=where)
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
    model: nn.Module, ckpt: AdapterCheckpoint, unresolved: list[str], view: dict[str, torch.Tensor]
) -> UnresolvedModulesError:
    suggestion = suggest_prefix(unresolved, list(view), ckpt)
    if suggestion:
        hint = f"the model nests them under another path; pass prefix_map={{{suggestion[0]!r}: {suggestion[1]!r}}}"
    else:
        hint = "is this adapter for this model? if the model wraps the base under another name, pass prefix_map"
    return UnresolvedModulesError(
        f"{len(unresolved)} adapter module(s) not found in the {type(model).__name__}: {listing(unresolved)}",
        unresolved=unresolved,
        suggestion=suggestion,
        path=ckpt.weights_file,
        key=unresolved[0],
        hint=hint,
    )


def listing(items: Sequence[str]) -> str:
    """The first few ``items`` quoted, then how many more, for one-line error messages."""
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
