"""The blocked merge kernel: ``W + Σ s_i · (B_i @ A_i)`` a block of rows at a time, in cache, with PEFT's bits.

PEFT's default ``merge_and_unload`` on CPU computes ``P = B @ A`` in float32 (MKL sgemm),
``D = P · s`` in float32, and rounds ``float32(W) + D`` once to the weight's dtype
(docs/FORMAT.md §6). Scale, add and round are element-wise, so doing them a block of rows at a
time gives the same bits. The product is another matter: every output element is one dot product
over the rank, but *which code* sums it is MKL's choice, made from the matrix sizes, the thread
count and the CPU. Measured on an AMD EPYC (Zen 4, AVX-512): blocks of 1-3 rows of ``B`` give
other bits than the whole product (2.35 M of 4.2 M elements of a 2048×16 @ 16×2048 product),
blocks of 4 or more the same; for the transposed layouts (a block of columns of ``A``) blocks of
8 differ, 16 or more were equal (a short tail always folded into the block before it); tensors
of up to some ten thousand elements (9×64 @ 64×40, 3000×16 @ 16×17, 5000×4 @ 4×9) change bits
with the thread count. Another CPU drew the
line at two rows. None of these is a property of MKL, so the kernel keeps a wide margin from all
of them:

* a tensor is split only into blocks of at least :data:`MIN_BLOCK_ROWS` rows, each a multiple of
  :data:`ROW_QUANTUM` rows (so every block's factor starts as aligned as the whole one), and a
  tail shorter than :data:`MIN_BLOCK_ROWS` joins the block before it (:func:`row_blocks`);
* a tensor that does not make two such blocks is one block: the product is exactly PEFT's call
  on the whole tensor, and the caller runs it with PEFT's thread count — the process's
  intra-op threads, not the one thread per worker of the blocked tensors (:func:`whole_call`;
  the merge engine runs those tensors first, on its own thread).

``tests/merging/test_merge_kernel.py`` compares with PEFT's ``merge_and_unload`` computed on the
machine that runs it (the shapes that differed above included), never with a rule measured once.

Per block: ``B_blk @ A`` into a reused float32 buffer of about :data:`BLOCK_ELEMENTS` elements
(a few MiB, a small part of a large tensor), times ``s``, added to the base rows by one
``torch.add`` that widens them to float32 and, for the last term, rounds the sum once into a reused
output buffer. The read buffer (base rows), product, partial-sum and output buffers are reused
from block to block and tensor to tensor — no full-size float32 workspace, no zero-filled
allocation per tensor; their views are made once per tensor, so a block costs only its products
and sums (two torch calls for one LoRA term). One :class:`BlockedMerge` per thread.

Folding the scale into the product (``B @ (s·A)`` instead of ``(B @ A) · s``) saves a pass, and
is done only where it is provably bit-identical: ``s`` is a power of two and every non-zero
element of ``A``, ``s·A`` and ``B`` lies in ``[2^-40, 2^40]``. Then every intermediate of either
computation is zero or a normal float32 that is a multiple of ``2^-126`` (no subnormal, no
overflow), and multiplying by a power of two commutes with every rounding. ``s == 1`` needs no
multiply at all.

What this kernel does not take (:func:`blockable` says no, and the caller uses the whole-tensor
path of :mod:`adapterfmt.deltas.lora`): DoRA (its norm spans every row), trainable-token rows, bias
terms, 1-D tensors, and float64 inputs or outputs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch

from ..deltas.lora import CONV, CONV1D_TRANSPOSED, EMBEDDING, LINEAR

#: Elements per block of rows: 2 MiB of float32 for the product (6-8 MiB of buffers per thread).
#: Each block is a few torch calls (a product and a sum per LoRA term) and two system calls, and
#: each of them hands the GIL to the other worker thread, so fewer, larger blocks beat blocks that
#: fit a core's L2. The whole 1.1B merge on 2 cores (with 5 torch calls per block), runs of each
#: size interleaved in the same minutes: 128K elements 3.65-4.66 s, 256K 3.43-3.81 s, 512K
#: 3.17-3.73 s, 1M 3.20-3.64 s.
BLOCK_ELEMENTS = 1 << 19
#: The fewest rows in a block: MKL was seen to change its summation below 4 rows (plain layout) and
#: below 16 (transposed layouts) on one CPU and below 2 on another; eight times the largest of
#: those. It binds only for rows wider than ``BLOCK_ELEMENTS / MIN_BLOCK_ROWS`` (4096) elements:
#: 256 rows made TinyLlama's down_proj (5632 wide) 1.4x slower in the kernel (buffers out of
#: cache), 128 as fast as before. A tensor of fewer than twice this many rows is computed whole.
MIN_BLOCK_ROWS = 128
#: Every block but the last is a multiple of this many rows: a block's factor (rows of ``B``, or
#: columns of ``A``) starts at least 256 bytes after an aligned one, as the whole factor does.
ROW_QUANTUM = 64
#: dtypes the kernel reads and writes; float64 goes the whole-tensor way.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Bounds on |A|, |s·A| and |B| within which folding a power-of-two scale is exact (see above).
_FOLD_MIN, _FOLD_MAX = 2.0**-40, 2.0**40

#: ``read_rows(first, stop, into)``: fill ``into`` (a writable byte view the size of those rows of
#: the base tensor) and return None, or return the rows as a tensor (an in-memory base).
ReadRows = Callable[[int, int, memoryview], Optional[torch.Tensor]]


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA term as the kernel needs it: the saved ``lora_A`` and ``lora_B``, the scaling
    (adapter weight included) and the layout (:mod:`adapterfmt.deltas.lora`)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    layout: str


class Block(NamedTuple):
    """Output rows ``first:stop`` of the tensor. ``tensor`` and ``data`` (its bytes) are views of a
    reused buffer: valid until the next block is asked for."""

    first: int
    stop: int
    tensor: torch.Tensor
    data: memoryview


def blockable(shape: Sequence[int], base_dtype: torch.dtype, out_dtype: torch.dtype, layouts: Sequence[str]) -> bool:
    """Whether :class:`BlockedMerge` computes this tensor (LoRA terms only, of these layouts)."""
    return (
        len(shape) >= 2
        and math.prod(shape) > 0
        and base_dtype in DTYPES
        and out_dtype in DTYPES
        and bool(layouts)
        and all(layout in (LINEAR, CONV1D_TRANSPOSED, EMBEDDING, CONV) for layout in layouts)
    )


def row_blocks(rows: int, row_elements: int, block_elements: int = BLOCK_ELEMENTS) -> Iterator[tuple[int, int]]:
    """``(first, stop)`` of each block: about ``block_elements`` each, but never fewer than
    :data:`MIN_BLOCK_ROWS` rows, each block a multiple of :data:`ROW_QUANTUM` rows but the last,
    which takes the tail (so it has :data:`MIN_BLOCK_ROWS` rows or more too). A tensor of fewer
    than ``2 * MIN_BLOCK_ROWS`` rows is one block: the whole tensor (module docstring)."""
    step = max(MIN_BLOCK_ROWS, block_elements // max(1, row_elements) // ROW_QUANTUM * ROW_QUANTUM)
    first = 0
    while first < rows:
        stop = min(first + step, rows)
        if rows - stop < MIN_BLOCK_ROWS:
            stop = rows
        yield first, stop
        first = stop


def whole_call(shape: Sequence[int], block_elements: int = BLOCK_ELEMENTS) -> bool:
    """Whether the kernel computes this tensor's product as one call on the whole tensor (it makes
    no two blocks): the bits are PEFT's only when the call runs with PEFT's thread count, the
    process's, which the caller sees to (the merge engine runs such tensors on its own thread)."""
    rows = shape[0] if shape else 0
    return next(iter(row_blocks(rows, math.prod(shape[1:]), block_elements)), (0, 0))[1] >= rows


