"""The base of each component a foreign file adapts, and the file checked against it (headers only).

``--base`` is either one component directory (a diffusers model folder or a transformers text
encoder folder) or a diffusers pipeline directory (``model_index.json`` with one sub-folder per
component). Weights are read with :func:`adapterfmt.base.reading.read_base` — the one base reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ...base.reading import BaseModel, read_base
from ...constants import FLOAT_DTYPES
from ...errors import AmbiguousMatchError, CheckpointNotFoundError
from ...base.resolution import bind_base_tensor, bind_full_copy
from ...checkpoint.keys import weight_key
from .names import base_module_paths, resolve_names
from .records import ForeignCheckpoint

PIPELINE_INDEX = "model_index.json"


def is_pipeline(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PIPELINE_INDEX))


def read_component(directory: str) -> BaseModel:
    """A component folder's weights, from headers (transformers or diffusers layout), read by the
    one base reader, :func:`adapterfmt.base.reading.read_base`: merged, it keeps that folder's own layout."""
    return read_base(directory)


def pick_component(ckpt: ForeignCheckpoint, component: Optional[str], base: str) -> str:
    """The component of ``ckpt`` a single component directory ``base`` stands for.

    Raises:
        AmbiguousMatchError: the file adapts several components and ``component`` is not given.
        CheckpointNotFoundError: ``component`` is not in the file.
    """
    present = ckpt.components
    if component is not None:
        if component not in present:
            raise CheckpointNotFoundError(
                f"has no modules for component {component!r}", path=ckpt.file, hint=f"it adapts {', '.join(present) or 'nothing'}"
            )
        return component
    if len(present) == 1:
        return present[0]
    raise AmbiguousMatchError(
        f"adapts {', '.join(present)}; {base} is one component directory",
        path=ckpt.file,
        hint="pass --component NAME, or give the pipeline directory as --base",
    )


def component_bases(ckpt: ForeignCheckpoint, base: str, component: Optional[str] = None) -> dict[str, BaseModel]:
    """component -> its base, for a pipeline directory (every component of the file, or the one
    named) or for a single component directory."""
    if is_pipeline(base):
        wanted = [component] if component else ckpt.components
        out = {}
        for c in wanted:
            folder = os.path.join(base, c)
            if not os.path.isdir(folder):
                raise CheckpointNotFoundError(f"has no {c}/ folder, which the adapter needs", path=base, hint="is this the pipeline the adapter was trained on?")
            out[c] = read_component(folder)
        return out
    return {pick_component(ckpt, component, base): read_component(base)}


@dataclass
class ComponentCheck:
    """One component of a foreign file against its base: names resolved, shapes fitted."""

    component: Optional[str]  #: ``None`` for a PEFT LoHa / LoKr adapter
    base: str
    total: int
    resolved: int
    unresolved: list[str] = field(default_factory=list)
    shape_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  #: modules that fit but cannot be applied (a negative or non-finite alpha)
    #: row type (``adapter``, ``full_copy``, ``base_override``) -> ``{"resolved", "total"}``
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: ``{"module", "type", "method", "base_key", "layout"}`` per bound base tensor
    bindings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unresolved and not self.shape_errors and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "component": self.component, "base": self.base, "ok": self.ok, "resolved": self.resolved, "total": self.total,
            "unresolved": self.unresolved[:10], "unresolved_count": len(self.unresolved), "shape_errors": self.shape_errors[:10],
            "problems": self.problems[:10],
        }


def check_component(ckpt: ForeignCheckpoint, component: Optional[str], base: BaseModel) -> ComponentCheck:
    """Resolve the component's names (sets each module's ``path``) and check every product fits its
    weight; a PEFT LoHa / LoKr adapter's full copies and saved base tensors count as modules, each
    tensor bound to the base tensor it replaces as for a PEFT LoRA adapter
    (:func:`adapterfmt.base.resolution.bind_full_copy`, :func:`~adapterfmt.base.resolution.bind_base_tensor`).

    Raises:
        AmbiguousMatchError: a flattened name fits two modules.
    """
    modules = ckpt.component_modules(component)
    paths = base_module_paths(base.tensors)
    aliases = None
    if ckpt.format == "kohya" and component == "unet":
        from .sgm_names import sgm_aliases

        aliases = sgm_aliases(paths, base.config)
    res = resolve_names(modules, paths, component=component, file=ckpt.file, flattened=ckpt.format == "kohya", aliases=aliases)
    check = ComponentCheck(component, base.directory, len(modules), len(res.resolved), list(res.unresolved))
    check.counts["adapter"] = {"resolved": len(res.resolved), "total": len(modules)}
    for m in modules:
        if m.path is None:
            continue
        weight = base.tensors[weight_key(m.path)]
        check.bindings.append(
            {"module": m.path, "type": "adapter", "method": m.kind, "base_key": weight_key(m.path), "layout": m.layer_kind or "linear"}
        )
        m.weight_shape = tuple(weight.shape)
        if m.alpha is not None and not (m.alpha >= 0):  # merge and load refuse it (peft_view.refuse_unusable)
            check.problems.append(f"{m.path}: alpha is {m.alpha:g}")
        not_float = sorted(slot for slot, info in m.tensors.items() if info.dtype not in FLOAT_DTYPES)
        if not_float:  # merge and load refuse it (merge_checks.refuse_non_float)
            check.problems.append(f"{m.path}: {not_float[0]} is stored as {m.tensors[not_float[0]].dtype}, not a float dtype")
        if not m.complete:
            check.shape_errors.append(f"{m.path}: {m.problem}")
        elif not m.fits(weight.shape):
            check.shape_errors.append(f"{m.path}: the {m.kind} product {list(m.product_shape() or ())} does not fit the weight {list(weight.shape)}")
    for path, copy in ckpt.full_copies.items():  # PEFT LoHa / LoKr only
        before = len(check.unresolved)
        bound = bind_full_copy(copy, path, base, check.unresolved, check.shape_errors)
        check.bindings += [{"module": path, "type": "full_copy", "method": None, "base_key": k, "layout": "replace"} for k in bound.values()]
        _count(check, "full_copy", len(check.unresolved) == before)
    for base_key, saved_key in ckpt.base_override_keys.items():  # PEFT LoHa / LoKr only
        before = len(check.unresolved)
        key = bind_base_tensor(base_key, base_key, ckpt.base_overrides[base_key], saved_key, base, check.unresolved, check.shape_errors)
        if key is not None:
            check.bindings.append({"module": base_key, "type": "base_override", "method": None, "base_key": key, "layout": "replace"})
        _count(check, "base_override", len(check.unresolved) == before)
    return check


def _count(check: ComponentCheck, row_type: str, resolved: bool) -> None:
    counts = check.counts.setdefault(row_type, {"resolved": 0, "total": 0})
    counts["total"] += 1
    counts["resolved"] += resolved
    check.total += 1
    check.resolved += resolved
