"""The exact SVD of a LoRA delta ``s·B·A`` from its factors, in O((m+n)·r²), no m×n matrix.

``B`` (m×r) and ``Aᵀ`` (n×r) are each written as an orthonormal basis times an r×r factor:
``B = Q_B·R_B``, ``Aᵀ = Q_A·R_A``. Then ``s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ`` and the SVD of the r×r
core gives every singular value of the delta exactly; the dropped ones give the exact error
of a truncation. The R factors are taken as the symmetric square roots of the Gram matrices
``BᵀB`` and ``AAᵀ`` (an eigendecomposition, in float64), which have the same core singular
values as a Householder QR at a fraction of the cost (two r×r products per module instead of a
tall QR). The bases are never formed either: the kept factors come out as ``B·T_B`` and
``T_A·A`` with r×k matrices ``T_B``, ``T_A``, so ``B′ = U_k·√S_k`` and ``A′ = √S_k·V_kᵀ``
share the singular values. Everything is float64 from the stored values; the output factors are
rounded once to the caller's dtype, and :meth:`FactorSVD.error` gives the exact error of what
was rounded. Convolution factors are flattened as PEFT does (``B`` to
``out × r``, ``A`` to ``r × in·k…``) and reshaped back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

#: Eigenvalues of a Gram matrix below ``max · r · _REL_TOL`` are taken as zero (a rank-deficient
#: factor, e.g. a zero-initialised ``lora_B``): their directions carry no part of the delta.
_REL_TOL = 1e-13


class NonFiniteFactorError(ValueError):
    """A factor holds NaN or Inf; ``which`` is ``"A"`` or ``"B"`` (callers name the tensor)."""

    def __init__(self, which: str) -> None:
        super().__init__(f"{which} holds NaN or Inf values")
        self.which = which


def flatten_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` and ``A`` of any layer layout as 2-D matrices whose product is the flattened delta
    (``lora_B`` (out, r, 1, …) -> out×r; ``lora_A`` (r, in, k, …) -> r×(in·k…))."""
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


