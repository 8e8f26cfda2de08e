"""The exact SVD from the factors and the rank rules, against dense float64 deltas computed directly.

We test:
* :func:`factor_svd`: singular values, best rank-k factors and the errors equal the dense float64
  SVD of ``s·B·A`` for small and medium shapes, rank-deficient and zero factors, float32 / bf16
  storage, and convolution layouts flattened as PEFT does;
* :meth:`FactorSVD.truncate`: the factors rounded to float32 / bf16 / float16 / float64 and their
  error as stored equal the dense float64 oracle ‖Δ − B′·A′‖/‖Δ‖ to 10⁻⁹ relative (including a
  full-rank "truncation", where the error is the rounding alone), with or without a reused
  per-thread :class:`Workspace`; a dense delta (min(m, n) ≤ r) exactly; rank-deficient factors to
  float64 rounding of ‖Δ‖² (√ε₆₄ of ‖Δ‖);
* :func:`lowrank_error` equals the dense ‖Δ − Δ′‖/‖Δ‖;
* :func:`kept_rank`: each rule is the smallest / largest k its definition allows (brute force over
  k), without kohya's extra singular value; :func:`make_rule` refuses values outside each range.
"""

from __future__ import annotations

import math

import pytest
import torch

from adapterfmt.deltas.rank_rules import kept_rank, make_rule
from adapterfmt.algebra.svd import Workspace, exact_product_error, factor_svd, flatten_factors, lowrank_error, stacked, unflatten_factors
from adapterfmt.errors import InvalidConfigError


