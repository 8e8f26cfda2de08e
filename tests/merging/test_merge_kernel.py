"""The blocked merge kernel gives PEFT's bits: against PEFT's own ``merge_and_unload`` computed on
the machine that runs the test (never a rule measured on one CPU) — the TinyLlama shapes (random
bf16 / fp16 / fp32 bases), every layout, several terms, the scale folded or not, block sizes asked
for as small as two rows, tiny rank-64 tensors at one and two intra-op threads — and against
adapterfmt's whole-tensor math (:mod:`adapterfmt.deltas.lora`) where PEFT itself rounds differently
(k×k conv, bf16 embeddings). The harness runs a tensor the way the merge engine does: one intra-op
thread, but (:func:`whole_call`) a whole-tensor product with the process's threads.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator, Optional

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

from adapterfmt.merging import kernel as merge_kernel
from adapterfmt.deltas.lora import CONV, CONV1D_TRANSPOSED, EMBEDDING, LINEAR, add_scaled, lora_product
from adapterfmt.merging.kernel import MIN_BLOCK_ROWS, ROW_QUANTUM, BlockedMerge, LoraFactors, blockable, can_fold, row_blocks, whole_call

#: The TinyLlama-1.1B projection shapes (out, in): q/o, gate/up, down, k/v.
TINYLLAMA = {"q_proj": (2048, 2048), "up_proj": (5632, 2048), "down_proj": (2048, 5632), "k_proj": (256, 2048)}


@contextmanager
def one_thread() -> Iterator[None]:
    """The merge engine runs the kernel with one intra-op thread per worker; PEFT with the default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kernel(
    weight: torch.Tensor, terms: list[LoraFactors], *, out_dtype: Optional[torch.dtype] = None, block: int = merge_kernel.BLOCK_ELEMENTS,
    from_bytes: bool = True, merger: Optional[BlockedMerge] = None,
) -> torch.Tensor:  # fmt: skip
    """The kernel's output assembled from its blocks; base rows read as bytes (as from a file) or held."""
    merger = merger or BlockedMerge(block)
    flat = weight.reshape(weight.shape[0], -1).contiguous()
    raw = flat.view(torch.uint8).reshape(weight.shape[0], -1)

    def read_rows(first: int, stop: int, into: memoryview) -> Optional[torch.Tensor]:
        if not from_bytes:
            return weight[first:stop]
        into[:] = memoryview(raw[first:stop].contiguous().reshape(-1).numpy())
        return None

    out = torch.empty(weight.shape, dtype=out_dtype or weight.dtype)
    done = 0
    whole = whole_call(tuple(weight.shape), merger.block_elements)
    threads = torch.get_num_threads()
    with one_thread():  # as the engine runs it: a whole-tensor product with the process's threads
        for block_ in merger.merge(tuple(weight.shape), weight.dtype, out.dtype, terms, read_rows, product_threads=threads if whole else None):
            assert block_.first == done and (whole or block_.stop - block_.first >= MIN_BLOCK_ROWS)
            assert block_.data.nbytes == block_.tensor.numel() * block_.tensor.element_size()
            out[block_.first : block_.stop] = block_.tensor
            done = block_.stop
    assert done == weight.shape[0]
    return out