def unflatten_factors(b2: torch.Tensor, a2: torch.Tensor, b_like: Sequence[int], a_like: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`flatten_factors` for a new rank ``k = b2.shape[1]``: ``lora_B`` gets
    ``(out, k, 1, …)`` and ``lora_A`` ``(k, in, kernel…)``, like the shapes ``b_like`` / ``a_like``."""
    k = b2.shape[1]
    return b2.reshape(b_like[0], k, *b_like[2:]), a2.reshape(k, *a_like[1:])


def _root(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvectors V, square roots of the eigenvalues): ``gram = V·diag(root²)·Vᵀ``, tiny ones zero."""
    lam, vec = torch.linalg.eigh(gram)
    lam = lam.clamp(min=0)
    cut = float(lam.max()) * gram.shape[0] * _REL_TOL if lam.numel() else 0.0
    root = torch.where(lam > cut, lam.sqrt(), torch.zeros_like(lam))
    return vec, root


@dataclass
class FactorSVD:
    """The SVD of ``scale·B·A`` (2-D, flattened) held as the float64 factors plus r×r matrices.

    ``singular_values`` are in float64, descending. :meth:`factors` gives the best rank-k factors,
    :meth:`error` the exact relative error of any factors (after rounding) against the delta.
    """

    b: torch.Tensor  #: m×r, float64
    a: torch.Tensor  #: r×n, float64
    scale: float
    singular_values: torch.Tensor  #: float64, descending, length min(m, n, r)
    _left: torch.Tensor  #: r×q: ``B·_left`` = U
    _right: torch.Tensor  #: q×r: ``_right·A`` = Vᵀ

    @property
    def energy(self) -> float:
        """``‖Δ‖²_F`` = the sum of the squared singular values."""
        return float((self.singular_values**2).sum())

    def retained_energy(self, k: int) -> float:
        """The fraction of ``‖Δ‖²`` the first ``k`` singular values hold (1 for a zero delta)."""
        total = self.energy
        return 1.0 if total == 0 else float((self.singular_values[:k] ** 2).sum()) / total

    def truncation_error(self, k: int) -> float:
        """``‖Δ − Δ_k‖_F / ‖Δ‖_F`` from the dropped singular values (0 for a zero delta)."""
        total = self.energy
        return 0.0 if total == 0 else (float((self.singular_values[k:] ** 2).sum()) / total) ** 0.5

    def factors(self, k: int, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B′, A′)``: m×k and k×n with ``B′·A′`` the best rank-``k`` approximation of the delta,
        ``B′ = U_k·√S_k`` and ``A′ = √S_k·V_kᵀ``, formed in float64 and rounded once to ``dtype``."""
        root = self.singular_values[:k].sqrt()
        b2, a2 = self.b @ (self._left[:, :k] * root), (root[:, None] * self._right[:k]) @ self.a
        return (b2, a2) if dtype is None else (b2.to(dtype), a2.to(dtype))

    def error(self, b2: torch.Tensor, a2: torch.Tensor) -> float:
        """``‖Δ − B₂·A₂‖_F / ‖Δ‖_F`` in float64 from the factors (r×k products, no m×n matrix)."""
        c, d = b2.double(), a2.double()
        new = float(((c.T @ c) * (d @ d.T)).sum())
        cross = self.scale * float(((self.b.T @ c) * (self.a @ d.T)).sum())  # ⟨s·B·A, C·D⟩ = s·tr(BᵀC·DAᵀ)
        return _relative(self.energy, cross, new)


def _relative(ref: float, cross: float, new: float) -> float:
    """``√(‖X‖² − 2⟨X, Y⟩ + ‖Y‖²) / ‖X‖`` (0 when both are zero, ``inf`` for a nonzero Y against X = 0)."""
    diff = max(ref - 2 * cross + new, 0.0)
    if ref <= 0:
        return 0.0 if diff == 0 else float("inf")
    return (diff / ref) ** 0.5


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 for float64 factors, else float32 (what ``cat`` computes its products in)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def factor_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> FactorSVD:
    """The exact SVD of ``scale·b·a`` for 2-D ``b`` (m×r) and ``a`` (r×n), from the factors.

    Everything is computed in float64 from the stored values: the singular values are exact to
    float64 rounding of the given factors.
    """
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"factor shapes {tuple(b.shape)} and {tuple(a.shape)} do not multiply")
    b64, a64 = b.double(), a.double()
    gb, ga = b64.T @ b64, a64 @ a64.T
    # each diagonal entry is a sum of squares: NaN or ±Inf anywhere in a factor shows there (bf16 / f16 /
    # f32 values cannot overflow it in float64), at no extra pass over the factors
    for which, g in (("B", gb), ("A", ga)):
        if not bool(torch.isfinite(g.diagonal()).all()):
            raise NonFiniteFactorError(which)
    vb, rb = _root(gb)  # B = Q_B·R_B with R_B = diag(rb)·V_Bᵀ
    va, ra = _root(ga)  # Aᵀ = Q_A·R_A with R_A = diag(ra)·V_Aᵀ
    core = float(scale) * (rb[:, None] * (vb.T @ va) * ra[None, :])  # R_B·R_Aᵀ
    uc, s, vch = torch.linalg.svd(core)
    inv_b = torch.where(rb > 0, 1.0 / torch.where(rb > 0, rb, torch.ones_like(rb)), torch.zeros_like(rb))
    inv_a = torch.where(ra > 0, 1.0 / torch.where(ra > 0, ra, torch.ones_like(ra)), torch.zeros_like(ra))
    q = min(b.shape[0], a.shape[1], b.shape[1])  # the delta's rank is at most min(m, n, r)
    left = (vb * inv_b[None, :]) @ uc[:, :q]  # Q_B = B·V_B·diag(1/rb) => U = B·left
    right = vch[:q] @ (inv_a[:, None] * va.T)  # Q_Aᵀ = diag(1/ra)·V_Aᵀ·A => Vᵀ = right·A
    return FactorSVD(b64, a64, float(scale), s[:q], left, right)


def stacked(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B₁ … B_k]`` and ``[c₁A₁; …; c_kA_k]`` in float64: ``Σ cᵢ·Bᵢ·Aᵢ`` as one factor pair of
    rank ``Σ rᵢ``, the coefficient on the A side."""
    b = torch.cat([x.double() for x in bs], dim=1)
    a = torch.cat([x.double() * float(c) for x, c in zip(as_, coefficients)], dim=0)
    return b, a


def lowrank_error(b: torch.Tensor, a: torch.Tensor, scale: float, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """``‖scale·B·A − B₂·A₂‖_F / ‖scale·B·A‖_F`` in float64 from the factors alone (r×r Gram
    products, no m×n matrix); 0 when both are zero, ``inf`` for a nonzero B₂·A₂ against a zero delta."""
    b64, a64, c64, d64 = b.double() * float(scale), a.double(), b2.double(), a2.double()
    ref = float(((b64.T @ b64) * (a64 @ a64.T)).sum())  # tr(BᵀB·AAᵀ), both symmetric
    new = float(((c64.T @ c64) * (d64 @ d64.T)).sum())
    cross = float(((b64.T @ c64) * (a64 @ d64.T)).sum())  # tr(BᵀC·DAᵀ) = ⟨BA, CD⟩
    return _relative(ref, cross, new)
