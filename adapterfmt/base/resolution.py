"""Resolve an adapter against a base model, from headers: every module to exactly one base tensor.

:func:`resolve` is what ``adapterfmt check`` reports and what the merge plans from: for each LoRA
module the base weight it changes, its layout (``linear``, ``conv1d-transposed`` for transformers
``Conv1D``, ``conv``, ``embedding``) and shape agreement; for each full copy the base tensors it
replaces. Unresolved names come with the prefix rewrite that would fix them, if one exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Optional

from ..checkpoint.factors import fits, product_shape
from ..checkpoint.finding import Finding
from ..checkpoint.findings import endswith_findings, full_copy_incomplete_finding, tied_full_copy_findings
from ..checkpoint.keys import bias_key, param_key, split_param, weight_key
from ..checkpoint.matching import apply_prefix_map
from ..checkpoint.param_targets import ExpertSlice, ParamTarget, bind, param_target
from ..checkpoint.records import AdapterCheckpoint, FullCopyModule, LoraModule
from ..storage.gc_pause import with_gc_paused
from ..storage.header import TensorInfo
from ..tables.architectures import checkpoint_key
from .reading import BaseModel

__all__ = ["Resolution", "ResolvedLora", "bind_base_tensor", "bind_full_copy", "delta_numel", "endswith_findings", "resolve", "suggest_prefix"]


#: The layout of a factor module (LoHa, LoKr, Tucker LoCon): its product is computed in the weight's shape.
FACTORS = "factors"


@dataclass
class ResolvedLora:
    """A LoRA module bound to its base weight."""

    module: LoraModule
    base_key: str  #: ``X.weight``
    layout: str  #: ``linear``, ``conv1d-transposed``, ``conv``, ``embedding``; ``factors`` for a factor module
    bias_key: Optional[str] = None  #: ``X.bias`` for ``lora_bias``
    scaling: Optional[float] = None  #: a parameter LoRA's own scaling (``target_parameters``), else the module's
    expert: Optional[ExpertSlice] = None  #: the slice of a fused-expert delta this tensor takes
    #: a module that is rows of a fused base tensor (a single-file checkpoint's ``qkv``):
    #: ``((first, end, source_first), ...)``, rows ``first:end`` of the base tensor get the
    #: product's rows from ``source_first`` on; ``None``: the product is the whole tensor's delta
    rows: Optional[tuple[tuple[int, int, int], ...]] = None
    shape: Optional[tuple[int, ...]] = None  #: the module's own weight shape when ``rows`` is set


@dataclass
class Resolution:
    """The outcome of matching one adapter against one base."""

    adapter: AdapterCheckpoint
    lora: dict[str, ResolvedLora] = field(default_factory=dict)
    param_lora: dict[str, list[ResolvedLora]] = field(default_factory=dict)  #: parameter LoRA -> every on-disk tensor it changes
    full_copies: dict[str, dict[str, str]] = field(default_factory=dict)  #: module -> {param: base key}
    overrides: dict[str, str] = field(default_factory=dict)  #: base key -> saved key
    unresolved: list[str] = field(default_factory=list)  #: module paths / keys with no base tensor
    shape_errors: list[str] = field(default_factory=list)  #: one message each
    suggestion: Optional[tuple[str, str]] = None  #: prefix rewrite (old, new) that fixes the unresolved
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unresolved and not self.shape_errors

    @property
    def lora_total(self) -> int:
        return len(self.adapter.lora)

    @property
    def full_total(self) -> int:
        return len(self.adapter.full_copies)

    def summary(self) -> str:
        """``154/154 LoRA targets and 1/1 full copies resolved``."""
        return (
            f"{len(self.lora) + len(self.param_lora)}/{self.lora_total} LoRA targets and "
            f"{len(self.full_copies)}/{self.full_total} full copies resolved"
        )


@with_gc_paused
def resolve(adapter: AdapterCheckpoint, base: BaseModel, *, prefix_map: Optional[dict[str, str]] = None) -> Resolution:
    """Bind every module of ``adapter`` to tensors of ``base``; never raises for mismatches.

    Args:
        prefix_map: explicit rewrites of module-path prefixes, ``{"model.": "language_model.model."}``.

    Returns:
        A :class:`Resolution`; ``ok`` is false when something did not resolve or shapes disagree.
    """
    res = Resolution(adapter)
    tensors = base.tensors

    transposed_votes: list[bool] = []
    pending_square: list[tuple[LoraModule, str]] = []
    for path, m in adapter.lora.items():
        ptarget = param_target(adapter.config, path)
        if ptarget is not None:
            _bind_param_lora(res, m, ptarget, base, apply_prefix_map(ptarget.owner, prefix_map))
            continue
        target = apply_prefix_map(path, prefix_map)
        key = checkpoint_key(base.config, weight_key(target), tensors)
        info = tensors.get(key)
        if info is None:
            module = split_param(key)[0]
            if module in base.tied:
                info = tensors.get(weight_key(base.tied[module]))
            if info is None:
                res.unresolved.append(path)
                continue
        if m.factors is not None:  # LoHa / LoKr / Tucker LoCon: the product's shape decides (FORMAT §10.3)
            shapes = {slot: tuple(t.shape) for slot, t in m.tensors.items()}
            if fits(m.factors, shapes, tuple(info.shape)):
                res.lora[path] = _resolved(m, key, FACTORS, base, res)
            else:
                key_note = f" (key '{m.keys['diff']}')" if "diff" in m.keys else ""
                res.shape_errors.append(
                    f"'{path}': the {m.factors} product {list(product_shape(m.factors, shapes) or ['?'])}{key_note} does not fit base weight {list(info.shape)}"
                )
            continue
        a, b = m.tensors.get("lora_A"), m.tensors.get("lora_B")
        if a is None or b is None:
            res.shape_errors.append(f"'{path}': lora_A or lora_B is missing (orphan LoRA)")
            continue
        layout, err = _layout(m, info.shape, a.shape, b.shape)
        if err:
            res.shape_errors.append(f"'{path}': {err}")
            continue
        if layout == "square":
            pending_square.append((m, key))
            continue
        if layout in ("linear", "conv1d-transposed"):
            transposed_votes.append(layout == "conv1d-transposed")
        res.lora[path] = _resolved(m, key, layout, base, res)
    # A square weight cannot show its layout; follow the adapter's other linear modules, else the flag.
    transposed = (sum(transposed_votes) > len(transposed_votes) / 2) if transposed_votes else adapter.config.fan_in_fan_out
    for m, key in pending_square:
        res.lora[m.path] = _resolved(m, key, "conv1d-transposed" if transposed else "linear", base, res)

    for path, copy in adapter.full_copies.items():
        target = apply_prefix_map(path, prefix_map)
        bound = bind_full_copy(copy, target, base, res.unresolved, res.shape_errors)
        if len(bound) == len(copy.tensors):
            res.full_copies[path] = bound
        missing = _missing_module_params(_disk_module(base, target), copy.tensors, tensors)
        if missing and len(bound) == len(copy.tensors):
            res.findings.append(full_copy_incomplete_finding(path, missing))

    for base_key, saved_key in adapter.base_override_keys.items():
        target = apply_prefix_map(base_key, prefix_map)
        key = bind_base_tensor(base_key, target, adapter.base_overrides[base_key], saved_key, base, res.unresolved, res.shape_errors)
        if key is not None:
            res.overrides[key] = saved_key

    if res.unresolved:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        res.suggestion = suggest_prefix(res.unresolved, list(tensors), adapter, shapes=shapes, avoid=shared_keys(base))
    res.findings.extend(tied_full_copy_findings(adapter, set(base.tied)))
    res.findings.extend(endswith_findings(adapter, list(tensors)))
    res.findings.extend(base.findings)  # what the base reader saw (shadowed-weights)
    return res


def bind_full_copy(copy: FullCopyModule, target: str, base: BaseModel, unresolved: list[str], shape_errors: list[str]) -> dict[str, str]:
    """Bind each tensor of a full copy (module ``target`` in the base) to the base tensor it
    replaces: param -> base key. A tensor with no base tensor goes to ``unresolved``
    (``<copy path>.<param>``), one whose shape differs to ``shape_errors``."""
    tensors = base.tensors
    bound: dict[str, str] = {}
    for param, info in copy.tensors.items():
        key = checkpoint_key(base.config, param_key(target, param), tensors)
        base_info = tensors.get(key)
        module = key[: -len(param) - 1] if key.endswith(f".{param}") else target
        if base_info is None and module in base.tied and param == "weight":
            base_info = tensors.get(weight_key(base.tied[module]))
        if base_info is None:
            unresolved.append(param_key(copy.path, param))
            continue
        if tuple(base_info.shape) != tuple(info.shape):
            shape_errors.append(
                f"'{copy.path}.{param}': full copy has shape {list(info.shape)} but the base tensor '{key}' has {list(base_info.shape)}"
            )
            continue
        bound[param] = key
    return bound


def bind_base_tensor(
    base_key: str, target: str, info: TensorInfo, saved_key: str, base: BaseModel, unresolved: list[str], shape_errors: list[str]
) -> Optional[str]:
    """The base's on-disk key for a saved base tensor (``X.base_layer.weight``, FORMAT §3.5) that
    replaces ``target``, or ``None`` with ``base_key`` in ``unresolved`` / a message in ``shape_errors``."""
    tensors = base.tensors
    key = checkpoint_key(base.config, target, tensors)
    base_info = tensors.get(key)
    module, param = split_param(key)
    if base_info is None and module in base.tied and param == "weight":
        base_info = tensors.get(weight_key(base.tied[module]))  # a tied head saved in full
    if base_info is None:
        unresolved.append(base_key)
        return None
    if tuple(base_info.shape) != tuple(info.shape):
        shape_errors.append(f"'{saved_key}': has shape {list(info.shape)} but base '{key}' has {list(base_info.shape)}")
        return None
    return key


def _bind_param_lora(res: Resolution, m: LoraModule, target: ParamTarget, base: BaseModel, owner: str) -> None:
    """A ``target_parameters`` LoRA: bound to every on-disk tensor it changes (FORMAT.md §3.9)."""
    bindings, err = bind(m, target, res.adapter.config, base, owner)
    if err:
        (res.unresolved.append(m.path) if "no tensor" in err and "expert" not in err else res.shape_errors.append(err))
        return
    res.param_lora[m.path] = [ResolvedLora(m, b.base_key, "linear", None, b.scaling, b.slice) for b in bindings]


def shared_keys(base: BaseModel) -> set[str]:
    """Base tensors that several modules use (a tie's stored side): never a rewrite's destination."""
    return {f"{module}.weight" for module in base.tied.values()}


def _disk_module(base: BaseModel, module: str) -> str:
    """An in-memory module path as the checkpoint names it (through its ``weight``), else itself."""
    key = checkpoint_key(base.config, f"{module}.weight", base.tensors)
    return key[: -len(".weight")] if key.endswith(".weight") else module


def _resolved(m: LoraModule, key: str, layout: str, base: BaseModel, res: Resolution) -> ResolvedLora:
    bias = None
    if m.lora_bias:
        bias = bias_key(split_param(key)[0])
        if bias not in base.tensors:
            res.shape_errors.append(f"'{m.path}': lora_bias is set but the base module has no bias '{bias}' to add it to")
    return ResolvedLora(m, key, layout, bias)


def _layout(m: LoraModule, w: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]) -> tuple[str, Optional[str]]:
    """The base layout implied by shapes, or an error message."""
    if m.layer_kind in ("embedding", "linear") and len(a) == 2 and len(b) == 2 and a[0] != b[1]:
        return "", f"lora_A has rank {a[0]} but lora_B has rank {b[1]} (A {list(a)}, B {list(b)})"
    if m.layer_kind == "embedding":
        # lora_embedding_A (r, V), lora_embedding_B (D, r); base (V, D)
        if len(w) == 2 and len(a) == 2 and len(b) == 2 and (a[1], b[0]) == tuple(w):
            return "embedding", None
        return "", f"embedding LoRA A {list(a)} / B {list(b)} does not fit base weight {list(w)} (expected A (r, {w[0] if w else '?'}), B ({w[1] if len(w) > 1 else '?'}, r))"
    if m.layer_kind == "linear":
        if len(w) != 2 or len(a) != 2 or len(b) != 2:
            return "", f"linear LoRA A {list(a)} / B {list(b)} does not fit base weight {list(w)}"
        out_in = (b[0], a[1])
        if tuple(w) == out_in and w[0] != w[1]:
            return "linear", None
        if tuple(w) == out_in[::-1] and w[0] != w[1]:
            return "conv1d-transposed", None
        if tuple(w) == out_in:
            return "square", None
        return "", f"LoRA A {list(a)} / B {list(b)} gives a ({b[0]}, {a[1]}) delta but the base weight is {list(w)}"
    if m.layer_kind.startswith("conv"):
        # A (r, in/g, *k), B (out, r/g, 1...); base (out, in/g, *k)
        if len(w) != len(a) or w[0] != b[0] or tuple(w[1:]) != tuple(a[1:]):
            return "", f"conv LoRA A {list(a)} / B {list(b)} does not fit base weight {list(w)}"
        if any(d != 1 for d in b[2:]):
            return "", f"conv lora_B {list(b)} must have a 1x1 kernel"
        if b[1] != a[0]:
            return "", f"conv LoRA with groups > 1 (A rank {a[0]}, B {b[1]}) cannot be merged"
        return "conv", None
    return "", f"cannot tell the layer kind from lora_A {list(a)}"


def _missing_module_params(target: str, copy: dict, tensors: dict) -> list[str]:
    prefix = f"{target}." if target else ""
    have = {k[len(prefix) :] for k in tensors if k.startswith(prefix)}
    # direct params only for a leaf module; nested ones for containers
    return sorted(p for p in have if p not in copy and (len(copy) == 0 or any("." in c for c in copy) or "." not in p))


def suggest_prefix(
    unresolved: list[str],
    base_keys: list[str],
    adapter: AdapterCheckpoint,
    *,
    shapes: Optional[dict[str, tuple[int, ...]]] = None,
    avoid: Optional[set[str]] = None,
) -> Optional[tuple[str, str]]:
    """A prefix rewrite ``(old, new)`` that maps the most unresolved module paths onto base tensors.

    Tries dropping the first k segments of a path and putting any base key prefix in front, and
    keeps the rewrite that fixes the most names, less the names that resolve now and would not
    after it (ties: the shortest rewrite, then the first in sorted order). A rewrite must fix at
    least half of the unresolved names to be suggested. With ``shapes``, a name counts as fixed
    only when its tensors fit the base tensor's shape; keys in ``avoid`` (tensors shared by several
    modules) never count: a rewrite onto them would change every module that uses them.
    """
    weights = {k for k in base_keys if k not in (avoid or ())}

    def fits(path: str, key: str) -> bool:
        if key not in weights:
            return False
        if shapes is None:
            return True
        if path in adapter.lora:
            m = adapter.lora[path]
            a, b = m.tensors.get("lora_A"), m.tensors.get("lora_B")
            return a is not None and b is not None and not _layout(m, shapes[key], a.shape, b.shape)[1]
        copy_module, _, param = path.rpartition(".")
        info = adapter.full_copies[copy_module].tensors.get(param) if copy_module in adapter.full_copies else None
        if info is None:
            info = adapter.base_overrides.get(path)
        return info is None or tuple(info.shape) == tuple(shapes[key])

    candidates: dict[tuple[str, str], int] = {}
    probe = unresolved[:50]
    for path in probe:
        segs = path.split(".")
        for k in range(0, len(segs)):
            old = ".".join(segs[:k]) + ("." if k else "")
            tail = ".".join(segs[k:])
            suffix = weight_key(tail) if path in adapter.lora else tail
            for key in weights:
                if key.endswith(suffix) and (len(key) == len(suffix) or key[-len(suffix) - 1] == "."):
                    new = key[: len(key) - len(suffix)]
                    if (old, new) != ("", ""):
                        candidates[(old, new)] = 0
    # Base keys the adapter binds to already: a rewrite that would unbind them is penalised.
    failed = set(unresolved)
    bound = [weight_key(p) for p in adapter.lora if p not in failed]
    bound += [param_key(c, param) for c, copy in adapter.full_copies.items() for param in copy.tensors if param_key(c, param) not in failed]
    best, best_rank = None, (0, 0)
    for old, new in sorted(candidates):
        score = 0
        for path in probe:
            if not path.startswith(old):
                continue
            renamed = new + path[len(old) :]
            key = weight_key(renamed) if path in adapter.lora else renamed
            score += fits(path, key)
        score -= sum(1 for k in bound if k.startswith(old) and new + k[len(old) :] not in weights)
        rank = (score, -(len(old) + len(new)))
        # A rewrite that explains only a stray name or two is a coincidence, not a fix.
        if score > 0 and 2 * score >= len(probe) and (best is None or rank > best_rank):
            best, best_rank = (old, new), rank
    return best


def delta_numel(m: LoraModule) -> int:
    """Elements of the dense delta a LoRA module produces (for cost estimates)."""
    if m.factors is not None:
        return prod(product_shape(m.factors, {s: tuple(t.shape) for s, t in m.tensors.items()}) or ())
    a, b = m.tensors["lora_A"], m.tensors["lora_B"]
    return b.shape[0] * prod(a.shape[1:])