def whole_tensor(weight: torch.Tensor, terms: list[LoraFactors], out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """adapterfmt's whole-tensor math (delta.py), the path the kernel replaces."""
    acc = None
    for t in terms:
        product = lora_product(t.lora_a, t.lora_b, t.layout, weight.shape)
        acc = add_scaled(torch.empty(weight.shape), product, t.scaling, first=weight) if acc is None else add_scaled(acc, product, t.scaling)
    return acc.to(out_dtype or weight.dtype)


def peft_factors(model: torch.nn.Module, name: str, layout: str, adapter: str = "default") -> LoraFactors:
    layer = model.get_submodule(f"base_model.model.{name}")
    if layout == EMBEDDING:
        a, b = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    else:
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return LoraFactors(a.detach().clone(), b.detach().clone(), layer.scaling[adapter], layout)


class Projections(torch.nn.Module):
    def __init__(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        for name, (out, inp) in shapes.items():
            self.add_module(name, torch.nn.Linear(inp, out, bias=False))


def test_row_blocks_cover_every_row_with_wide_blocks_only() -> None:
    """Every block has MIN_BLOCK_ROWS rows or more and all but the last a multiple of ROW_QUANTUM,
    whatever block size is asked for; a tensor too small for two such blocks is one (whole_call)."""
    for rows in (*range(1, 40), 127, 128, 129, 255, 256, 257, 383, 511, 512, 513, 767, 768, 769, 1000, 2048, 5632, 32001):
        for row_elements, block in ((1, 1), (5, 10), (7, 3 * 7), (4, 1 << 16), (100, 150), (2048, 2 * 2048), (2048, 1 << 19), (17, 1 << 19)):
            blocks = list(row_blocks(rows, row_elements, block))
            assert [b[0] for b in blocks] == [0] + [b[1] for b in blocks[:-1]] and blocks[-1][1] == rows
            assert whole_call((rows, row_elements), block) == (blocks == [(0, rows)])
            if rows < 2 * MIN_BLOCK_ROWS:
                assert blocks == [(0, rows)]
            assert all(stop - first >= MIN_BLOCK_ROWS for first, stop in blocks) or blocks == [(0, rows)]
            assert all((stop - first) % ROW_QUANTUM == 0 for first, stop in blocks[:-1])


def test_fold_only_for_powers_of_two_within_bounds() -> None:
    a, b = torch.randn(4, 8) * 0.01, torch.randn(8, 4) * 0.01
    assert can_fold(a, b, 2.0) and can_fold(a, b, 0.25) and can_fold(a, b, 1.0)
    assert not can_fold(a, b, 1.5) and not can_fold(a, b, 2.0 / 3) and not can_fold(a, b, -2.0)
    tiny = a.clone()
    tiny[0, 0] = 2.0**-41  # a product could leave the normal range
    assert not can_fold(tiny, b, 2.0) and not can_fold(a, b, 2.0**-40)
    big = a.clone()
    big[0, 0] = 2.0**39
    assert can_fold(big, b, 2.0) and not can_fold(big, b, 4.0)  # s·A could overflow a product's sum
    zeros = a.clone()
    zeros[1] = 0.0  # zeros are exact either way
    assert can_fold(zeros, b, 2.0)


@pytest.mark.parametrize(
    "dtype, alpha, block",
    [
        (torch.bfloat16, 32, merge_kernel.BLOCK_ELEMENTS),  # s = 2: folded into the product
        (torch.float16, 24, 3 * 2048),  # s = 1.5: multiplied; 3-row blocks asked for, MIN_BLOCK_ROWS made
        (torch.float32, 16, 1 << 18),  # s = 1: no multiply at all
    ],
)
def test_tinyllama_shapes_match_peft_merge_and_unload(dtype: torch.dtype, alpha: int, block: int) -> None:
    torch.manual_seed(0)
    model = Projections(TINYLLAMA).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    wrapped = get_peft_model(model, LoraConfig(r=16, lora_alpha=alpha, target_modules=list(TINYLLAMA), init_lora_weights=False))
    base = {n: wrapped.get_submodule(f"base_model.model.{n}").base_layer.weight.detach().clone() for n in TINYLLAMA}
    terms = {n: peft_factors(wrapped, n, LINEAR) for n in TINYLLAMA}
    merged = wrapped.merge_and_unload()
    merger = BlockedMerge(block)  # one for every tensor: its buffers are reused
    for i, name in enumerate(TINYLLAMA):
        ours = kernel(base[name], [terms[name]], merger=merger, from_bytes=i % 2 == 0)
        ref = merged.get_submodule(name).weight
        assert ours.dtype == ref.dtype and torch.equal(ours, ref), name


def test_one_row_tensor_and_two_adapters_with_weights_match_peft_in_fp32() -> None:
    """Two adapters on one module, scalings times non-power-of-two weights; a one-row weight."""
    torch.manual_seed(1)
    model = Projections({"proj": (1, 64), "wide": (9, 40)})
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "wide"], init_lora_weights=False), adapter_name="a0")
    wrapped.add_adapter("a1", LoraConfig(r=2, lora_alpha=3, target_modules=["proj", "wide"], init_lora_weights=False))
    for layer in (wrapped.get_submodule("base_model.model.proj"), wrapped.get_submodule("base_model.model.wide")):
        for name in ("a1",):
            torch.nn.init.normal_(layer.lora_B[name].weight)
        layer.scaling["a0"] *= 0.7
        layer.scaling["a1"] *= 0.3
    base = {n: wrapped.get_submodule(f"base_model.model.{n}").base_layer.weight.detach().clone() for n in ("proj", "wide")}
    terms = {n: [peft_factors(wrapped, n, LINEAR, a) for a in ("a0", "a1")] for n in ("proj", "wide")}
    wrapped.base_model.set_adapter(["a0", "a1"])
    merged = wrapped.merge_and_unload()
    for name in ("proj", "wide"):
        for block in (1, 4 * 40):  # one-row blocks asked for: the kernel makes them two rows
            assert torch.equal(kernel(base[name], terms[name], block=block), merged.get_submodule(name).weight), name


class Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(96, 32)  # transformers Conv1D: weight (in, out)
        self.emb = torch.nn.Embedding(301, 24)
        self.conv1 = torch.nn.Conv2d(16, 12, 1)
        self.conv3 = torch.nn.Conv2d(6, 8, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_embedding_and_conv_layouts(dtype: torch.dtype) -> None:
    """Conv1D and 1x1 conv against PEFT; the embedding too in fp32 (in bf16 PEFT rounds its delta
    first, docs/FORMAT.md §6.8) and the k×k conv (PEFT uses conv2d) against the whole-tensor math."""
    torch.manual_seed(2)
    model = Layers().to(dtype)
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "emb", "conv1", "conv3"], init_lora_weights=False, fan_in_fan_out=True)
    wrapped = get_peft_model(model, config)
    layouts = {"c_attn": CONV1D_TRANSPOSED, "emb": EMBEDDING, "conv1": CONV, "conv3": CONV}
    base = {n: wrapped.get_submodule(f"base_model.model.{n}").base_layer.weight.detach().clone() for n in layouts}
    terms = {n: peft_factors(wrapped, n, layout) for n, layout in layouts.items()}
    merged = wrapped.merge_and_unload()
    for name in layouts:
        for block in (64, merge_kernel.BLOCK_ELEMENTS):
            ours = kernel(base[name], [terms[name]], block=block)
            assert torch.equal(ours, whole_tensor(base[name], [terms[name]])), (name, block)
            if name in ("c_attn", "conv1") or (name == "emb" and dtype == torch.float32):
                assert torch.equal(ours, merged.get_submodule(name).weight), (name, block)


def test_folded_scale_equals_multiplied_and_the_guard_keeps_tiny_values_exact() -> None:
    torch.manual_seed(3)
    weight = (torch.randn(600, 70) * 0.05).to(torch.bfloat16)
    a, b = torch.randn(8, 70) * 0.02, torch.randn(600, 8) * 0.02
    for scaling in (2.0, 0.125, 4.0):
        term = LoraFactors(a, b, scaling, LINEAR)
        assert merge_kernel._Term(term, 600, 70).multiply is False
        assert torch.equal(kernel(weight, [term], block=6 * 70), whole_tensor(weight, [term]))
    tiny = a.clone()
    tiny[:, :3] *= 1e-12  # below the fold bound: the product is multiplied instead
    term = LoraFactors(tiny, b, 2.0, LINEAR)
    assert merge_kernel._Term(term, 600, 70).multiply is True
    assert torch.equal(kernel(weight, [term]), whole_tensor(weight, [term]))


def test_output_dtype_and_reused_buffers() -> None:
    torch.manual_seed(4)
    a, b = torch.randn(4, 300), torch.randn(600, 4)
    term = LoraFactors(a, b, 0.5, LINEAR)
    merger = BlockedMerge(1 << 12)
    for base_dtype, out_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float16, torch.float16)):
        weight = torch.randn(600, 300).to(base_dtype)
        assert torch.equal(kernel(weight, [term], out_dtype=out_dtype, merger=merger), whole_tensor(weight, [term], out_dtype))
    buffers = (merger._read._raw, merger._out._raw, merger._product.data_ptr())
    kernel(torch.randn(100, 300), [LoraFactors(a, b[:100], 0.5, LINEAR)], merger=merger)  # a smaller tensor: nothing allocated
    assert (merger._read._raw, merger._out._raw, merger._product.data_ptr()) == buffers


