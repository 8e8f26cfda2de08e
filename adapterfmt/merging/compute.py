"""What a merge computes: each output tensor, ``W + Σ terms``, in its output dtype, in blocks of rows.

The math is :mod:`adapterfmt.deltas.lora`'s (PEFT's order of operations: ``ΔW = (B @ A) · s`` in float32,
added to the base weight in float32, rounded once). Tensors made of LoRA terms only go through
the blocked kernel, :mod:`adapterfmt.merging.kernel`: the product of a block of rows of ``B`` with
``A`` into a reused cache-sized buffer, scaled, added and rounded into reused buffers — the same
bits as PEFT's whole-tensor product (blocks of 128 rows or more; a tensor too small for two is
one call on the whole tensor, see that module and :func:`on_callers_threads`). The rest (DoRA,
whose norm spans every row; trainable-token rows; ``lora_bias``; full copies and dtype
conversions; float64) gets its full ``B @ A`` product in one matmul, the call PEFT makes, and is
then scaled, added and rounded in blocks of rows (:func:`tensor_blocks`). Inputs come from the one
tensor reader, :class:`~adapterfmt.storage.tensor_source.TensorSource`; :func:`write_tensor` puts a
tensor's bytes at their place in an output file.
"""

from __future__ import annotations

import threading
from math import prod
from typing import Any, Iterator, Optional

import torch

from ..deltas.lora import add_scaled, dora_weight, lora_product
from ..errors import NonFiniteValuesError
from ..storage.header import TensorInfo
from ..storage.parallel_write import PlacedFile
from ..storage.tensor_source import TensorSource
from ..storage.torch_io import TORCH_DTYPES, tensor_bytes
from .kernel import Block, BlockedMerge, LoraFactors, blockable, intra_op_threads, whole_call
from .plan import BiasTerm, LoraTerm, PlannedTensor, RowsTerm, Term

#: Elements per block of rows when a tensor is added up, rounded and written (1 MiB of float32:
#: the block stays in cache through its three passes).
BLOCK_ELEMENTS = 1 << 18


