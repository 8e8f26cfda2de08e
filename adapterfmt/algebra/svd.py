"""The exact SVD of a LoRA delta ``s·B·A`` from its factors, in O((m+n)·r²), no m×n matrix.

``B`` (m×r) and ``Aᵀ`` (n×r) are each written as an orthonormal basis times an r×r factor:
``B = Q_B·R_B``, ``Aᵀ = Q_A·R_A``. Then ``s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ`` and the SVD
``U·S·Vᵀ`` of the r×r core gives every singular value of the delta exactly; the dropped ones
give the exact error of a truncation. Only ``R_Bᵀ·R_B = BᵀB`` and ``R_Aᵀ·R_A = AAᵀ`` are needed,
so the R factors come from the float64 Gram matrices: their Cholesky factors, or, where a Gram
matrix is (numerically) singular — a zero-initialised ``lora_B``, repeated directions — its
symmetric square root by an eigendecomposition with the tiny eigenvalues taken as zero.

Why float64 Gram matrices and not a float32 Householder QR (whose backward error, ``ε₃₂·‖B‖``, is
at the level of float32 inputs' own rounding): the stored bf16 / f16 / f32 values are exact in
float64, and a float64 Gram matrix puts an error of at most about ``ε₆₄·σ₀²/σ_j`` on a singular
value ``σ_j`` of ``B`` — below the float32 QR's ``ε₃₂·σ₀`` for every ``σ_j`` above ``(ε₆₄/ε₃₂)·σ₀
≈ 2·10⁻⁹·σ₀``, and under that the QR's own error is larger than ``σ_j`` itself. So the float64
Gram loses nothing a float32 QR keeps, and it is cheaper here: on this code's machines one
14336×64 float32 QR (``mode="r"``) took 3.9 ms against 1.6 ms for the float64 Gram product
(one BLAS call); the cost of a module is the passes over its factors, not the arithmetic.

The bases are never formed and no R is inverted: ``Q_B·U_k = s·B·R_Aᵀ·V_k·S_k⁻¹`` and
``V_kᵀ·Q_Aᵀ = s·S_k⁻¹·U_kᵀ·R_B·A``, so the kept factors ``B′ = U_k·√S_k`` and
``A′ = √S_k·V_kᵀ`` are ``B·T_B`` and ``T_A·A`` with r×k matrices ``T_B``, ``T_A``, formed in
float64 and rounded once to the output dtype. Directions with ``S_j ≤ S₀·r·10⁻¹³`` carry no part
of the delta (zero factors for them; their ``S_j²`` counts as dropped).

The error of what is written is exact, not a bound, and costs O((m+n)·k²) instead of a cross
product with the source factors: with ``C = B·T_B``, ``D = T_A·A`` in float64 and the stored
``Ĉ = C + E_C``, ``D̂ = D + E_D``, ``Δ − Ĉ·D̂ = Δ_⊥ − X`` where ``Δ_⊥`` (the dropped part) is
orthogonal to the columns of ``C`` and the rows of ``D`` and ``X = E_C·D̂ + C·E_D``; so
``‖Δ − Ĉ·D̂‖² = ΣS_dropped² + ‖X‖² − 2·tr(E_Cᵀ·Δ_⊥·E_Dᵀ)``, ``‖X‖²`` from k×k Grams of the
rounding errors (no cancellation of large terms), and the last term — bounded by
``2·‖Δ_⊥‖·‖E_C‖·‖E_D‖`` — computed from the factors whenever that bound is above 10⁻¹² of the
rest (16-bit outputs of a truncation), dropped otherwise.

Two cases leave this path. A module with ``min(m, n) ≤ r`` (a rank above a layer's width: tiny
heads, some convolutions) has a delta no bigger than its factors: its dense float64 SVD is taken
and the error computed on the dense delta, exactly. Where a Gram matrix is rank-deficient
otherwise (a zero ``lora_B``, repeated directions), its tiny eigen-directions are taken as zero,
the factors are those of the delta without them (``B·P_B``, ``P_A·A``), and the error comes from
the cross products with the source factors, ``‖Δ‖² − 2⟨Δ, Ĉ·D̂⟩ + ‖Ĉ·D̂‖²``, exact to float64
rounding of ``‖Δ‖²`` — about √ε₆₄·‖Δ‖ (10⁻⁷) absolute, the resolution of a Gram matrix for
directions that small (zero for a zero delta). Convolution factors are flattened as
PEFT does (``B`` to ``out × r``, ``A`` to ``r × in·k…``) and reshaped back.

Big work buffers (the float64 copies of the factors) are reused per thread through a
:class:`Workspace`: a fresh multi-megabyte tensor per module costs more in page faults than the
arithmetic done on it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

#: Eigenvalues of a Gram matrix below ``max · r · _REL_TOL`` are taken as zero (a rank-deficient
#: factor, e.g. a zero-initialised ``lora_B``): their directions carry no part of the delta. The
#: same relative floor applies to Cholesky pivots (below it, the eigendecomposition is used) and
#: to the singular values of the delta (below ``S₀ · r · _REL_TOL`` a direction is dropped).
_REL_TOL = 1e-13

#: The term ``tr(E_Cᵀ·Δ_⊥·E_Dᵀ)`` of the error is computed when its bound exceeds this fraction of the rest.
_CROSS_TOL = 1e-12


class NonFiniteFactorError(ValueError):
    """A factor holds NaN or Inf; ``which`` is ``"A"`` or ``"B"`` (callers name the tensor)."""

    def __init__(self, which: str) -> None:
        super().__init__(f"{which} holds NaN or Inf values")
        self.which = which


class Workspace:
    """Reusable buffers of one thread, by slot name: a view of a buffer grown as needed.

    A view stays valid until the same slot is taken again: the caller finishes with one module's
    buffers before it starts the next module.
    """

    def __init__(self) -> None:
        self._tensors: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._bytes: dict[str, bytearray] = {}

    def take(self, slot: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` in the slot's buffer."""
        n = math.prod(shape)
        buf = self._tensors.get((slot, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._tensors[(slot, dtype)] = buf
        return buf[:n].view(*shape)

    def raw(self, slot: str, nbytes: int) -> bytearray:
        """A byte buffer of at least ``nbytes`` for reading a tensor into (see ``TensorSource.read``)."""
        buf = self._bytes.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = bytearray(nbytes)
            self._bytes[slot] = buf
        return buf


_local = threading.local()


def thread_workspace() -> Workspace:
    """The calling thread's :class:`Workspace` (one per thread, kept until :func:`release_workspace`
    or the thread's end)."""
    ws = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = Workspace()
    return ws


def release_workspace() -> None:
    """Drop the calling thread's :class:`Workspace` (its buffers are freed with the last view)."""
    _local.__dict__.pop("workspace", None)


def flatten_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` and ``A`` of any layer layout as 2-D matrices whose product is the flattened delta
    (``lora_B`` (out, r, 1, …) -> out×r; ``lora_A`` (r, in, k, …) -> r×(in·k…))."""
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


def unflatten_factors(b2: torch.Tensor, a2: torch.Tensor, b_like: Sequence[int], a_like: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`flatten_factors` for a new rank ``k = b2.shape[1]``: ``lora_B`` gets
    ``(out, k, 1, …)`` and ``lora_A`` ``(k, in, kernel…)``, like the shapes ``b_like`` / ``a_like``."""
    k = b2.shape[1]
    return b2.reshape(b_like[0], k, *b_like[2:]), a2.reshape(k, *a_like[1:])


@dataclass
class _Root:
    """An r×r ``R`` with ``Rᵀ·R = G`` (the kept part of a Gram matrix ``G``), and for a rank-deficient
    ``G`` the projector ``P`` onto its kept eigenvectors (``B·P = Q_B·R_B`` for ``G = BᵀB``)."""

    r: torch.Tensor
    proj: Optional[torch.Tensor] = None


def _r_factor(gram: torch.Tensor) -> _Root:
    """The Cholesky factor when every pivot is clear of the rank-deficiency floor, else
    ``diag(√λ)·Vᵀ`` from the eigendecomposition with the tiny λ taken as zero."""
    r = gram.shape[0]
    top = float(gram.diagonal().max()) if r else 0.0
    if top > 0:
        low, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0 and float(low.diagonal().min()) ** 2 > top * r * _REL_TOL:
            return _Root(low.T)
    lam, vec = torch.linalg.eigh(gram)
    lam = lam.clamp(min=0)
    keep = lam > (float(lam.max()) * r * _REL_TOL if lam.numel() else 0.0)
    root = torch.where(keep, lam.sqrt(), torch.zeros_like(lam))
    vk = vec[:, keep]
    return _Root(root[:, None] * vec.T, vk @ vk.T)


def _as_float64(t: torch.Tensor, slot: str, workspace: Optional[Workspace]) -> torch.Tensor:
    if t.dtype == torch.float64:
        return t
    if workspace is None:
        return t.double()
    return workspace.take(slot, t.shape, torch.float64).copy_(t)


@dataclass
class FactorSVD:
    """The SVD of ``scale·B·A`` (2-D, flattened) held as the float64 factors plus r×r matrices.

    ``singular_values`` are in float64, descending. :meth:`truncate` gives the best rank-k factors
    as stored and their exact error; :meth:`error` the error of any factors against the delta.
    """

    b: torch.Tensor  #: m×r, float64 (a workspace view when one was given)
    a: torch.Tensor  #: r×n, float64
    scale: float
    singular_values: torch.Tensor  #: float64, descending, length min(m, n, r)
    _rb: _Root  #: ``R_Bᵀ·R_B = BᵀB`` (its kept part)
    _ra: _Root  #: ``R_Aᵀ·R_A = AAᵀ`` (its kept part)
    _u: torch.Tensor  #: r×q, the core's left singular vectors (dense: m×q, the delta's)
    _vh: torch.Tensor  #: q×r, the core's right singular vectors (rows; dense: q×n, the delta's)
    _dense: Optional[torch.Tensor] = None  #: the m×n delta, when min(m, n) ≤ r made it the cheaper way

    def _squares(self) -> list[float]:
        """The squared singular values as Python floats (a few dozen: no torch call per sum)."""
        sq = self.__dict__.get("_sq")
        if sq is None:
            sq = self.__dict__["_sq"] = (self.singular_values**2).tolist()
        return sq

    @property
    def energy(self) -> float:
        """``‖Δ‖²_F`` = the sum of the squared singular values."""
        return math.fsum(self._squares())

    def retained_energy(self, k: int) -> float:
        """The fraction of ``‖Δ‖²`` the first ``k`` singular values hold (1 for a zero delta)."""
        total = self.energy
        return 1.0 if total == 0 else math.fsum(self._squares()[:k]) / total

    def truncation_error(self, k: int) -> float:
        """``‖Δ − Δ_k‖_F / ‖Δ‖_F`` from the dropped singular values (0 for a zero delta)."""
        total = self.energy
        return 0.0 if total == 0 else (math.fsum(self._squares()[k:]) / total) ** 0.5

    def _exact_factors(self, k: int, workspace: Optional[Workspace] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C, D, kept mask) in float64: ``C = U_k·√S_k`` (m×k) and ``D = √S_k·V_kᵀ`` (k×n)."""
        s = self.singular_values[:k]
        cut = float(self.singular_values[0]) * self.b.shape[1] * _REL_TOL if s.numel() else 0.0
        kept = s > cut
        if self._dense is not None:
            root = torch.where(kept, s, torch.zeros_like(s)).sqrt()
            return self._u[:, :k] * root, root[:, None] * self._vh[:k], kept
        inv = torch.where(kept, 1.0 / torch.where(kept, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s))
        t_b = (self._ra.r.T @ self._vh[:k].T) * (self.scale * inv)[None, :]  # s·R_Aᵀ·V_k·S_k^(-1/2)
        t_a = (self.scale * inv)[:, None] * (self._u[:, :k].T @ self._rb.r)  # s·S_k^(-1/2)·U_kᵀ·R_B
        if self._rb.proj is not None:  # B·P_B (= Q_B·R_B) in place of B
            t_b = self._rb.proj @ t_b
        if self._ra.proj is not None:
            t_a = t_a @ self._ra.proj
        if workspace is None:
            return self.b @ t_b, t_a @ self.a, kept
        c = torch.mm(self.b, t_b, out=workspace.take("svd.c", (self.b.shape[0], k), torch.float64))
        d = torch.mm(t_a, self.a, out=workspace.take("svd.d", (k, self.a.shape[1]), torch.float64))
        return c, d, kept

    def factors(self, k: int, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B′, A′)``: m×k and k×n with ``B′·A′`` the best rank-``k`` approximation of the delta,
        ``B′ = U_k·√S_k`` and ``A′ = √S_k·V_kᵀ``, formed in float64 and rounded once to ``dtype``."""
        c, d, _ = self._exact_factors(k)
        return (c, d) if dtype is None else (c.to(dtype), d.to(dtype))

    def truncate(self, k: int, dtype: torch.dtype, workspace: Optional[Workspace] = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B′, A′, error)``: :meth:`factors` rounded to ``dtype`` and ``‖Δ − B′·A′‖ / ‖Δ‖`` of
        exactly those stored values (module docstring), in O((m+n)·k²)."""
        c, d, kept = self._exact_factors(k, workspace)
        if dtype == torch.float64:
            c_hat, d_hat = c.clone(), d.clone()
        else:
            c_hat, d_hat = c.to(dtype), d.to(dtype)
        if self._dense is not None:
            ref = float(torch.linalg.vector_norm(self._dense))
            diff = float(torch.linalg.vector_norm(self._dense - c_hat.double() @ d_hat.double()))
            return c_hat, d_hat, diff / ref if ref else (0.0 if diff == 0 else math.inf)
        if self._rb.proj is not None or self._ra.proj is not None:  # directions of B or A taken as zero
            return c_hat, d_hat, self.error(c_hat, d_hat)
        total = self.energy
        sq = self._squares()
        err2 = math.fsum(sq[k:]) + math.fsum(x for x, keep in zip(sq[:k], kept.tolist()) if not keep)  # ‖Δ − C·D‖²: the dropped values
        if dtype != torch.float64:
            if workspace is None:
                e_c, e_d = c_hat.double() - c, d_hat.double() - d
            else:
                e_c = workspace.take("svd.ec", tuple(c.shape), torch.float64).copy_(c_hat).sub_(c)
                e_d = workspace.take("svd.ed", tuple(d.shape), torch.float64).copy_(d_hat).sub_(d)
            x2, ec2, ed2 = _rounding_energy(torch.where(kept, self.singular_values[:k], 0.0), c, d, e_c, e_d)
            dropped = err2
            err2 += x2
            if dropped > 0 and 2 * math.sqrt(dropped * ec2 * ed2) > _CROSS_TOL * err2:
                # tr(E_Cᵀ·Δ_⊥·E_Dᵀ) with Δ_⊥ = s·B·A − C·D
                err2 -= 2 * (self.scale * float(((e_c.T @ self.b) * (e_d @ self.a.T)).sum()) - float(((e_c.T @ c) * (e_d @ d.T)).sum()))
        if total <= 0:
            return c_hat, d_hat, 0.0 if err2 <= 0 else math.inf
        return c_hat, d_hat, math.sqrt(max(err2, 0.0) / total)

    def error(self, b2: torch.Tensor, a2: torch.Tensor) -> float:
        """``‖Δ − B₂·A₂‖_F / ‖Δ‖_F`` in float64 for any factors (r×k products, no m×n matrix)."""
        c, d = b2.double(), a2.double()
        new = float(((c.T @ c) * (d @ d.T)).sum())
        cross = self.scale * float(((self.b.T @ c) * (self.a @ d.T)).sum())  # ⟨s·B·A, C·D⟩ = s·tr(BᵀC·DAᵀ)
        return _relative(self.energy, cross, new)


def _rounding_energy(s: torch.Tensor, c: torch.Tensor, d: torch.Tensor, e_c: torch.Tensor, e_d: torch.Tensor) -> tuple[float, float, float]:
    """``(‖E_C·D̂ + C·E_D‖², ‖E_C‖², ‖E_D‖²)`` from k×k Grams, ``D̂ = D + E_D``: the energy the
    rounding adds. ``CᵀC = D·Dᵀ = diag(s)`` (the kept singular values: ``C``, ``D`` are ``U√S``,
    ``√S·Vᵀ`` in float64), so only the Grams with a rounding error in them are computed."""
    ecc, ecd = e_c.T @ e_c, e_c.T @ c
    edd, ded = e_d @ e_d.T, d @ e_d.T
    dd_hat = torch.diag(s) + ded + ded.T + edd  # D̂·D̂ᵀ
    x2 = float((ecc * dd_hat).sum()) + 2 * float((ecd * (ded + edd)).sum()) + float((s * edd.diagonal()).sum())
    return max(x2, 0.0), float(ecc.trace()), float(edd.trace())


def _exact_rounding_energy(c: torch.Tensor, d: torch.Tensor, e_c: torch.Tensor, e_d: torch.Tensor) -> float:
    """``‖E_C·D̂ + C·E_D‖²`` for any float64 ``C``, ``D`` (every Gram computed)."""
    d_hat = d + e_d
    x2 = (float(((e_c.T @ e_c) * (d_hat @ d_hat.T)).sum()) + 2 * float(((e_c.T @ c) * (d_hat @ e_d.T)).sum())
          + float(((c.T @ c) * (e_d @ e_d.T)).sum()))
    return max(x2, 0.0)


def exact_product_error(c: torch.Tensor, d: torch.Tensor, c_hat: torch.Tensor, d_hat: torch.Tensor, energy: float) -> float:
    """``‖C·D − Ĉ·D̂‖ / √energy`` for float64 ``C``, ``D`` and their stored ``Ĉ``, ``D̂`` (the error of
    an exact output — ``cat``, untruncated ``linear`` — rounded to its dtype), from k×k Grams."""
    e_c = c_hat.double() - c if c_hat.dtype != torch.float64 else torch.zeros_like(c)
    e_d = d_hat.double() - d if d_hat.dtype != torch.float64 else torch.zeros_like(d)
    x2 = _exact_rounding_energy(c, d, e_c, e_d)
    if energy <= 0:
        return 0.0 if x2 == 0 else math.inf
    return math.sqrt(x2 / energy)


def _relative(ref: float, cross: float, new: float) -> float:
    """``√(‖X‖² − 2⟨X, Y⟩ + ‖Y‖²) / ‖X‖`` (0 when both are zero, ``inf`` for a nonzero Y against X = 0)."""
    diff = max(ref - 2 * cross + new, 0.0)
    if ref <= 0:
        return 0.0 if diff == 0 else float("inf")
    return (diff / ref) ** 0.5


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 for float64 factors, else float32 (what ``cat`` computes its products in)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def factor_svd(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0, *, workspace: Optional[Workspace] = None) -> FactorSVD:
    """The exact SVD of ``scale·b·a`` for 2-D ``b`` (m×r) and ``a`` (r×n), from the factors.

    Everything is computed in float64 from the stored values: the singular values are exact to
    float64 rounding of the given factors. With ``workspace``, the float64 copies live in its
    buffers (the result is valid until the thread's next module).
    """
    if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"factor shapes {tuple(b.shape)} and {tuple(a.shape)} do not multiply")
    b64, a64 = _as_float64(b, "svd.b", workspace), _as_float64(a, "svd.a", workspace)
    gb, ga = b64.T @ b64, a64 @ a64.T
    # each diagonal entry is a sum of squares: NaN or ±Inf anywhere in a factor shows there (bf16 / f16 /
    # f32 values cannot overflow it in float64), at no extra pass over the factors
    for which, g in (("B", gb), ("A", ga)):
        if not bool(torch.isfinite(g.diagonal()).all()):
            raise NonFiniteFactorError(which)
    q = min(b.shape[0], a.shape[1], b.shape[1])  # the delta's rank is at most min(m, n, r)
    if min(b.shape[0], a.shape[1]) <= b.shape[1]:  # the m×n delta is no bigger than the factors: its own SVD
        dense = float(scale) * (b64 @ a64)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        eye = torch.eye(b.shape[1], dtype=torch.float64)
        return FactorSVD(b64, a64, float(scale), s[:q], _Root(eye), _Root(eye), u[:, :q], vh[:q], dense)
    rb, ra = _r_factor(gb), _r_factor(ga)
    uc, s, vch = torch.linalg.svd(float(scale) * (rb.r @ ra.r.T))  # the core s·R_B·R_Aᵀ
    return FactorSVD(b64, a64, float(scale), s[:q], rb, ra, uc[:, :q], vch[:q])


def stacked(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coefficients: Sequence[float],
            *, workspace: Optional[Workspace] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B₁ … B_k]`` and ``[c₁A₁; …; c_kA_k]`` in float64: ``Σ cᵢ·Bᵢ·Aᵢ`` as one factor pair of
    rank ``Σ rᵢ``, the coefficient on the A side (in ``workspace``'s buffers when given)."""
    total = sum(x.shape[1] for x in bs)
    if workspace is None:
        b = torch.empty(bs[0].shape[0], total, dtype=torch.float64)
        a = torch.empty(total, as_[0].shape[1], dtype=torch.float64)
    else:
        b = workspace.take("stack.b", (bs[0].shape[0], total), torch.float64)
        a = workspace.take("stack.a", (total, as_[0].shape[1]), torch.float64)
    at = 0
    for x, y, c in zip(bs, as_, coefficients):
        r = x.shape[1]
        b[:, at : at + r].copy_(x)
        a[at : at + r].copy_(y).mul_(float(c))
        at += r
    return b, a


def lowrank_error(b: torch.Tensor, a: torch.Tensor, scale: float, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """``‖scale·B·A − B₂·A₂‖_F / ‖scale·B·A‖_F`` in float64 from the factors alone (r×r Gram
    products, no m×n matrix); 0 when both are zero, ``inf`` for a nonzero B₂·A₂ against a zero delta."""
    b64, a64, c64, d64 = b.double() * float(scale), a.double(), b2.double(), a2.double()
    ref = float(((b64.T @ b64) * (a64 @ a64.T)).sum())  # tr(BᵀB·AAᵀ), both symmetric
    new = float(((c64.T @ c64) * (d64 @ d64.T)).sum())
    cross = float(((b64.T @ c64) * (a64 @ d64.T)).sum())  # tr(BᵀC·DAᵀ) = ⟨BA, CD⟩
    return _relative(ref, cross, new)