def test_every_path_of_a_block_sums_as_the_whole_tensor_math() -> None:
    """One, two and three terms; a base read as bytes or held; every dtype pair: the first add widens
    the base, a middle one sums in float32, the last rounds into the output (or, float32 in and
    out, the sum stays in the read buffer) — the same bits as delta.py's whole-tensor math."""
    torch.manual_seed(6)
    weight32 = torch.randn(600, 70)  # blocks of 128, 128, 128 and 216 rows
    terms = [
        LoraFactors(torch.randn(3, 70), torch.randn(600, 3), 0.75, LINEAR),
        LoraFactors(torch.randn(5, 600), torch.randn(70, 5), 2.0, EMBEDDING),
        LoraFactors(torch.randn(2, 70), torch.randn(600, 2) * 1e-3, 1.0, LINEAR),
    ]
    merger = BlockedMerge(1 << 10)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for base_dtype, out_dtype, count, from_bytes in itertools.product(dtypes, dtypes, (1, 2, 3), (True, False)):
        weight, used = weight32.to(base_dtype), terms[:count]
        got = kernel(weight, used, out_dtype=out_dtype, from_bytes=from_bytes, merger=merger)
        assert torch.equal(got, whole_tensor(weight, used, out_dtype)), (base_dtype, out_dtype, count, from_bytes)


class Wide(torch.nn.Module):
    """TinyLlama's q_proj and k_proj, and a GPT-2 ``c_attn`` (transformers Conv1D, a transposed layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(2048, 2048, bias=False)
        self.k_proj = torch.nn.Linear(2048, 256, bias=False)
        self.c_attn = Conv1D(2304, 768)  # weight (768, 2304)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
def test_two_row_blocks_asked_for_still_give_peft_bits() -> None:
    """Blocks of two rows asked for (on an AMD EPYC, MKL sums 1-3-row blocks of a 2048x16 @
    16x2048 product otherwise than the whole): the kernel makes wide blocks and gives PEFT's bits."""
    torch.manual_seed(7)
    wrapped = get_peft_model(Wide(), LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "c_attn"], init_lora_weights=False, fan_in_fan_out=True))
    layouts = {"q_proj": LINEAR, "k_proj": LINEAR, "c_attn": CONV1D_TRANSPOSED}
    base = {n: wrapped.get_submodule(f"base_model.model.{n}").base_layer.weight.detach().clone() for n in layouts}
    terms = {n: peft_factors(wrapped, n, layout) for n, layout in layouts.items()}
    merged = wrapped.merge_and_unload()
    for name in layouts:
        cols = base[name].shape[1]
        for rows_asked in (2, 3, 6, 48):
            assert torch.equal(kernel(base[name], [terms[name]], block=rows_asked * cols), merged.get_submodule(name).weight), (name, rows_asked)


@pytest.mark.parametrize("threads", [1, 2])
def test_tiny_rank_64_tensors_give_peft_bits_at_its_thread_count(threads: int) -> None:
    """Tiny tensors with a large rank, where MKL's bits change with the thread count (9x64 @ 64x40
    on an AMD EPYC): PEFT merging with ``threads`` intra-op threads, the kernel under the same
    setting (one whole call with the process's threads, as the engine runs it)."""
    shapes = {"wide": (9, 40), "narrow": (33, 17), "tall": (301, 24), "row": (1, 64)}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(8)
        wrapped = get_peft_model(Projections(shapes), LoraConfig(r=64, lora_alpha=48, target_modules=list(shapes), init_lora_weights=False))
        base = {n: wrapped.get_submodule(f"base_model.model.{n}").base_layer.weight.detach().clone() for n in shapes}
        terms = {n: peft_factors(wrapped, n, LINEAR) for n in shapes}
        merged = wrapped.merge_and_unload()
        for name in shapes:
            assert whole_call(shapes[name])
            assert torch.equal(kernel(base[name], [terms[name]]), merged.get_submodule(name).weight), name
    finally:
        torch.set_num_threads(before)


def test_what_the_kernel_does_not_take() -> None:
    assert blockable((4, 4), torch.bfloat16, torch.bfloat16, [LINEAR])
    assert not blockable((4,), torch.float32, torch.float32, [LINEAR])  # a bias
    assert not blockable((4, 4), torch.float64, torch.float32, [LINEAR])
    assert not blockable((4, 4), torch.float32, torch.float64, [LINEAR])
    assert not blockable((4, 4), torch.float32, torch.float32, [])
    assert not blockable((0, 4), torch.float32, torch.float32, [LINEAR])
    with pytest.raises(ValueError):
        list(BlockedMerge().merge((4,), torch.float32, torch.float32, [LoraFactors(torch.ones(1, 1), torch.ones(4, 1), 1.0, LINEAR)], lambda *a: None))
    assert peft.__version__.startswith("0.21")
