"""Unit tests of adapterfmt.deltas.lora, the merge math shared by the merge engine and the loader.

Each function is checked against the formula written out independently (PEFT's order of
operations, docs/FORMAT.md §6), on small random tensors, with exact equality where the library
promises bit-identical results.
"""

from __future__ import annotations

import pytest
import torch

from adapterfmt.deltas.lora import CONV, CONV1D_TRANSPOSED, EMBEDDING, LINEAR, add_scaled, dora_weight, lora_delta, lora_product, merged_weight

G = torch.Generator().manual_seed(0)


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def test_linear_product_and_delta_are_b_at_a_scaled() -> None:
    a, b = _rand(4, 6), _rand(5, 4)
    assert torch.equal(lora_product(a, b, LINEAR, (5, 6)), b @ a)
    assert torch.equal(lora_delta(a, b, 0.5, LINEAR, (5, 6)), (b @ a) * 0.5)


def test_transposed_layouts_give_the_weight_shape() -> None:
    a, b = _rand(3, 6), _rand(5, 3)
    assert torch.equal(lora_product(a, b, CONV1D_TRANSPOSED, (6, 5)), (b @ a).T)
    # embedding: lora_embedding_A (r, V), lora_embedding_B (D, r); the weight is (V, D)
    emb_a, emb_b = _rand(3, 10), _rand(4, 3)
    assert torch.equal(lora_product(emb_a, emb_b, EMBEDDING, (10, 4)), (emb_b @ emb_a).T)


def test_conv_product_flattens_kernels() -> None:
    a, b = _rand(2, 3, 3, 3), _rand(4, 2, 1, 1)
    got = lora_product(a, b, CONV, (4, 3, 3, 3))
    assert got.shape == (4, 3, 3, 3)
    assert torch.equal(got, (b.flatten(1) @ a.flatten(1)).reshape(4, 3, 3, 3))


def test_half_inputs_are_multiplied_in_float32() -> None:
    a, b = _rand(4, 6).half(), _rand(5, 4).half()
    got = lora_product(a, b, LINEAR, (5, 6))
    assert got.dtype == torch.float32 and torch.equal(got, b.float() @ a.float())


def test_out_buffer_gives_the_same_bits_and_is_used() -> None:
    a, b = _rand(4, 6), _rand(5, 4)
    buffer = torch.empty(64)
    got = lora_product(a, b, LINEAR, (5, 6), out=buffer)
    assert torch.equal(got, b @ a)
    assert got.data_ptr() == buffer.data_ptr()


def test_wrong_shape_and_unknown_layout_raise() -> None:
    a, b = _rand(4, 6), _rand(5, 4)
    with pytest.raises(ValueError, match="does not match weight shape"):
        lora_product(a, b, LINEAR, (6, 5))
    with pytest.raises(ValueError, match="unknown layout"):
        lora_product(a, b, "rotary", (5, 6))
    with pytest.raises(ValueError, match="unknown layout"):
        dora_weight(_rand(5, 6), _rand(5, 6), _rand(5), "rotary")


def test_add_scaled_rounds_like_peft_with_and_without_first() -> None:
    w, p = _rand(5, 6), _rand(5, 6)
    expected = w + p * 0.25
    assert torch.equal(add_scaled(w.clone(), p, 0.25), expected)
    buffer = torch.empty(5, 6)
    got = add_scaled(buffer, p, 0.25, first=w)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, expected)


def test_dora_linear_normalises_each_output_row() -> None:
    w, d, m = _rand(5, 6), _rand(5, 6), _rand(5).abs()
    v = w + d
    expected = (m / torch.linalg.norm(v, dim=1)).view(-1, 1) * v
    assert torch.allclose(dora_weight(w, d, m, LINEAR), expected, atol=0, rtol=1e-6)
    # onto: the norm comes from ``weight``, the factor applies to ``onto + delta``
    onto = _rand(5, 6)
    got = dora_weight(w, d, m, LINEAR, onto=onto)
    assert torch.allclose(got, (m / torch.linalg.norm(v, dim=1)).view(-1, 1) * (onto + d), atol=0, rtol=1e-6)


def test_dora_embedding_normalises_each_column_and_conv1d_is_transposed() -> None:
    w, d, m = _rand(10, 4), _rand(10, 4), _rand(4).abs()
    v = w + d
    assert torch.allclose(dora_weight(w, d, m, EMBEDDING), v * (m / torch.linalg.norm(v, dim=0)), rtol=1e-6, atol=0)
    wt, dt, mt = _rand(6, 5), _rand(6, 5), _rand(5).abs()  # Conv1D stores (in, out)
    got = dora_weight(wt, dt, mt, CONV1D_TRANSPOSED)
    linear = dora_weight(wt.T.contiguous(), dt.T.contiguous(), mt, LINEAR)
    assert got.shape == (6, 5) and torch.allclose(got, linear.T, rtol=1e-6, atol=0)


def test_dora_conv_normalises_each_output_channel() -> None:
    w, d, m = _rand(4, 3, 2, 2), _rand(4, 3, 2, 2), _rand(1, 4, 1, 1).abs()
    v = w + d
    norm = v.flatten(1).norm(dim=1)
    expected = (m.view(-1) / norm).view(-1, 1, 1, 1) * v
    assert torch.allclose(dora_weight(w, d, m, CONV), expected, rtol=1e-6, atol=0)


def test_merged_weight_sums_in_float32_and_rounds_once() -> None:
    w = _rand(5, 6).to(torch.bfloat16)
    d1, d2 = _rand(5, 6) * 1e-3, _rand(5, 6) * 1e-3
    got = merged_weight(w, [d1, d2])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (w.float() + d1 + d2).to(torch.bfloat16))
    assert merged_weight(w, [d1], out_dtype=torch.float32).dtype == torch.float32
