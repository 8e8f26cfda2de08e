"""A LyCORIS LoKr file as PEFT's ``peft_type: "LOKR"`` adapter (docs/FORMAT.md §10.5, BEHAVIOUR §7.4).

PEFT builds each LoKr layer from the config, not from the file: the Kronecker split of ``out`` and
``in`` comes from ``factorization(dim, decompose_factor)`` (one factor for the whole adapter), and
which halves are factored from ``r``: ``w1`` is full unless ``decompose_both`` and
``r < max(a, c) / 2``; ``w2`` is full when ``r >= max(b, d) / 2``. A conversion must therefore find
one ``decompose_factor`` and, per module, an ``r`` with which PEFT rebuilds exactly the file's
shapes, and an ``alpha`` giving the file's scale. Anything else is refused, never approximated.
"""

from __future__ import annotations

import math
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


def _halves(m: ForeignModule) -> tuple[tuple[int, int], tuple[int, int], bool, bool, Optional[int]]:
    """``(a, c), (b, d), w1 full, w2 full, rank`` as the file stores them."""
    s = {k: tuple(i.shape) for k, i in m.tensors.items()}
    w1_full = "lokr_w1" in s
    a, c = s["lokr_w1"][:2] if w1_full else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
    w2_full = "lokr_w2" in s
    if w2_full:
        b, d = s["lokr_w2"][:2]
    elif "lokr_t2" in s:
        b, d = s["lokr_w2_a"][1], s["lokr_w2_b"][1]
    else:
        b, d = s["lokr_w2_a"][0], s["lokr_w2_b"][1]
    return (a, c), (b, d), w1_full, w2_full, m.rank


def _peft_rank(ac: tuple[int, int], bd: tuple[int, int], w1_full: bool, w2_full: bool, rank: Optional[int], both: bool, conv: bool) -> Optional[int]:
    """The ``r`` with which PEFT builds this module's halves as the file has them, or ``None``."""
    candidates = [rank] if rank else [max(1, math.ceil(max(bd) / 2)), max(1, math.ceil(max(ac) / 2)), max(*ac, *bd)]
    for r in candidates:
        peft_w1_full = not (both and r < max(ac) / 2)
        peft_w2_full = (r >= max(bd) / 2) if conv else not (r < max(bd) / 2)
        if peft_w1_full == w1_full and peft_w2_full == w2_full:
            return r
    return None


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

    Raises:
        UnsupportedFeatureError: no single ``decompose_factor`` reproduces every split, Tucker cores
            on some convolutions only, or a module whose halves PEFT cannot build for any ``r``.
    """
    shapes = {m.path: tuple(base.tensors[f"{m.path}.weight"].shape) for m in modules}
    refuse_3d_kron(modules, file)
    parts = {m.path: _halves(m) for m in modules}
    both = any(not p[2] for p in parts.values())
    candidates = [-1] + sorted({x for p in parts.values() for x in (*p[0], *p[1])})
    factor = next(
        (f for f in candidates if all(
            (peft_factorization(shapes[path][0], f)[0], peft_factorization(shapes[path][1], f)[0]) == p[0]
            and (peft_factorization(shapes[path][0], f)[1], peft_factorization(shapes[path][1], f)[1]) == p[1]
            for path, p in parts.items())),
        None,
    )
    if factor is None:
        raise UnsupportedFeatureError(
            "no PEFT decompose_factor reproduces the Kronecker splits of every module", path=file, hint="merge the file instead"
        )
    cored = {m.path for m in modules if "lokr_t2" in m.tensors}
    big_convs = {p for p, s in shapes.items() if len(s) > 2 and any(k != 1 for k in s[2:]) and not parts[p][3]}
    if cored and cored != big_convs:
        raise UnsupportedFeatureError("LoKr Tucker cores on some convolutions only", path=file, key=sorted(cored ^ big_convs)[0])
    ranks, alphas = {}, {}
    for m in modules:
        ac, bd, w1_full, w2_full, rank = parts[m.path]
        r = _peft_rank(ac, bd, w1_full, w2_full, rank, both, len(shapes[m.path]) > 2)
        if r is None:
            raise UnsupportedFeatureError("PEFT cannot build this module's LoKr halves for any r", path=file, key=m.path)
        ranks[m.path], alphas[m.path] = r, m.scaling * r
    from ..formats.wrapped.reading import exact_pattern

    r0 = min(set(ranks.values()), key=lambda k: (-list(ranks.values()).count(k), k))
    a0 = min(set(alphas.values()), key=lambda k: (-list(alphas.values()).count(k), k))
    return {
        **_LOKR_DEFAULTS, "r": r0, "alpha": a0, "decompose_factor": factor, "decompose_both": both, "use_effective_conv2d": bool(cored),
        "rank_pattern": {exact_pattern(p): r for p, r in sorted(ranks.items()) if r != r0},
        "alpha_pattern": {exact_pattern(p): a for p, a in sorted(alphas.items()) if a != a0},
        "target_modules": target_modules,
    }