def _row_blocks(shape: tuple[int, ...], block: Optional[int]) -> Iterator[Optional[tuple[int, int]]]:
    if block is None or not shape:
        yield None
        return
    step = max(1, block // max(1, prod(shape[1:])))
    for r0 in range(0, shape[0], step):
        yield (r0, min(r0 + step, shape[0]))


def _placed(term: Term) -> bool:
    """A LoRA term on rows of a fused base tensor (:attr:`ResolvedLora.rows`)."""
    return isinstance(term, LoraTerm) and term.lora.rows is not None


def _whole(term: Term) -> bool:
    """Terms that need the whole tensor at once (norms across rows, scattered rows)."""
    return isinstance(term, RowsTerm) or (isinstance(term, LoraTerm) and term.lora.module.use_dora)


class Workspace:
    """Float32 buffers reused from one merged tensor to the next for the full-size deltas.

    A fresh buffer of tens of MB costs as much in page faults as the matmul that fills it.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def get(self, slot: int, numel: int) -> torch.Tensor:
        while len(self._buffers) <= slot:
            self._buffers.append(torch.empty(0))
        if self._buffers[slot].numel() < numel:
            self._buffers[slot] = torch.empty(0)  # drop the old one before allocating
            self._buffers[slot] = torch.empty(numel)
        return self._buffers[slot]


def _finite(source: TensorSource, info: TensorInfo) -> torch.Tensor:
    """An adapter tensor that a merge applies, refused if it holds NaN or infinity.

    Raises:
        NonFiniteValuesError: naming the adapter file and the saved key.
    """
    t = source.read(info)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteValuesError(
            "holds NaN or infinite values; merging it would corrupt the model",
            path=info.file,
            key=info.key,
            hint="the adapter is broken (`adapterfmt inspect --scan` lists every such tensor)",
        )
    return t


def _lora_factors(term: LoraTerm, source: TensorSource) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of a LoRA term as the product ``B @ A`` needs them: AdaLoRA's ``A ⊙ E`` folded in,
    one expert's slices taken for a fused-expert delta (``target_parameters``)."""
    m = term.lora.module
    a, b = _finite(source, m.tensors["lora_A"]), _finite(source, m.tensors["lora_B"])
    if "lora_E" in m.tensors:  # AdaLoRA: B @ (A ⊙ E)
        a = a * _finite(source, m.tensors["lora_E"]).float().reshape(-1, *([1] * (a.dim() - 1)))
    part = term.lora.expert
    if part is not None:
        a = a[part.expert * part.rank : (part.expert + 1) * part.rank]
        b = b[part.rows[0] : part.rows[1], part.expert :: part.experts]
    return a, b


def _prepare(
    term: Term, n: int, source: TensorSource, shape: tuple[int, ...], workspace: Optional[Workspace], threads: Optional[int] = None
) -> Any:
    """What a term adds, read and computed once per tensor: LoRA ``(B @ A, magnitude)``, bias, rows.
    ``threads``: the intra-op threads of the products (None: as set)."""
    if isinstance(term, LoraTerm):
        m = term.lora.module
        if term.lora.rows is not None and term.lora.shape is not None:  # the module's own shape: rows of a fused tensor
            shape = term.lora.shape
        if m.factors is not None:  # LoHa / LoKr / Tucker LoCon: the shared math of FORMAT §10.3, unscaled
            from ..deltas.lycoris import module_delta

            tensors = {slot: _finite(source, info) for slot, info in m.tensors.items()}
            with intra_op_threads(threads):
                return module_delta(m.factors, tensors, 1.0, shape, peft_kron=m.peft_kron), None
        a, b = _lora_factors(term, source)
        with intra_op_threads(threads):
            product = lora_product(a, b, term.lora.layout, shape, out=workspace.get(n, prod(shape)) if workspace else None)
        return product, (_finite(source, m.tensors["magnitude"]) if m.use_dora else None)
    if isinstance(term, BiasTerm):
        return _finite(source, term.info).float() * term.scaling
    return torch.tensor(term.indices, dtype=torch.long), _finite(source, term.info)


def term_delta(term: Term, source: TensorSource, shape: tuple[int, ...], workspace: Optional[Workspace] = None, slot: int = 0) -> Optional[torch.Tensor]:
    """What a term adds to ``W`` on its own, whole, in float32: ``s·ΔW`` of a LoRA term (LoHa / LoKr
    factors included), ``s·lora_B.bias`` of a bias term, the exact value the merge adds; None for
    terms that are not a plain addition (DoRA, token rows). For ``verify-merge``, which rebuilds
    PEFT's other rounding paths from the same deltas. ``workspace``: a LoRA product is computed
    into its buffer ``slot`` and scaled in place (the same bits; valid until the slot is reused)."""
    if isinstance(term, RowsTerm) or (isinstance(term, LoraTerm) and term.lora.module.use_dora):
        return None
    value = _prepare(term, slot, source, shape, workspace)
    if isinstance(term, BiasTerm):
        return value
    product = value[0]
    if workspace is not None and product.untyped_storage().data_ptr() == workspace.get(slot, 0).untyped_storage().data_ptr():
        return product.mul_(term.scaling)
    return product * term.scaling


def _rows(t: torch.Tensor, rows: Optional[tuple[int, int]]) -> torch.Tensor:
    return t if rows is None else t[rows[0] : rows[1]]


def _apply(term: Term, value: Any, acc: torch.Tensor, src: torch.Tensor, rows: Optional[tuple[int, int]]) -> torch.Tensor:
    """One term of ``W + Σ``: in place on the float32 accumulator where it can be."""
    if isinstance(term, LoraTerm):
        product, magnitude = value
        if term.lora.rows is not None:
            return _add_placed(acc, product, term.scaling, term.lora.rows, rows)
        if magnitude is not None:  # whole tensor only; the product is used once
            return dora_weight(src, product.mul_(term.scaling), magnitude, term.lora.layout, onto=acc)
        return add_scaled(acc, _rows(product, rows), term.scaling)
    if isinstance(term, BiasTerm):
        return acc.add_(_rows(value, rows))
    index, values = value
    return acc.index_copy_(0, index, values.to(acc.dtype))


def _add_placed(acc: torch.Tensor, product: torch.Tensor, scaling: float, placed: tuple[tuple[int, int, int], ...], rows: Optional[tuple[int, int]]) -> torch.Tensor:
    """Add ``product · scaling`` to the rows of the fused tensor it belongs to, within the block
    ``rows`` that ``acc`` holds: the same two roundings per element as a whole-module term."""
    r0, r1 = rows if rows is not None else (0, acc.shape[0])
    for first, end, src in placed:
        lo, hi = max(first, r0), min(end, r1)
        if lo < hi:
            add_scaled(acc[lo - r0 : hi - r0], product[src + lo - first : src + hi - first], scaling)
    return acc


def _fused(term: Term) -> bool:
    """A first term that can be computed straight into the accumulator (``W + s·P`` in one pass)."""
    return isinstance(term, LoraTerm) and not term.lora.module.use_dora and term.lora.rows is None


def tensor_blocks(
    t: PlannedTensor, source: TensorSource, block: Optional[int], workspace: Optional[Workspace] = None, product_threads: Optional[int] = None
) -> Iterator[torch.Tensor]:
    """The output tensor ``t`` in its output dtype, in blocks of rows (one block if ``block`` is None).

    Every yielded tensor is new (never a view of an input, of ``workspace`` or of another block).
    ``product_threads``: the intra-op threads of the whole-tensor products (PEFT's, where nothing
    runs beside); None leaves them as set.
    """
    dtype = TORCH_DTYPES[t.dtype]
    if not t.terms:
        for rows in _row_blocks(t.shape, block):
            src = source.read(t.source, rows)
            yield src.to(dtype, copy=src.dtype == dtype and t.source.start < 0)
        return
    prepared = [_prepare(term, n, source, t.shape, workspace, product_threads) for n, term in enumerate(t.terms)]
    buffer: Optional[torch.Tensor] = None
    for rows in _row_blocks(t.shape, None if any(_whole(term) for term in t.terms) else block):
        src = source.read(t.source, rows)
        terms = list(zip(t.terms, prepared))
        if _fused(t.terms[0]):
            if buffer is None:
                buffer = torch.empty(src.shape, dtype=torch.float32)
            (term, (product, _)), terms = terms[0], terms[1:]
            acc = add_scaled(buffer[: src.shape[0]], _rows(product, rows), term.scaling, first=src)
        else:
            acc = src.to(torch.float32, copy=True)
        for term, value in terms:
            acc = _apply(term, value, acc, src, rows)
        yield acc.to(dtype, copy=True)


def _kernel_takes(t: PlannedTensor) -> bool:
    """Whether the blocked kernel computes ``t``: LoRA terms only (no DoRA, no LoHa / LoKr factor
    modules, biases or rows: those go to :func:`tensor_blocks`), of dtypes and layouts it takes."""
    if not t.terms or not all(
        isinstance(term, LoraTerm) and not term.lora.module.use_dora and term.lora.module.factors is None and not _placed(term) for term in t.terms
    ):
        return False  # DoRA, LoHa / LoKr factor modules, rows of fused tensors, biases and token rows: tensor_blocks
    base_dtype, out_dtype = TORCH_DTYPES.get(t.source.dtype), TORCH_DTYPES.get(t.dtype)
    return blockable(t.shape, base_dtype, out_dtype, [term.lora.layout for term in t.terms])  # type: ignore[union-attr, arg-type]


def on_callers_threads(t: PlannedTensor) -> bool:
    """Whether ``t``'s products are whole-tensor calls that must run with the process's intra-op
    threads, as PEFT's do: it has a LoRA / LyCORIS term, and the blocked kernel does not split it
    into blocks (a small tensor, or one the kernel does not take). MKL may sum a small product
    differently with another thread count (:mod:`adapterfmt.merging.kernel`); the blocked tensors
    run with one intra-op thread per worker."""
    if not any(isinstance(term, LoraTerm) for term in t.terms):
        return False
    return not _kernel_takes(t) or whole_call(t.shape)


def kernel_blocks(t: PlannedTensor, source: TensorSource, merger: BlockedMerge, product_threads: Optional[int] = None) -> Optional[Iterator[Block]]:
    """The blocks of ``t`` from the blocked kernel, or None when the kernel does not take ``t``."""
    if not _kernel_takes(t):
        return None  # DoRA, LoHa / LoKr factor modules, biases and rows: tensor_blocks
    base_dtype, out_dtype = TORCH_DTYPES[t.source.dtype], TORCH_DTYPES[t.dtype]
    factors = []
    for term in t.terms:
        a, b = _lora_factors(term, source)  # type: ignore[arg-type]
        factors.append(LoraFactors(a, b, term.scaling, term.lora.layout))  # type: ignore[union-attr]
    info = t.source
    if info.start < 0:
        held = source.held(info)
        return merger.merge(t.shape, base_dtype, out_dtype, factors, lambda first, stop, into: held[first:stop], product_threads=product_threads)
    row = info.nbytes // info.shape[0]

    def read_rows(first: int, stop: int, into: memoryview) -> None:
        source.read_into(info.file, info.start + first * row, into, key=info.key)

    return merger.merge(t.shape, base_dtype, out_dtype, factors, read_rows, product_threads=product_threads)


def write_tensor(
    t: PlannedTensor, source: TensorSource, out: PlacedFile, offset: int, local: threading.local, product_threads: Optional[int] = None
) -> None:
    """Compute ``t`` and write its bytes at ``offset`` of ``out``, a block at a time, then start
    their writeback. ``local`` keeps the thread's reused buffers; ``product_threads``: the
    intra-op threads of its products (for :func:`on_callers_threads` tensors, computed where
    nothing runs beside them; the element-wise passes keep the current setting)."""
    if not hasattr(local, "merger"):
        local.merger, local.workspace = BlockedMerge(), Workspace()
    blocks = kernel_blocks(t, source, local.merger, product_threads)
    if blocks is not None:
        row = t.nbytes // t.shape[0]
        for block in blocks:
            out.write(offset + block.first * row, block.data)
    else:
        at = offset
        for tensor in tensor_blocks(t, source, BLOCK_ELEMENTS, local.workspace, product_threads):
            data = tensor_bytes(tensor)
            out.write(at, data)
            at += data.nbytes
    out.written(offset, t.nbytes)
