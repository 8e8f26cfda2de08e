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
from ...base.resolution import bind_base_tensor, bind_full_copy
from ...checkpoint.keys import weight_key
from ...constants import FLOAT_DTYPES
from ...errors import AmbiguousMatchError, CheckpointNotFoundError, UnsupportedFeatureError
from ...single_file.checkpoint import SingleFileBase, own_module_names, read_single_file, single_file_kind
from .names import base_module_paths, flatten, resolve_names
from .records import DIFF, LORA, ForeignCheckpoint, ForeignModule

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


#: A foreign file's component -> the single-file checkpoint's, where they differ: sd-scripts names
#: Flux and SD3 LoRAs ``lora_unet_`` (kohya's component ``unet``) while diffusers' have a ``transformer``.
_SINGLE_FILE_ALIASES = {("flux", "unet"): "transformer", ("sd3", "unet"): "transformer"}


def component_bases(ckpt: ForeignCheckpoint, base: str, component: Optional[str] = None, *, single_file_kind_override: Optional[str] = None) -> dict[str, BaseModel]:
    """component -> its base, for a pipeline directory (every component of the file, or the one
    named), for a single component directory, or for a single-file checkpoint (every component
    of the file that is the checkpoint's model, as one :class:`SingleFileBase`).

    Raises:
        UnsupportedFeatureError: a single-file checkpoint of a kind not covered; a file with a
            component the checkpoint does not hold (a LoRA for another model family).
    """
    if os.path.isfile(base) and single_file_kind(base, kind=single_file_kind_override) is not None:
        return single_file_bases(ckpt, read_single_file(base, kind=single_file_kind_override), component)
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


def single_file_bases(ckpt: ForeignCheckpoint, model: SingleFileBase, component: Optional[str] = None) -> dict[str, BaseModel]:
    """Every component of ``ckpt`` (or the one named) bound to the single-file checkpoint ``model``.

    Raises:
        UnsupportedFeatureError: a component the checkpoint's model cannot be (``text_encoder`` on
            a Flux transformer file): the LoRA and the checkpoint are named.
    """
    wanted = [component] if component else ckpt.components
    held = {c: _SINGLE_FILE_ALIASES.get((model.kind, c), c) for c in wanted}
    other = [c for c, h in held.items() if h not in model.components]
    if other or not wanted:
        raise UnsupportedFeatureError(
            f"is a LoRA for {', '.join(other) or 'nothing'} ({describe_family(ckpt)}), but {model.file} is a {model.description} "
            f"checkpoint, which holds {', '.join(model.components)}",
            path=ckpt.file, hint="give the base the LoRA was trained for",
        )
    return {c: model.view(h) for c, h in held.items()}


def describe_family(ckpt: ForeignCheckpoint) -> str:
    """What model a foreign file's names say it was trained for, in words (for error messages only)."""
    names = " ".join(m.name.replace("_", ".") for m in ckpt.modules[:50]) + " "
    for marker, family in (("text.model", "a CLIP text encoder"), ("double.blocks", "Flux.1"), ("single.transformer.blocks", "Flux.1"),
                           ("joint.blocks", "SD3"), ("input.blocks", "a UNet model (SD 1.x / SDXL)"),
                           ("down.blocks", "a UNet model (SD 1.x / SDXL)"), ("self.attn.q ", "Wan video")):
        if marker in names:
            return f"names of {family}"
    return f"{ckpt.format} names"