def power_of_two(x: float) -> bool:
    return x > 0 and math.isfinite(x) and math.frexp(x)[0] == 0.5


def _within_fold_bounds(t: torch.Tensor) -> bool:
    """Every non-zero ``|x|`` of ``t`` lies in ``[_FOLD_MIN, _FOLD_MAX]`` (element-wise passes, no
    gather of the non-zeros: this runs for every factor of every merged tensor)."""
    if t.numel() == 0:
        return True
    magnitude = t.abs()
    low, high = torch.aminmax(magnitude.masked_fill_(magnitude == 0, 1.0))  # a NaN fails both tests
    return float(low) >= _FOLD_MIN and float(high) <= _FOLD_MAX


def can_fold(a: torch.Tensor, b: torch.Tensor, scaling: float) -> bool:
    """Whether ``B @ (s·A)`` is provably bit-identical to ``(B @ A) · s`` (module docstring)."""
    if not power_of_two(scaling):
        return False
    return _within_fold_bounds(a) and _within_fold_bounds(b) and _within_fold_bounds(a * scaling)


@contextmanager
def intra_op_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block (None: left as they are). Only for
    a thread that computes alone: the setting is the process's."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Term:
    """A term prepared once per tensor: float32 factors in the layout's product order."""

    def __init__(self, factors: LoraFactors, rows: int, cols: int, threads: Optional[int] = None) -> None:
        a, b = factors.lora_a.float(), factors.lora_b.float()
        if factors.layout == CONV:
            a, b = a.flatten(1), b.flatten(1)
        self.transposed = factors.layout in (CONV1D_TRANSPOSED, EMBEDDING)
        product_shape = (b.shape[0], a.shape[1])
        if product_shape != ((cols, rows) if self.transposed else (rows, cols)):
            raise ValueError(f"a {factors.layout} product {product_shape} does not fit a weight of {rows} rows of {cols}")
        self.scaling = factors.scaling
        if factors.scaling == 1.0:
            self.multiply = False
        elif can_fold(a, b, factors.scaling):
            a, self.multiply = a * factors.scaling, False
        else:
            self.multiply = True
        self.a, self.b = a.contiguous(), b.contiguous()
        self.threads = threads

    def factor_blocks(self, blocks: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """The factor each block multiplies: rows of ``B`` (or, transposed, columns of ``A``)."""
        if self.transposed:
            return [self.a[:, first:stop] for first, stop in blocks]
        return [self.b[first:stop] for first, stop in blocks]

    def product(self, factor: torch.Tensor, views: "_BlockViews") -> torch.Tensor:
        """One block of ``s·P`` (rounded as PEFT rounds it), computed into the product buffer."""
        with intra_op_threads(self.threads):
            if self.transposed:  # rows of ΔW are columns of A: (B @ A[:, blk]).T
                p = torch.mm(self.b, factor, out=views.product_t).T
            else:
                p = torch.mm(factor, self.a, out=views.product)
        return p.mul_(self.scaling) if self.multiply else p


class _Buffer:
    """A growable byte buffer reused across blocks and tensors, viewed as any dtype."""

    def __init__(self) -> None:
        self._raw = bytearray(0)
        self._bytes = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> tuple[memoryview, torch.Tensor]:
        if len(self._raw) < nbytes:
            self._bytes = torch.empty(0, dtype=torch.uint8)
            self._raw = bytearray(0)  # drop the old one before allocating the new
            self._raw = bytearray(nbytes)
            self._bytes = torch.frombuffer(self._raw, dtype=torch.uint8)
        return memoryview(self._raw)[:nbytes], self._bytes[:nbytes]


class BlockedMerge:
    """Reused buffers plus the loop; one per thread (not thread-safe)."""

    def __init__(self, block_elements: int = BLOCK_ELEMENTS) -> None:
        self.block_elements = block_elements
        self._read, self._out = _Buffer(), _Buffer()
        self._product = torch.empty(0)
        self._acc = torch.empty(0)

    def _floats(self, which: str, n: int) -> torch.Tensor:
        buffer = getattr(self, which)
        if buffer.numel() < n:
            setattr(self, which, torch.empty(0))
            buffer = torch.empty(n)
            setattr(self, which, buffer)
        return buffer

    def merge(
        self,
        shape: Sequence[int],
        base_dtype: torch.dtype,
        out_dtype: torch.dtype,
        terms: Sequence[LoraFactors],
        read_rows: ReadRows,
        *,
        product_threads: Optional[int] = None,
    ) -> Iterator[Block]:
        """The merged tensor in blocks of rows, in order.

        ``W' = round_out(float32(W) + Σ_i s_i·(B_i @ A_i))``, the sum taken term by term in
        float32 (the first as ``s·P + W``, as PEFT adds), one rounding at the end.
        ``product_threads``: the intra-op threads of each product (the process's, PEFT's, for a
        :func:`whole_call` tensor computed where nothing runs beside it); the element-wise passes
        keep the caller's setting, their bits do not depend on it.
        """
        if not blockable(shape, base_dtype, out_dtype, [t.layout for t in terms]):
            raise ValueError(f"the blocked kernel does not take a {tuple(shape)} {base_dtype} -> {out_dtype} tensor with these terms")
        rows, cols = shape[0], math.prod(shape[1:])
        prepared = [_Term(t, rows, cols, product_threads) for t in terms]
        blocks = list(row_blocks(rows, cols, self.block_elements))
        factors = [term.factor_blocks(blocks) for term in prepared]
        in_size, out_size = torch.finfo(base_dtype).bits // 8, torch.finfo(out_dtype).bits // 8
        largest = max(stop - first for first, stop in blocks) * cols
        product = self._floats("_product", largest)
        acc_buffer = self._floats("_acc", largest)
        raw_in, bytes_in = self._read.get(largest * in_size)
        raw_out, bytes_out = self._out.get(largest * out_size)
        last = len(prepared) - 1
        views: dict[int, _BlockViews] = {}  # by rows per block: built once per tensor, not per block
        for (first, stop), *block_factors in zip(blocks, *factors):
            n = stop - first
            v = views.get(n)
            if v is None:
                v = views[n] = _BlockViews(n, shape, (base_dtype, in_size, raw_in, bytes_in), (out_dtype, out_size, raw_out, bytes_out), product, acc_buffer)
            held = read_rows(first, stop, v.raw_in)
            total = v.base if held is None else held.reshape(n, cols)  # W, in its own dtype
            # float32 rows read into our own buffer are summed in place (and written from there
            # when the output is float32 too); others are widened by the first add.
            in_place = held is None and base_dtype == torch.float32
            stays = in_place and out_dtype == torch.float32
            partial = v.base if in_place else v.acc
            for i, (term, factor) in enumerate(zip(prepared, block_factors)):
                # total + s·P in float32 (addition commutes: PEFT's bits); the last sum is rounded
                # once, straight into the output buffer
                total = torch.add(term.product(factor, v), total, out=v.out if i == last and not stays else partial)
            if stays:
                yield Block(first, stop, v.base_shaped, v.raw_in)
            else:
                yield Block(first, stop, v.out_shaped, v.raw_out)


class _BlockViews:
    """Views of the reused buffers for a block of ``n`` rows, made once per tensor and block size
    (each torch call is a GIL hand-off between the worker threads; per block there are only the
    products and the sums). ``read`` / ``write``: dtype, bytes per element, and the buffer as
    bytes and as a tensor."""

    __slots__ = ("raw_in", "base", "base_shaped", "acc", "product", "product_t", "out", "out_shaped", "raw_out")

    def __init__(
        self,
        n: int,
        shape: Sequence[int],
        read: tuple[torch.dtype, int, memoryview, torch.Tensor],
        write: tuple[torch.dtype, int, memoryview, torch.Tensor],
        product: torch.Tensor,
        acc: torch.Tensor,
    ) -> None:
        cols = math.prod(shape[1:])
        elements = n * cols
        (base_dtype, in_size, raw_in, bytes_in), (out_dtype, out_size, raw_out, bytes_out) = read, write
        in_bytes, out_bytes = elements * in_size, elements * out_size
        self.raw_in, self.raw_out = raw_in[:in_bytes], raw_out[:out_bytes]
        self.base = bytes_in[:in_bytes].view(base_dtype).view(n, cols)
        self.base_shaped = self.base.view(n, *shape[1:])
        self.acc = acc[:elements].view(n, cols)
        self.product = product[:elements].view(n, cols)
        self.product_t = product[:elements].view(cols, n)  # the transposed layouts' (B @ A[:, blk]), whose .T is the block
        self.out = bytes_out[:out_bytes].view(out_dtype).view(n, cols)
        self.out_shaped = self.out.view(n, *shape[1:])
