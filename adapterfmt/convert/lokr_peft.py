"""A LyCORIS LoKr file as PEFT's ``peft_type: "LOKR"`` adapter (docs/FORMAT.md §10.5, BEHAVIOUR §7.4).

PEFT builds each LoKr layer from the config, not from the file: the Kronecker split of ``out`` and
``in`` comes from ``factorization(dim, decompose_factor)`` (one factor for the whole adapter), and
which halves are factored from ``r``: ``w1`` is full unless ``decompose_both`` and
``r < max(a, c) / 2``; ``w2`` is full when ``r >= max(b, d) / 2``. A conversion must therefore find
one ``decompose_factor`` and, per module, an ``r`` (``rank_pattern``) with which PEFT rebuilds
exactly the file's shapes, and an ``alpha`` (``alpha_pattern``) giving the file's scale: a file
with ``lokr_w2`` whole in some modules and factored in others converts whenever each module's rank
puts it on the file's side of PEFT's rule. Anything else is refused, naming the module and the
rule it breaks, never approximated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..base.reading import BaseModel
from ..errors import UnsupportedFeatureError
from ..formats.diffusion.records import ForeignModule

#: PEFT's LoKrConfig fields a LyCORIS file does not carry (PEFT's defaults; no dropout).
_LOKR_DEFAULTS: dict[str, Any] = {
    "peft_type": "LOKR", "task_type": None, "base_model_name_or_path": None, "revision": None, "inference_mode": True,
    "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, "exclude_modules": None, "layers_to_transform": None,
    "layers_pattern": None, "modules_to_save": None, "rank_dropout_scale": False,
}


def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT 0.21's ``lokr.layer.factorization`` (which, unlike LyCORIS's, does not reorder an exact split)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass
class _Halves:
    """A LoKr module's Kronecker split and storage as the file has it: ``out = a·b``, ``in = c·d``."""

    path: str
    key: str  #: a key of the module in the file, for errors
    ac: tuple[int, int]
    bd: tuple[int, int]
    w1_full: bool
    w2_full: bool
    rank: Optional[int]  #: the factored halves' rank; ``None`` when both halves are whole
    scaling: float


def _halves(m: ForeignModule, weight_shape: tuple[int, ...], file: str) -> _Halves:
    """The split and storage of ``m`` on a base weight of ``weight_shape``.

    A factored ``w2`` of a convolution without a Tucker core stores ``lokr_w2_b`` as
    ``(r, d·k…)`` (the kernel flattened into it, in LyCORIS and PEFT alike): ``d`` is that width
    over the kernel size.
    """
    s = {k: tuple(i.shape) for k, i in m.tensors.items()}
    key = next(iter(m.keys.values()), m.name)
    w1_full = "lokr_w1" in s
    a, c = s["lokr_w1"][:2] if w1_full else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
    w2_full = "lokr_w2" in s
    if w2_full:
        b, d = s["lokr_w2"][:2]
    elif "lokr_t2" in s:
        b, d = s["lokr_w2_a"][1], s["lokr_w2_b"][1]
    else:
        kernel = math.prod(weight_shape[2:])
        b, width = s["lokr_w2_a"][0], s["lokr_w2_b"][1]
        if width % kernel:
            raise UnsupportedFeatureError(
                f"lokr_w2_b is {width} wide, not a multiple of the kernel size {kernel} of {list(weight_shape)}", path=file, key=m.keys.get("lokr_w2_b", key)
            )
        d = width // kernel
    ranks = {s[k][0] for k in ("lokr_w1_b", "lokr_w2_b") if k in s} | {s[k][1] for k in ("lokr_w1_a",) if k in s}
    ranks |= {s["lokr_w2_a"][0 if "lokr_t2" in s else 1]} if "lokr_w2_a" in s else set()
    if len(ranks) > 1:
        raise UnsupportedFeatureError(
            f"its factored halves have ranks {sorted(ranks)}; PEFT builds both with one r", path=file, key=key, hint="merge the file instead"
        )
    return _Halves(m.path, key, (a, c), (b, d), w1_full, w2_full, next(iter(ranks)) if ranks else None, m.scaling)