def _single_file_check(ckpt: ForeignCheckpoint, component: Optional[str], base: SingleFileBase, modules: list[ForeignModule]) -> "ComponentCheck":
    """Bind each module to its place in a single-file checkpoint: a diffusers name (dotted or kohya-
    flattened) through the generated table, onto rows of a fused tensor where diffusers cuts it;
    the file's own names as they are."""
    plain = [m for m in modules if m.split is None]
    res = resolve_names(plain, base.module_paths(), component=component, file=ckpt.file, flattened=ckpt.format == "kohya")
    check = ComponentCheck(component, base.file, len(modules), len(res.resolved), list(res.unresolved))
    for m in modules:
        if m.split is None:
            continue
        places = [base.place(part) for part, _a, _b in m.split]
        if any(p is None for p in places):
            check.unresolved.append(m.name)
            continue
        m.path, m.placement, m.checked = m.name, tuple(places), True
        m.weight_shape = (sum(b - a for _p, a, b in m.split), *places[0].shape[1:])
        check.resolved += 1
        check.bindings += [_binding(part, m.kind, p) for (part, _a, _b), p in zip(m.split, places)]
        _check_module(check, m, m.weight_shape)
    family = describe_family(ckpt)
    if modules and not res.resolved and not base.description.startswith(family[len("names of "):]):
        check.problems.append(f"no module name fits {base.description}: the file has {family}")
    for m in modules:
        if m.path is None or m.split is not None:
            continue
        place = base.place(m.path)
        if place is None:
            m.path = None
            check.resolved -= 1
            check.unresolved.append(m.name)
            continue
        m.placement, m.weight_shape, m.checked = place, place.shape, True
        check.bindings.append(_binding(m.path, m.kind, place))
        _check_module(check, m, place.shape)
        if place.rows is not None and (m.dora_scale is not None or "magnitude" in m.tensors):
            check.problems.append(f"{m.path}: DoRA on rows of the fused tensor {place.key} is not supported")
    check.counts["adapter"] = {"resolved": check.resolved, "total": check.total}
    return check


def _binding(module: str, kind: str, place: Any) -> dict[str, Any]:
    """A ``check`` binding record for a module placed in a single file: the file's key, and for
    part of a fused tensor the rows it takes (``rows 3072:6144``)."""
    rows = "" if place.rows is None else " ".join(f"rows {a}:{b}" for a, b, _src in place.rows)
    return {"module": module, "type": "adapter", "method": kind, "base_key": place.key, "layout": rows or "linear"}


def _check_module(check: "ComponentCheck", m: ForeignModule, shape: tuple[int, ...]) -> None:
    if m.alpha is not None and not (m.alpha >= 0):  # merge and load refuse it (peft_view.refuse_unusable)
        check.problems.append(f"{m.path}: alpha is {m.alpha:g}")
    not_float = sorted(slot for slot, info in m.tensors.items() if info.dtype not in FLOAT_DTYPES)
    if not_float:  # merge and load refuse it (merge_checks.refuse_non_float)
        check.problems.append(f"{m.path}: {not_float[0]} is stored as {m.tensors[not_float[0]].dtype}, not a float dtype")
    if not m.complete:
        check.shape_errors.append(f"{m.path}: {m.problem}")
    elif not m.fits(shape):
        check.shape_errors.append(f"{m.path}: the {m.kind} product {list(m.product_shape() or ())} does not fit the weight {list(shape)}")


#: diffusers model classes whose single-file names a kohya file may use, -> the table's kind.
_SINGLE_FILE_CLASSES = {"FluxTransformer2DModel": "flux", "WanTransformer3DModel": "wan", "SD3Transformer2DModel": "sd3"}


