"""One module's factorization ``Δ ≈ B @ A``: randomized SVD first, certified against the optimum, exact SVD as the fallback.

The randomized SVD (Halko, Martinsson, Tropp 2011): a Gaussian sketch of ``l = k + p`` columns
(oversampling ``p``) and power iterations, each a Rayleigh–Ritz step: ``Y = Δ V`` and
``Z = Δᵀ Y = G V`` (``G = ΔᵀΔ``) give the Ritz values ``θ`` (eigenvalues of ``YᵀY``, lower bounds
of ``G``'s: ``θᵢ ≤ σᵢ²``), the Ritz residuals ``R = G V − V Θ`` and the next basis ``orth(Z)``.
The steps run in float32, whose Ritz values are accurate to a few float32 roundings (a sum of
``m`` products per element of ``Y``, errors of random sign): they certify a slack of at least
``16 ε₃₂`` of the kept energy (bf16 data: ``ε²/24`` is 21 times that). A finer slack (fp16 or
fp32 data) is certified only by steps in float64 on a float64 copy of Δ (its float32 values
exactly), taken once the float32 steps have made the sketch wide enough.
Whatever the path, the error reported is the exact residual ``‖Δ − B A‖_F`` of the factors as
stored (their dtype included), summed in float64 over blocks of rows — never an estimate.

The target per module comes from the rule:

* ``energy F``: the kept fraction of ``‖Δ‖²_F``, ``1 − ‖Δ − BA‖² / ‖Δ‖²``, must be ``≥ F``.
* ``rank N``: the top-N Ritz pairs must lose at most ``slack`` of energy against the best rank-N
  approximation, ``Σ_{i≤N} σᵢ² − Σ_{i≤N} θᵢ ≤ slack``, where ``slack`` is the rounding of the
  data's dtype: ``ε²/24 · Σ_{i≤N} θᵢ`` with ``ε`` the machine epsilon of the coarsest of the
  factors' and the two models' dtypes (storing the exact optimum's factors in that dtype adds at
  least that much in expectation: each element rounded to a relative spacing between ε/2 and ε),
  and at least ``(8 ε₃₂)² ‖Δ‖²`` (the float32 arithmetic of Δ and of the residual). Two bounds
  certify it without the exact SVD, whichever is smaller:

  - the energy the sketch misses, ``U = ‖Δ‖² − Σ_{i≤l} θᵢ`` (each ``σᵢ² − θᵢ ≥ 0``), measured as
    the stored residual minus ``Σ_{N<i≤l} θᵢ``; it certifies a delta of rank at most ``l``;
  - a gap bound (Schur complement): for a split ``K ≥ N`` where the Ritz values drop,
    ``Σ_{i≤K} (σᵢ² − θᵢ) ≤ ‖R_{≤K}‖²_F / η`` with ``η = θ_K − max(θ_{K+1}, U) − ‖R_{>K}‖_F`` > 0
    (``U`` bounds the largest eigenvalue of ``G`` outside the sketch, ``‖R_{>K}‖`` the coupling of
    the other Ritz vectors). It certifies a delta whose spectrum drops somewhere after ``N`` to
    a tail of energy below ``θ_K``: a fine-tune with a noisy tail.

  While ``U > θ_N`` (eigenvalues above ``θ_N`` may lie outside) the sketch is widened by
  ``U / θ_l`` columns plus the oversampling (at most that many eigenvalues the size of its
  smallest Ritz value ``θ_l`` are outside), up to half the full rank; then the exact SVD.

A randomized result that misses its target is replaced by ``torch.linalg.svd`` (``method:
exact``). ``svd="randomized"`` accepts the randomized result of ``--rank`` without the
certificate, ``svd="exact"`` always runs the exact SVD. Factors are split evenly, ``B = U √S``,
``A = √S Vᵀ``, with ``lora_alpha = rank`` (scaling 1).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..deltas.rank_rules import RankRule, kept_rank

#: Rows of Δ per block when the residual is summed (keeps the workspace to a few MB).
_RESIDUAL_ROWS = 1024
#: Rayleigh–Ritz steps of the certified (``auto``) randomized SVD before the exact SVD takes over.
_MAX_STEPS = 6
_EPS32 = torch.finfo(torch.float32).eps
#: The relative accuracy claimed for Ritz values from float32 products: a slack of at least this
#: fraction of the kept energy is certified by float32 steps (bf16 data: ε²/24 ≈ 2.5e-6, 21× this),
#: a finer one (fp16, fp32 data) by float64 steps.
_FLOAT32_RITZ = 16 * _EPS32


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
        block = torch.addmm(delta[r0:r1], bf[r0:r1], af, alpha=-1) if af.shape[0] else delta[r0:r1]
        total += float(torch.linalg.vector_norm(block, dtype=torch.float64)) ** 2
    return total


def slack(precision: torch.dtype, kept: float, total: float) -> float:
    """The energy a rank-N result may lose against the optimum (module docstring): the rounding of
    ``precision`` (the coarsest dtype of the data and the factors) on the kept energy, at least
    the float32 arithmetic's."""
    eps = torch.finfo(precision).eps
    return max(eps * eps / 24 * kept, (8 * _EPS32) ** 2 * total)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:k].clamp_min(0).sqrt()
    return (root[:, None] * vh[:k]).to(dtype).contiguous(), (u[:, :k] * root[None, :]).to(dtype).contiguous()


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small LAPACK calls (l × l, l ≲ 100) on one intra-op thread: with two, their OpenMP barriers
    spin on cores other processes share, and a call of microseconds took milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``x``'s columns: Cholesky QR twice (two products and a small
    triangular solve, several times faster than Householder on a thin tall matrix), Householder QR
    where the Gram is not positive definite (dependent columns: a delta of lower rank)."""
    q = x
    for _ in range(2):
        gram = q.T.double() @ q.double()
        with _one_thread():
            lower, info = torch.linalg.cholesky_ex(gram)
            inverse = torch.linalg.solve_triangular(lower, torch.eye(lower.shape[0], dtype=lower.dtype), upper=False) if int(info) == 0 else None
        if inverse is None:
            return torch.linalg.qr(x, mode="reduced").Q
        q = q @ inverse.T.to(x.dtype)  # Q = X L⁻ᵀ: one product instead of a triangular solve with n right-hand sides
    return q


def _kept(s: torch.Tensor, rule: RankRule, total: Optional[float] = None) -> int:
    """:func:`~adapterfmt.deltas.rank_rules.kept_rank` of these (leading, float32) singular values."""
    return kept_rank(s, rule, total=total, rtol=4 * torch.finfo(s.dtype).eps)


class _Sketch:
    """The subspace iteration on ``X`` (Δ, or Δᵀ when that is the tall side): ``V`` spans the
    right singular subspace; :meth:`step` is one Rayleigh–Ritz step. Once ``precise`` is set,
    the steps run in float64 (on a float64 copy of X, the basis re-orthonormalized in float64),
    so that the Ritz values, residuals and the energy outside are exact to float64 rounding, far
    below any dtype's slack; the sketch, its widening and the steps before stay float32."""

    def __init__(self, x: torch.Tensor, width: int, generator: torch.Generator) -> None:
        self.x = x
        self.generator = generator
        self.precise = False
        self.x64: Optional[torch.Tensor] = None
        self.v = self._fresh(width)

    def _fresh(self, width: int) -> torch.Tensor:
        omega = torch.randn(self.x.shape[1], width, generator=self.generator, dtype=self.x.dtype)
        return _orthonormal(self.x.T @ (self.x @ omega))

    @property
    def width(self) -> int:
        return self.v.shape[1]

    def widen(self, width: int) -> None:
        self.v = _orthonormal(torch.cat([self.v, self._fresh(width - self.width)], dim=1))

    def step(self, residuals: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Ritz values ``θ`` (descending, float64), vectors ``V``, ``Y = X V`` and (``residuals``)
        the column norms² of ``R = G V − V Θ``; the basis moves on to ``orth(G V)``."""
        if self.precise and self.x64 is None:
            self.x64 = self.x.double()
        x = self.x64 if self.precise else self.x
        v = _orthonormal(self.v.double()) if self.precise else self.v
        y = x @ v
        gram = y.T.double() @ y.double()
        with _one_thread():
            theta, w = torch.linalg.eigh(gram)
        theta, w = theta.flip(0).clamp_min(0), w.flip(1)
        wf = w.to(x.dtype)
        v, y = v @ wf, y @ wf
        norms = None
        if residuals:
            z = x.T @ y  # G V, rotated
            norms = ((z.double() - v.double() * theta[None, :]) ** 2).sum(0)
            self.v = _orthonormal(z.to(self.x.dtype))
        return theta, v, y, norms


def _gap_bound(theta: torch.Tensor, norms: torch.Tensor, n: int, outside: float) -> float:
    """The least bound over splits ``K ≥ n`` of ``Σ_{i≤K} (σᵢ² − θᵢ)`` (module docstring), inf if none."""
    l = theta.shape[0]
    th = theta.tolist()
    r = norms.tolist()
    tail = [0.0] * (l + 1)
    for i in range(l - 1, -1, -1):
        tail[i] = tail[i + 1] + r[i]
    best, head = math.inf, sum(r[:n])
    for k in range(n, l + 1):  # split after K = k values; the next Ritz value and the outside bound the rest
        eta = th[k - 1] - max(th[k] if k < l else 0.0, outside) - math.sqrt(tail[k])
        if eta > 0:
            best = min(best, head / eta)
        if k < l:
            head += r[k]
    return best


def _factors(theta: torch.Tensor, v: torch.Tensor, y: torch.Tensor, k: int, transposed: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``B, A`` of the rank-k projection ``X ≈ Y_k V_kᵀ`` (columns of Y orthogonal, norms² θ)."""
    quarter = theta[:k].sqrt().sqrt()
    inv = torch.where(quarter > 0, 1.0 / quarter.clamp_min(1e-300), torch.zeros_like(quarter)).to(y.dtype)
    left, right = y[:, :k] * inv[None, :], v[:, :k] * quarter.to(v.dtype)[None, :]
    if transposed:  # X = Δᵀ: Δ ≈ V_k Y_kᵀ
        left, right = right, left
    return right.T.to(dtype).contiguous(), left.to(dtype).contiguous()


def factorize(
    delta: torch.Tensor,
    rule: RankRule,
    *,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    precision: Optional[torch.dtype] = None,
    oversample: int = 10,
    power_iterations: int = 2,
    svd: str = "auto",
) -> Factors:
    """Factor a float32 ``(m, n)`` delta by ``rule`` (see the module docstring for the target).

    ``precision``: the coarsest dtype of the data (the two models' tensors) and ``dtype``, whose
    rounding is the ``--rank`` target's slack (default ``dtype``). ``svd``: ``auto`` (randomized,
    exact where it misses the target), ``randomized`` (the rank rule's randomized result taken as
    it is), ``exact``.
    """
    m, n = delta.shape
    full = min(m, n)
    total = residual(delta, delta[:, :0], delta[:0])  # ‖Δ‖², a block of rows at a time in float64
    if total == 0.0:
        empty = torch.zeros(0, n, dtype=dtype), torch.zeros(m, 0, dtype=dtype)
        return Factors(empty[0], empty[1], 0, 0.0, 0.0, "exact")
    want = min(full, int(rule.value)) if rule.kind == "rank" else min(full, 32)
    if svd != "exact" and want + oversample < full // 2:  # past half the full rank the exact SVD is as cheap
        f = _randomized(delta, rule, want + oversample, total, generator, dtype, precision or dtype, power_iterations, svd)
        if f is not None:
            return f
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = _kept(s, rule, total)
    a, b = _split(u, s, vh, k, dtype)
    return Factors(a, b, k, total, residual(delta, b, a), "exact")


def _stored(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, k: int, total: float, dtype: torch.dtype) -> Factors:
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    return Factors(a, b, k, total, residual(delta, b, a), "randomized")


def _randomized(
    delta: torch.Tensor, rule: RankRule, width: int, total: float, generator: torch.Generator, dtype: torch.dtype, precision: torch.dtype, iterations: int, svd: str
) -> Optional[Factors]:
    """The randomized result when it meets the rule's target (``svd="randomized"``: ``--rank``'s
    as it is), None for the exact SVD."""
    transposed = delta.shape[0] < delta.shape[1]
    x = delta.T if transposed else delta  # tall: the Ritz basis lives on the small side
    cap = min(delta.shape) // 2
    certify = rule.kind == "rank" and svd == "auto"
    sketch = _Sketch(x, width, generator)
    for step in range(1, _MAX_STEPS + 1):
        precise = sketch.precise
        theta, v, y, norms = sketch.step(residuals=certify or step < iterations)
        if rule.kind == "energy":
            k = _kept(theta.sqrt().float(), rule, total)
            if k == sketch.width and sketch.width < cap:  # the sketch holds too little energy: widen it
                sketch.widen(min(cap, 2 * sketch.width))
                continue
            if step < iterations:
                continue
            a, b = _factors(theta, v, y, k, transposed, dtype)
            f = Factors(a, b, k, total, residual(delta, b, a), "randomized")
            return f if f.retained_energy >= rule.value else None
        k = min(int(rule.value), sketch.width)
        if not certify:
            if step < iterations:
                continue
            a, b = _factors(theta, v, y, k, transposed, dtype)
            return Factors(a, b, k, total, residual(delta, b, a), "randomized")
        kept = float(theta[:k].sum())
        allowed = slack(precision, kept, total)
        outside = max(0.0, total - float(theta.sum()))  # ≥ every eigenvalue of G outside the sketch
        exact_enough = precise or allowed >= _FLOAT32_RITZ * kept  # float32 Ritz values resolve this slack
        if not exact_enough and outside <= max(float(theta[k - 1]), allowed + 1e-6 * total):  # wide enough: the next steps certify, in float64
            sketch.precise = True
            continue
        if exact_enough and outside <= allowed + 1e-6 * total:  # the sketch may hold (nearly) all: measure what it misses
            a, b = _factors(theta, v, y, k, transposed, torch.float32)
            measured = residual(delta, b, a)
            if measured - float(theta[k:].sum()) <= allowed:  # U, before the factors' rounding
                return Factors(a, b, k, total, measured, "randomized") if dtype == torch.float32 else _stored(delta, a, b, k, total, dtype)
        assert norms is not None
        if exact_enough and _gap_bound(theta, norms, k, outside) <= allowed:
            a, b = _factors(theta, v, y, k, transposed, dtype)
            return Factors(a, b, k, total, residual(delta, b, a), "randomized")
        if outside > float(theta[k - 1]):  # eigenvalues above θ_N may lie outside: widen past as many as the smallest Ritz value's size
            if sketch.width >= cap:
                return None
            smallest = max(float(theta[-1]), 1e-12 * total)
            sketch.widen(min(cap, sketch.width + math.ceil(outside / smallest) + width - k))
    return None
