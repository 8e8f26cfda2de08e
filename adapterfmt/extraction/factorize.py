"""One module's factorization ``Δ ≈ B @ A``: randomized SVD first, its error computed exactly, exact SVD as the fallback.

The randomized SVD (Halko, Martinsson, Tropp 2011): a Gaussian sketch ``Δ Ω`` with ``l = k + p``
columns (oversampling ``p``), ``q`` power iterations re-orthonormalised by QR, then the exact SVD
of the small ``Qᵀ Δ``. Its singular values are lower bounds of Δ's, so the rank it picks for an
energy rule is never below the exact rule's. Whatever the path, the error reported is the exact
residual ``‖Δ − B A‖_F`` of the factors as stored (their dtype included), summed in float64 over
blocks of rows — never an estimate.

The target per module comes from the rule:

* ``energy F``: the kept fraction of ``‖Δ‖²_F``, ``1 − ‖Δ − BA‖² / ‖Δ‖²``, must be ``≥ F``;
* ``rank N``: the residual must be within ``tolerance`` of the best rank-N residual, certified
  without the exact SVD by the lower bound ``‖Δ − Δ_N‖² ≥ Σ_{N<i≤l} σ̃_i²`` (Ritz values of the
  sketch interlace Δ's): ``res² − bound ≤ tolerance² · ‖Δ‖²``. A delta of rank at most ``l``
  (a merged LoRA, say) passes; a delta with a flat tail cannot be certified and gets the exact SVD.

A randomized result that misses its target is replaced by ``torch.linalg.svd`` (``method:
exact``). ``svd="randomized"`` accepts the randomized result of ``--rank`` without the
certificate (the fast mode for dense deltas; its error is still the exact residual, reported),
``svd="exact"`` always runs the exact SVD. Factors are split evenly, ``B = U √S``,
``A = √S Vᵀ``, with ``lora_alpha = rank`` (scaling 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..deltas.rank_rules import RankRule, kept_rank

#: Rows of Δ per block when the residual is summed (keeps the workspace to a few MB).
_RESIDUAL_ROWS = 1024


@dataclass
class Factors:
    """``Δ ≈ B @ A`` for one module, with its exact error."""

    a: torch.Tensor  #: (k, n), stored dtype
    b: torch.Tensor  #: (m, k), stored dtype
    rank: int
    total: float  #: ‖Δ‖²_F
    residual: float  #: ‖Δ − B A‖²_F, exact, with the stored factors
    method: str  #: ``randomized`` or ``exact``

    @property
    def retained_energy(self) -> float:
        return 1.0 - self.residual / self.total if self.total > 0 else 1.0

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.residual / self.total) if self.total > 0 else 0.0


def residual(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """``‖Δ − B A‖²_F``, exactly: the product of the stored factors, a block of rows at a time, summed in float64."""
    bf, af = b.float(), a.float()
    total = 0.0
    for r0 in range(0, delta.shape[0], _RESIDUAL_ROWS):
        r1 = min(r0 + _RESIDUAL_ROWS, delta.shape[0])
        block = delta[r0:r1] - bf[r0:r1] @ af if af.shape[0] else delta[r0:r1]
        total += float(torch.sum(block.double() ** 2))
    return total


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:k].clamp_min(0).sqrt()
    return (root[:, None] * vh[:k]).to(dtype).contiguous(), (u[:, :k] * root[None, :]).to(dtype).contiguous()


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def _randomized(delta: torch.Tensor, width: int, power_iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U S Vh`` of the best approximation of Δ within a ``width``-column sketch of its range."""
    omega = torch.randn(delta.shape[1], width, generator=generator, dtype=delta.dtype)
    q = _orthonormal(delta @ omega)
    for _ in range(power_iterations):
        q = _orthonormal(delta @ _orthonormal(delta.T @ q))
    ub, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)
    return q @ ub, s, vh


def _kept(s: torch.Tensor, rule: RankRule, total: Optional[float] = None) -> int:
    """:func:`~adapterfmt.deltas.rank_rules.kept_rank` of these (leading, float32) singular values."""
    return kept_rank(s, rule, total=total, rtol=4 * torch.finfo(s.dtype).eps)


def _meets(f: Factors, rule: RankRule, bound: float, tolerance: float) -> bool:
    if rule.kind == "energy":
        return f.retained_energy >= rule.value
    return f.residual - bound <= tolerance * tolerance * f.total


def factorize(
    delta: torch.Tensor,
    rule: RankRule,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    oversample: int = 10,
    power_iterations: int = 2,
    tolerance: float = 1e-3,
    svd: str = "auto",
) -> Factors:
    """Factor a float32 ``(m, n)`` delta by ``rule`` (see the module docstring for the target).

    ``svd``: ``auto`` (randomized, exact where it misses the target), ``randomized`` (the
    rank rule's randomized result taken as it is), ``exact``.
    """
    m, n = delta.shape
    full = min(m, n)
    total = float(torch.sum(delta.double() ** 2))
    if total == 0.0:
        empty = torch.zeros(0, n, dtype=dtype), torch.zeros(m, 0, dtype=dtype)
        return Factors(empty[0], empty[1], 0, 0.0, 0.0, "exact")
    want = min(full, int(rule.value)) if rule.kind == "rank" else min(full, 32)
    width = min(full, want + oversample)
    while svd != "exact" and width < full // 2:  # past half the full rank the exact SVD is as cheap
        u, s, vh = _randomized(delta, width, power_iterations, generator)
        k = _kept(s, rule, total)
        if rule.kind == "energy" and k == width and width < full:
            width = min(full, width * 2)  # the sketch holds too little energy: widen it
            continue
        a, b = _split(u, s, vh, k, dtype)
        f = Factors(a, b, k, total, residual(delta, b, a), "randomized")
        bound = float(torch.sum(s[k:].double() ** 2))  # ≤ the best rank-k residual
        if _meets(f, rule, bound, tolerance) or (svd == "randomized" and rule.kind == "rank"):
            return f
        break
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = _kept(s, rule, total)
    a, b = _split(u, s, vh, k, dtype)
    return Factors(a, b, k, total, residual(delta, b, a), "exact")