def _split_fused(ckpt: ForeignCheckpoint, base: BaseModel, modules: list[ForeignModule], unresolved: list[str], paths: list[str]) -> list[str]:
    """kohya names of a single-file checkpoint (``double_blocks_0_img_attn_qkv``) on a diffusers
    base: a renamed module resolves to its diffusers module, a fused one is split onto the diffusers
    modules it holds (``lora_up`` by rows, ``lora_down`` shared, as diffusers' converter does).
    Returns the names still unresolved.

    Raises:
        AmbiguousMatchError: a flattened name that fits two single-file modules.
    """
    present = set(paths)
    left = []
    for m in modules:  # a module the reader split already (XLabs qkv): its parts must all be there
        if m.path is None and m.split is not None:
            if all(p in present for p, _a, _b in m.split):
                m.path = m.name
            else:
                left.append(m.name)
    kind = _SINGLE_FILE_CLASSES.get(str(base.config.get("_class_name")))
    if kind is None or ckpt.format not in ("kohya", "comfyui"):
        return left + [m.name for m in modules if m.path is None and m.split is None]
    rows = {p: base.tensors[weight_key(p)].shape[0] for p in paths if weight_key(p) in base.tensors and base.tensors[weight_key(p)].shape}
    own = own_module_names(kind, "transformer", paths, rows)
    index: dict[str, list[str]] = {}
    for name in own:
        index.setdefault(flatten(name) if ckpt.format == "kohya" else name, []).append(name)
    for m in modules:
        if m.path is not None or m.split is not None:
            continue
        found = index.get(m.name, [])
        if len(found) > 1:
            raise AmbiguousMatchError(f"module name {m.name!r} fits both {found[0]!r} and {found[1]!r}", path=ckpt.file, key=m.name)
        if not found:
            left.append(m.name)
            continue
        target, parts = own[found[0]]
        if target is not None and target in present:
            m.path = target
        elif parts and all(p in present for p, _a, _b in parts) and m.kind in (LORA, DIFF) and _cut_rows(m) == parts[-1][2]:
            m.path, m.split = found[0], tuple(parts)  # a factor of exactly the parts' rows: never re-cut by a guess
        else:
            left.append(m.name)
    return left


def _cut_rows(m: ForeignModule) -> Optional[int]:
    """The rows of the tensor a split cuts: ``lora_up`` (LoRA) or the whole delta (``.diff``, else ``.diff_b``)."""
    t = m.tensors.get("lora_up") if m.kind == LORA else (m.tensors.get("diff") or m.tensors.get("diff_b"))
    return int(t.shape[0]) if t is not None and t.shape else None


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
    if isinstance(base, SingleFileBase):
        return _single_file_check(ckpt, component, base, modules)
    paths = base_module_paths(base.tensors)
    aliases = None
    if ckpt.format == "kohya" and component == "unet":
        from .sgm_names import sgm_aliases

        aliases = sgm_aliases(paths, base.config)
    res = resolve_names([m for m in modules if m.split is None], paths, component=component, file=ckpt.file, flattened=ckpt.format == "kohya", aliases=aliases)
    res.unresolved += [m.name for m in modules if m.split is not None]
    unresolved = list(res.unresolved)
    if unresolved:
        unresolved = _split_fused(ckpt, base, modules, unresolved, paths)
    unresolved = [n for n in unresolved if not any(m.name == n and m.path is not None for m in modules)]
    check = ComponentCheck(component, base.directory, len(modules), len(modules) - len(unresolved), unresolved)
    check.counts["adapter"] = {"resolved": len(modules) - len(unresolved), "total": len(modules)}
    for m in modules:
        if m.path is None:
            continue
        m.checked = True
        if m.split is not None:  # a fused single-file name split onto diffusers modules
            rows = sum(b - a for _p, a, b in m.split)
            first = base.tensors[weight_key(m.split[0][0])]
            m.weight_shape = (rows, *first.shape[1:])
            check.bindings += [{"module": part, "type": "adapter", "method": m.kind, "base_key": weight_key(part),
                                "layout": f"rows {a}:{b} of lora_up"} for part, a, b in m.split]
            _check_module(check, m, m.weight_shape)
            continue
        weight = base.tensors[weight_key(m.path)]
        check.bindings.append(
            {"module": m.path, "type": "adapter", "method": m.kind, "base_key": weight_key(m.path), "layout": m.layer_kind or "linear"}
        )
        m.weight_shape = tuple(weight.shape)
        _check_module(check, m, tuple(weight.shape))
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
