"""The exact SVD of a LoRA delta ``s·B·A`` from its factors, in O((m+n)·r²), no m×n matrix.

``B`` (m×r) and ``Aᵀ`` (n×r) are each written as an orthonormal basis times an r×r factor:
``B = Q_B·R_B``, ``Aᵀ = Q_A·R_A``. Then ``s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ`` and the SVD of the r×r
core gives every singular value of the delta exactly; the dropped ones give the exact error
of a truncation. The R factors are taken as the symmetric square roots of the Gram matrices
``BᵀB`` and ``AAᵀ`` (an eigendecomposition, in float64), which have the same core singular
values as a Householder QR at a fraction of the cost (two r×r products per module instead of a
tall QR). The bases are never formed either: the kept factors come out as ``B·T_B`` and
``T_A·A`` with r×k matrices ``T_B``, ``T_A``, so ``B′ = U_k·√S_k`` and ``A′ = √S_k·V_kᵀ``
share the singular values. Convolution factors are flattened as PEFT does (``B`` to
``out × r``, ``A`` to ``r × in·k…``) and reshaped back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: Eigenvalues of a Gram matrix below ``max · r · _REL_TOL`` are taken as zero (a rank-deficient
#: factor, e.g. a zero-initialised ``lora_B``): their directions carry no part of the delta.
_REL_TOL = 1e-13


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
    """The SVD of ``scale·B·A`` (2-D, flattened) held as the factors plus r×r matrices.

    ``singular_values`` are in float64, descending. :meth:`factors` gives the best rank-k factors.
    """

    b: torch.Tensor  #: m×r, compute dtype
    a: torch.Tensor  #: r×n, compute dtype
    singular_values: torch.Tensor  #: float64, descending, length min(m, n, r)
    _left: torch.Tensor  #: r×r: ``B·_left`` = U·diag(S)^0 (columns of U, before √S)
    _right: torch.Tensor  #: r×r: ``_right·A`` = Vᵀ (rows of Vᵀ)

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

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B′, A′)``: m×k and k×n with ``B′·A′`` the best rank-``k`` approximation of the delta,
        ``B′ = U_k·√S_k`` and ``A′ = √S_k·V_kᵀ``, in the compute dtype."""
        root = self.singular_values[:k].sqrt()
        left = (self._left[:, :k] * root).to(self.b.dtype)
        right = (root[:, None] * self._right[:k]).to(self.a.dtype)
        return self.b @ left, right @ self.a


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 for float64 factors, else float32 (the products that form the output factors)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def factor_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> FactorSVD:
    """The exact SVD of ``scale·b·a`` for 2-D ``b`` (m×r) and ``a`` (r×n), from the factors.

    The Gram matrices and the core are computed in float64 (the singular values are exact to
    float64 rounding of the given factors); the output factors are formed in :func:`compute_dtype`.
    """
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"factor shapes {tuple(b.shape)} and {tuple(a.shape)} do not multiply")
    dtype = compute_dtype(b.dtype, a.dtype)
    b = b.to(dtype)
    a = a.to(dtype)
    b64, a64 = b.double(), a.double()
    vb, rb = _root(b64.T @ b64)  # B = Q_B·R_B with R_B = diag(rb)·V_Bᵀ
    va, ra = _root(a64 @ a64.T)  # Aᵀ = Q_A·R_A with R_A = diag(ra)·V_Aᵀ
    core = float(scale) * (rb[:, None] * (vb.T @ va) * ra[None, :])  # R_B·R_Aᵀ
    uc, s, vch = torch.linalg.svd(core)
    inv_b = torch.where(rb > 0, 1.0 / torch.where(rb > 0, rb, torch.ones_like(rb)), torch.zeros_like(rb))
    inv_a = torch.where(ra > 0, 1.0 / torch.where(ra > 0, ra, torch.ones_like(ra)), torch.zeros_like(ra))
    left = (vb * inv_b[None, :]) @ uc  # Q_B = B·V_B·diag(1/rb) => U = B·left
    right = vch @ (inv_a[:, None] * va.T)  # Q_Aᵀ = diag(1/ra)·V_Aᵀ·A => Vᵀ = right·A
    q = min(b.shape[0], a.shape[1], b.shape[1])  # the delta's rank is at most min(m, n, r)
    return FactorSVD(b, a, s[:q], left[:, :q], right[:q])


def stacked(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coefficients: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B₁ … B_k]`` and ``[c₁A₁; …; c_kA_k]`` (2-D, compute dtype): ``Σ cᵢ·Bᵢ·Aᵢ`` as one factor pair
    of rank ``Σ rᵢ``; the coefficient goes on the A side, in the compute dtype."""
    dtype = compute_dtype(*(t.dtype for t in (*bs, *as_)))
    b = torch.cat([x.to(dtype) for x in bs], dim=1)
    a = torch.cat([x.to(dtype) * float(c) for x, c in zip(as_, coefficients)], dim=0)
    return b, a


def lowrank_error(b: torch.Tensor, a: torch.Tensor, scale: float, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """``‖scale·B·A − B₂·A₂‖_F / ‖scale·B·A‖_F`` in float64 from the factors alone (r×r Gram
    products; 0 when both are zero, 1 when only the reference is zero... or inf for a nonzero B₂A₂)."""
    b64, a64, c64, d64 = b.double() * float(scale), a.double(), b2.double(), a2.double()
    ref = float(((b64.T @ b64) * (a64 @ a64.T)).sum())  # tr(BᵀB·AAᵀ), both symmetric
    new = float(((c64.T @ c64) * (d64 @ d64.T)).sum())
    cross = float(((b64.T @ c64) * (a64 @ d64.T)).sum())  # tr(BᵀC·DAᵀ) = ⟨BA, CD⟩
    diff = max(ref - 2 * cross + new, 0.0)
    if ref == 0:
        return 0.0 if diff == 0 else float("inf")
    return (diff / ref) ** 0.5