def _split_of(shape: tuple[int, ...], factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PEFT's ``((a, c), (b, d))`` for a weight of ``shape`` under ``decompose_factor`` ``factor``."""
    (a, b), (c, d) = peft_factorization(shape[0], factor), peft_factorization(shape[1], factor)
    return (a, c), (b, d)


def _pick_factor(parts: list[_Halves], shapes: dict[str, tuple[int, ...]], file: str) -> int:
    """The one ``decompose_factor`` whose splits are every module's, or UnsupportedFeatureError naming
    a module the best candidate (the one fitting most modules) splits otherwise."""
    candidates = [-1] + sorted({x for p in parts for x in (*p.ac, *p.bd)})
    fits = {f: [p for p in parts if _split_of(shapes[p.path], f) != (p.ac, p.bd)] for f in candidates}
    factor = min(candidates, key=lambda f: len(fits[f]))
    if not fits[factor]:
        return factor
    bad = fits[factor][0]
    shape = shapes[bad.path]
    (pa, pc), (pb, pd) = _split_of(shape, factor)
    raise UnsupportedFeatureError(
        f"no PEFT decompose_factor reproduces the Kronecker splits of every module: '{bad.path}' splits out {shape[0]} as "
        f"{bad.ac[0]}x{bad.bd[0]} and in {shape[1]} as {bad.ac[1]}x{bad.bd[1]}, but decompose_factor {factor} (which fits the most "
        f"modules, {len(parts) - len(fits[factor])} of {len(parts)}) splits them {pa}x{pb} and {pc}x{pd}, and PEFT has one factor per adapter",
        path=file,
        key=bad.key,
        hint="merge the file instead",
    )


def _peft_rank(p: _Halves, both: bool, file: str) -> int:
    """The ``r`` with which PEFT stores this module's halves as the file has them.

    PEFT decides per module from its ``r`` (``rank_pattern``): ``w1`` is factored iff
    ``decompose_both`` and ``r < max(a, c) / 2``; ``w2`` iff ``r < max(b, d) / 2``. A module with a
    factored half has its ``r`` fixed by the tensors; one with both halves whole takes the smallest
    ``r`` that keeps them whole (its scale is 1, so ``alpha = r``).
    """
    w1_limit, w2_limit = max(p.ac) / 2, max(p.bd) / 2
    if p.rank is None:
        return max(1, math.ceil(w2_limit), math.ceil(w1_limit) if both else 1)
    r = p.rank
    peft_w1_full = not (both and r < w1_limit)
    peft_w2_full = r >= w2_limit
    if peft_w2_full != p.w2_full:
        why = (
            f"lokr_w2 is factored at rank {r}, but PEFT stores w2 whole when r >= max(b, d) / 2 = {w2_limit:g}"
            if not p.w2_full
            else f"lokr_w2 is whole while lokr_w1 is factored at rank {r}, but PEFT factors w2 when r < max(b, d) / 2 = {w2_limit:g}"
        )
        raise UnsupportedFeatureError(f"PEFT cannot store this module as the file does: {why}", path=file, key=p.key, hint="merge the file instead")
    if peft_w1_full != p.w1_full:
        why = (
            f"lokr_w1 is whole while lokr_w2 is factored at rank {r}, but another module's factored lokr_w1 needs decompose_both, "
            f"under which PEFT factors w1 when r < max(a, c) / 2 = {w1_limit:g}"
            if p.w1_full
            else f"lokr_w1 is factored at rank {r}, but PEFT stores w1 whole when r >= max(a, c) / 2 = {w1_limit:g}"
        )
        raise UnsupportedFeatureError(f"PEFT cannot store this module as the file does: {why}", path=file, key=p.key, hint="merge the file instead")
    return r


def refuse_3d_kron(modules: list[ForeignModule], file: str) -> None:
    """A full 3-D ``lokr_w2`` (a Conv1d) has another product in PEFT than in LyCORIS (FORMAT §10.6):
    no conversion between the two keeps its outputs."""
    for m in modules:
        w2 = m.tensors.get("lokr_w2")
        if m.kind == "lokr" and w2 is not None and len(w2.shape) == 3:
            raise UnsupportedFeatureError(
                "a full 3-D lokr_w2 (Conv1d) builds another product in PEFT than in LyCORIS", path=file, key=m.keys.get("lokr_w2", m.name),
                hint="merge the adapter instead",
            )


def lokr_config(modules: list[ForeignModule], base: BaseModel, target_modules: Any, file: str) -> dict[str, Any]:
    """PEFT's LoKr config that rebuilds ``modules`` (resolved) exactly, with their scales.

    One ``decompose_factor`` (PEFT has one per adapter) must give every module's Kronecker split;
    then each module gets, through ``rank_pattern`` / ``alpha_pattern``, the ``r`` with which PEFT
    stores its halves whole or factored as the file does, and the ``alpha`` giving its scale.

    Raises:
        UnsupportedFeatureError: naming the module and why: no single ``decompose_factor``
            reproduces its split, Tucker cores on some convolutions only, or halves PEFT cannot
            store as the file does for any ``r``.
    """
    shapes = {m.path: tuple(base.tensors[f"{m.path}.weight"].shape) for m in modules}
    refuse_3d_kron(modules, file)
    parts = [_halves(m, shapes[m.path], file) for m in modules]
    both = any(not p.w1_full for p in parts)
    factor = _pick_factor(parts, shapes, file)
    cored = {m.path for m in modules if "lokr_t2" in m.tensors}
    big_convs = {p.path for p in parts if len(shapes[p.path]) > 2 and any(k != 1 for k in shapes[p.path][2:]) and not p.w2_full}
    if cored and cored != big_convs:
        odd = sorted(cored ^ big_convs)[0]
        has = "has a Tucker core (lokr_t2)" if odd in cored else "has no Tucker core (lokr_t2) while other convolutions do"
        raise UnsupportedFeatureError(
            f"LoKr Tucker cores on some convolutions only: '{odd}' {has}, but PEFT's one use_effective_conv2d puts a core on every "
            "convolution whose w2 is factored and whose kernel is larger than 1x1, and on no other module",
            path=file,
            key=next((p.key for p in parts if p.path == odd), odd),
            hint="merge the file instead",
        )
    ranks, alphas = {}, {}
    for p in parts:
        r = _peft_rank(p, both, file)
        ranks[p.path], alphas[p.path] = r, p.scaling * r
    from ..formats.wrapped.reading import exact_pattern

    r0 = min(set(ranks.values()), key=lambda k: (-list(ranks.values()).count(k), k))
    a0 = min(set(alphas.values()), key=lambda k: (-list(alphas.values()).count(k), k))
    return {
        **_LOKR_DEFAULTS, "r": r0, "alpha": a0, "decompose_factor": factor, "decompose_both": both, "use_effective_conv2d": bool(cored),
        "rank_pattern": {exact_pattern(p): r for p, r in sorted(ranks.items()) if r != r0},
        "alpha_pattern": {exact_pattern(p): a for p, a in sorted(alphas.items()) if a != a0},
        "target_modules": target_modules,
    }