def _factors(m: int, n: int, r: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(m, r, generator=g, dtype=torch.float64) * torch.logspace(0, -3, r, dtype=torch.float64)
    a = torch.randn(r, n, generator=g, dtype=torch.float64)
    return b.to(dtype), a.to(dtype)


@pytest.mark.parametrize("m,n,r", [(12, 9, 4), (9, 12, 6), (300, 200, 32), (5, 7, 8)])
def test_singular_values_and_best_factors_equal_dense_svd(m, n, r):
    b, a = _factors(m, n, r, seed=m)
    scale = 0.37
    dense = scale * b @ a
    u, s, vh = torch.linalg.svd(dense)
    f = factor_svd(b, a, scale)
    q = min(m, n, r)
    assert torch.allclose(f.singular_values[:q], s[:q], rtol=1e-10, atol=1e-12 * float(s[0]))
    assert f.singular_values.shape == (q,)
    for k in sorted({1, max(1, q // 2), q}):
        nb, na = f.factors(k)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert torch.allclose(nb @ na, best, atol=1e-10 * float(s[0]))
        # B′ = U√S and A′ = √S·Vᵀ share the singular values
        assert torch.allclose(torch.linalg.norm(nb, dim=0), s[:k].sqrt(), rtol=1e-8)
        assert torch.allclose(torch.linalg.norm(na, dim=1), s[:k].sqrt(), rtol=1e-8)
        direct = float(torch.linalg.norm(dense - best) / torch.linalg.norm(dense))
        assert math.isclose(f.truncation_error(k), direct, rel_tol=1e-8, abs_tol=1e-12)
        assert math.isclose(lowrank_error(b, a, scale, nb, na), direct, rel_tol=1e-6, abs_tol=1e-7)
        assert math.isclose(f.retained_energy(k), float((s[:k] ** 2).sum() / (s**2).sum()), rel_tol=1e-10)


def test_rank_deficient_and_zero_factors():
    b, a = _factors(40, 30, 6, seed=1)
    b[:, 3] = b[:, 0]  # duplicate directions: rank 5
    a[5] = 0.0  # and a zero row: rank 4 at most
    f = factor_svd(b, a)
    dense = b @ a
    s = torch.linalg.svdvals(dense)
    assert torch.allclose(f.singular_values, s[:6], atol=1e-10 * float(s[0]))
    nb, na = f.factors(6)
    assert torch.allclose(nb @ na, dense, atol=1e-9 * float(s[0]))
    z = factor_svd(torch.zeros(10, 3), torch.randn(3, 8))  # PEFT's zero-initialised lora_B
    assert float(z.singular_values.abs().max()) == 0.0
    zb, za = z.factors(1)
    assert float((zb @ za).abs().max()) == 0.0 and z.retained_energy(1) == 1.0 and z.truncation_error(1) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_storage_is_exact_for_the_stored_values(dtype):
    b, a = _factors(64, 48, 8, seed=3, dtype=dtype)
    dense = b.double() @ a.double()
    s = torch.linalg.svdvals(dense)
    f = factor_svd(b, a)
    assert torch.allclose(f.singular_values, s[:8], rtol=1e-9, atol=1e-12 * float(s[0]))
    nb, na = f.factors(4, dtype)
    assert nb.dtype == na.dtype == dtype  # formed in float64, rounded once to the storage dtype
    u, s2, vh = torch.linalg.svd(dense)
    best = (u[:, :4] * s2[:4]) @ vh[:4]
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert float(torch.linalg.norm(nb.double() @ na.double() - best)) <= tol * float(torch.linalg.norm(best))
    assert abs(f.error(nb, na) - float(torch.linalg.norm(nb.double() @ na.double() - dense) / torch.linalg.norm(dense))) < 1e-7


def _dense_rel(dense: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    return float(torch.linalg.norm(dense - b2.double() @ a2.double()) / torch.linalg.norm(dense))


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_truncate_error_is_the_dense_error_of_the_stored_factors(source, out):
    ws = Workspace()
    for m, n, r, seed in ((300, 200, 32, 5), (64, 48, 8, 6)):  # one workspace, two shapes: buffers reused
        b, a = _factors(m, n, r, seed=seed, dtype=source)
        dense = 0.7 * b.double() @ a.double()
        for k in (1, r // 2, r):
            f = factor_svd(b, a, 0.7, workspace=ws)
            nb, na, err = f.truncate(k, out, ws)
            assert nb.dtype == na.dtype == out and nb.shape == (m, k) and na.shape == (k, n)
            want = _dense_rel(dense, nb, na)
            assert math.isclose(err, want, rel_tol=1e-9, abs_tol=1e-13), (m, k, err, want)
            assert want >= f.truncation_error(k) * (1 - 1e-12)  # never below Eckart–Young's bound
            nb2, na2, err2 = factor_svd(b, a, 0.7).truncate(k, out)  # no workspace: the same bits
            assert torch.equal(nb, nb2) and torch.equal(na, na2) and err == err2
            if out == torch.float32 and k == r:
                assert 1e-9 < err < 1e-6  # the float32 rounding alone, measured (not taken as zero)


@pytest.mark.parametrize("near", [0.0, 1e-7, 3e-7])
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_truncate_rank_deficient_factors(near, out):
    # a repeated (near = 0) or nearly repeated direction in B and a nearly zero row of A: both Grams
    # have eigenvalues below the floor, taken as zero (the factors are those of Δ without them); the
    # error comes from the cross-product formula, exact to float64 rounding of ‖Δ‖², i.e. to about
    # √ε₆₄·‖Δ‖ (10⁻⁷ here) — the resolution of a Gram matrix for directions that small
    b, a = _factors(40, 30, 6, seed=1)
    g = torch.Generator().manual_seed(9)
    b[:, 3] = b[:, 0] + near * torch.randn(40, generator=g, dtype=torch.float64)
    a[5] = near * torch.randn(30, generator=g, dtype=torch.float64)
    dense = 0.9 * b @ a
    f = factor_svd(b, a, 0.9)
    for k in (2, 4, 5, 6):
        nb, na, err = f.truncate(k, out)
        want = _dense_rel(dense, nb, na)
        assert math.isclose(err, want, rel_tol=1e-9, abs_tol=3e-7), (k, err, want)


def test_truncate_zero_delta():
    nb, na, err = factor_svd(torch.zeros(10, 3), torch.randn(3, 8)).truncate(2, torch.bfloat16)
    assert err == 0.0 and float(nb.abs().max()) == 0.0 and float(na.abs().max()) == 0.0


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_exact_product_error_is_the_rounding_of_an_exact_output(out):
    parts = [_factors(50, 40, r, seed=r, dtype=torch.bfloat16) for r in (3, 5)]
    b, a = stacked([p[0] for p in parts], [p[1] for p in parts], [0.3, -1.7])
    energy = float(torch.linalg.norm(b @ a)) ** 2
    nb, na = b.to(out), a.to(out)
    assert math.isclose(exact_product_error(b, a, nb, na, energy), _dense_rel(b @ a, nb, na), rel_tol=1e-9)


def test_conv_layout_round_trip():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)  # lora_A of a Conv2d(6, 7, 3)
    b = torch.randn(7, 5, 1, 1, generator=g, dtype=torch.float64)  # lora_B
    b2, a2 = flatten_factors(b, a)
    dense = (b.flatten(1) @ a.flatten(1)).reshape(7, 6, 3, 3)  # PEFT's conv delta
    f = factor_svd(b2, a2)
    nb, na = unflatten_factors(*f.factors(5), b.shape, a.shape)
    assert nb.shape == (7, 5, 1, 1) and na.shape == (5, 6, 3, 3)
    assert torch.allclose((nb.flatten(1) @ na.flatten(1)).reshape(7, 6, 3, 3), dense, atol=1e-10)


def test_stacked_factors_are_the_weighted_sum():
    parts = [_factors(20, 16, r, seed=r) for r in (3, 5)]
    coeffs = [0.7, -1.3]
    b, a = stacked([p[0] for p in parts], [p[1] for p in parts], coeffs)
    want = sum(c * p[0] @ p[1] for c, p in zip(coeffs, parts))
    assert b.shape == (20, 8) and torch.allclose(b @ a, want, atol=1e-12)


S = [4.0, 2.0, 1.0, 0.5, 0.0]


def _smallest(pred, n):
    return next(k for k in range(1, n + 1) if pred(k))


@pytest.mark.parametrize("value", [0.5, 0.75, 0.8, 0.941, 0.99, 1.0])
def test_energy_rule_is_the_smallest_rank_holding_the_fraction(value):
    total = sum(x * x for x in S)
    want = _smallest(lambda k: sum(x * x for x in S[:k]) >= value * total * (1 - 1e-12), len(S))
    assert kept_rank(S, make_rule("energy", value)) == want


@pytest.mark.parametrize("value", [0.5, 0.8, 0.9, 1.0])
def test_cumulative_rule(value):
    total = sum(S)
    want = _smallest(lambda k: sum(S[:k]) >= value * total * (1 - 1e-12), len(S))
    assert kept_rank(S, make_rule("cumulative", value)) == want
    assert kept_rank(torch.tensor(S, dtype=torch.float64), make_rule("cumulative", value)) == want  # a tensor too


@pytest.mark.parametrize("value,want", [(1.0, 1), (2.0, 2), (3.9, 2), (4.0, 3), (8.0, 4), (1e9, 4)])
def test_ratio_rule_keeps_values_at_least_s0_over_r(value, want):
    # kohya's sv_ratio would keep one more (and never fewer than 2): this is the rule itself
    assert kept_rank(S, make_rule("ratio", value)) == want


def test_rank_rule_and_zero_delta():
    assert kept_rank(S, make_rule("rank", 3)) == 3
    assert kept_rank(S, make_rule("rank", 99)) == 5
    for kind, v in (("energy", 0.9), ("ratio", 10), ("cumulative", 0.5)):
        assert kept_rank([0.0, 0.0], make_rule(kind, v)) == 1


@pytest.mark.parametrize("kind,value", [("energy", 0), ("energy", 1.01), ("cumulative", -0.1), ("ratio", 0.5), ("rank", 0), ("rank", 2.5),
                                        ("energy", float("nan")), ("median", 1)])
def test_make_rule_refuses(kind, value):
    with pytest.raises(InvalidConfigError):
        make_rule(kind, value)
