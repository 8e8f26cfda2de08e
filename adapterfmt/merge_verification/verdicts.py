"""Why a merged tensor differs from the expected one: statistics gathered block by block, then a verdict.

Comparing the observed change ``d = M − W`` with the expected change ``Δ`` (what the adapter adds)
tells most broken merges apart without guessing: ``d = 0`` (not applied), ``d ≈ 2Δ`` (applied
twice), ``d ≈ kΔ`` (the scale was off by ``k``; the factor is named when it is one of the usual
mistakes: alpha instead of alpha/r, alpha/r instead of alpha/√r and back, scaling left out),
``d ≈ Δᵀ`` (transposed: ``fan_in_fan_out`` ignored), ``d`` equal to another tensor's delta (the
wrong module, found by matching random sketches of every delta after the pass). The fit is a
least-squares projection, so rounding noise of a bf16 weight does not hide a factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

#: Verdict codes (BEHAVIOUR §11.3).
OK = "ok"
NOT_APPLIED = "not-applied"
APPLIED_TWICE = "applied-twice"
SCALE = "scale"
NEGATED = "negated"
TRANSPOSED = "transposed"
WRONG_MODULE = "wrong-module"
CHANGED = "changed"
ROUNDING = "rounding"
FULL_COPY_NOT_APPLIED = "full-copy-not-applied"
FULL_COPY_WRONG = "full-copy-wrong"
TIED_HEAD = "tied-head-not-untied"
DTYPE = "dtype"
UNEXPECTED = "unexpected-tensor"

#: How well ``d`` must line up with ``Δ`` (cosine) before a factor or a transpose is named.
_ALIGNED = 0.9
#: Relative tolerance on a fitted factor (bf16 rounding noise moves it by far less).
_FACTOR_TOL = 0.03

#: Mantissa bits and smallest normal exponent of each float dtype (for one ulp).
_FLOAT_BITS = {torch.float32: (23, -126), torch.float16: (10, -14), torch.bfloat16: (7, -126), torch.float64: (52, -1022)}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers (so that -0.0 differs from 0.0, and NaN equals itself)."""
    t = t.contiguous()
    return t.view(_INT_VIEW[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(bits(a), bits(b)))


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at ``|x|`` (float32 in, float32 out; subnormals included)."""
    mant, emin = _FLOAT_BITS.get(dtype, _FLOAT_BITS[torch.float32])
    _, exp = torch.frexp(x.abs())
    e = torch.clamp(exp - 1, min=emin) - mant
    return torch.ldexp(torch.ones_like(x), e.to(torch.int32)).to(torch.float32)


def sketch_vector(columns: int) -> torch.Tensor:
    """A fixed random vector per row width: ``X @ v`` fingerprints a tensor's rows (same seed for all)."""
    g = torch.Generator().manual_seed(1_000_003 + columns)
    return torch.randn(columns, generator=g, dtype=torch.float64).to(torch.float32)


@dataclass
class Stats:
    """Sums over a tensor's blocks (float32 within a block, Python floats across blocks)."""

    dd: float = 0.0  #: Σ d²
    DD: float = 0.0  #: Σ Δ²
    dD: float = 0.0  #: Σ d·Δ
    dDt: float = 0.0  #: Σ d·Δᵀ (square tensors)
    max_err: float = 0.0  #: max |M − (W + Δ)|
    sum_err: float = 0.0
    max_delta: float = 0.0
    sum_delta: float = 0.0
    n: int = 0
    over_ulp: int = 0  #: elements more than one ulp of the merged dtype from W + Δ
    worst_ulps: float = 0.0  #: the largest error in ulps
    equals_base: bool = True  #: every element of M has W's bits
    transposable: bool = False
    observed: list[torch.Tensor] = field(default_factory=list)  #: sketch of d, by blocks
    expected: list[torch.Tensor] = field(default_factory=list)  #: sketch of Δ, by blocks

    def add(self, w: torch.Tensor, m: torch.Tensor, r: torch.Tensor, delta: torch.Tensor, delta_t: Optional[torch.Tensor], out_dtype: torch.dtype, base_same: bool) -> None:
        """One block: ``w`` base (float32), ``m`` merged (its dtype), ``r`` = W + Δ unrounded,
        ``delta`` Δ, ``delta_t`` the block of Δᵀ (square tensors) or None."""
        mf = m.float()
        d = mf - w
        # float32 sums (torch sums in blocks): a verdict needs cosines and factors to a percent
        self.dd += float(torch.sum(d * d))
        self.DD += float(torch.sum(delta * delta))
        self.dD += float(torch.sum(d * delta))
        if delta_t is not None:
            self.transposable = True
            self.dDt += float(torch.sum(d * delta_t))
        err = (mf - r).abs()
        if err.numel():
            self.max_err = max(self.max_err, float(err.max()))
            self.max_delta = max(self.max_delta, float(delta.abs().max()))
            spacing = ulp(torch.maximum(r.abs(), delta.abs()), out_dtype)
            ratio = err / spacing
            self.worst_ulps = max(self.worst_ulps, float(ratio.max()))
            self.over_ulp += int((ratio > 1.0).sum())
        self.sum_err += float(err.sum())
        self.sum_delta += float(delta.abs().sum())
        self.n += err.numel()
        self.equals_base = self.equals_base and base_same
        if d.dim() >= 2 and d.shape[0]:
            v = sketch_vector(math.prod(d.shape[1:]))
            self.observed.append(d.reshape(d.shape[0], -1) @ v)
            self.expected.append(delta.reshape(delta.shape[0], -1) @ v)

    @property
    def max_error(self) -> Optional[float]:
        """max |M − (W+Δ)| in units of max |Δ|."""
        return self.max_err / self.max_delta if self.max_delta else None

    @property
    def mean_error(self) -> Optional[float]:
        """mean |M − (W+Δ)| in units of mean |Δ|."""
        return self.sum_err / self.sum_delta if self.sum_delta else None

    def sketch(self, which: str) -> Optional[torch.Tensor]:
        parts = self.observed if which == "observed" else self.expected
        return torch.cat(parts) if parts else None


def cosine(a: float, b: float, ab: float) -> float:
    return ab / math.sqrt(a * b) if a > 0 and b > 0 else 0.0


def name_factor(k: float, scaling: Optional[float], rank: Optional[int], alpha: Optional[float]) -> str:
    """``the merge used alpha/√r (rsLoRA) = 4 instead of 2`` when ``k·scaling`` is a usual mistake."""
    if scaling and rank and alpha is not None:
        used = k * scaling
        named = {
            "lora_alpha (not divided by r)": alpha,
            "alpha/r": alpha / rank,
            "alpha/√r (rsLoRA)": alpha / math.sqrt(rank),
            "1 (the scaling left out)": 1.0,
        }
        for name, value in named.items():
            if value and not math.isclose(value, scaling, rel_tol=_FACTOR_TOL) and abs(used / value - 1) < _FACTOR_TOL:
                return f"scale off by a factor of {k:.4g}: the merge used {name} = {value:.4g} instead of {scaling:.4g}"
    return f"scale off by a factor of {k:.4g}"


def classify(stats: Stats, *, scaling: Optional[float] = None, rank: Optional[int] = None, alpha: Optional[float] = None) -> tuple[str, str]:
    """``(code, detail)`` for a merged tensor that matched none of the accepted results."""
    if stats.equals_base:
        return NOT_APPLIED, "holds the base weight unchanged: the adapter was not applied"
    cos = cosine(stats.dd, stats.DD, stats.dD)
    k = stats.dD / stats.DD if stats.DD else 0.0
    if abs(cos) > _ALIGNED:
        if abs(k - 1) < _FACTOR_TOL:
            return ROUNDING, (
                f"the delta is applied but the bits differ (worst element {stats.worst_ulps:.3g} ulp of the merged dtype); "
                "a merge made on other hardware or in another order? try --tolerance ulp"
            )
        if abs(k - 2) < _FACTOR_TOL:
            return APPLIED_TWICE, "the change is twice the adapter's delta: the adapter was applied twice"
        if abs(k + 1) < _FACTOR_TOL:
            return NEGATED, "the change is minus the adapter's delta: it was subtracted (an unmerge applied to the base?)"
        return SCALE, name_factor(k, scaling, rank, alpha)
    if stats.transposable and abs(cosine(stats.dd, stats.DD, stats.dDt)) > _ALIGNED:
        return TRANSPOSED, "the change is the adapter's delta transposed: fan_in_fan_out (Conv1D layout) handled the wrong way"
    return CHANGED, "changed, but not by this adapter's delta"


def matches(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Whether two sketches are the same direction (cosine > 0.99)."""
    if a is None or b is None or a.shape != b.shape:
        return False
    na, nb = float(a.double().norm()), float(b.double().norm())
    return na > 0 and nb > 0 and float(a.double() @ b.double()) / (na * nb) > 0.99
