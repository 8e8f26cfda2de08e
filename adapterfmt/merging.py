"""The merge engine: LoRA adapters folded into a base model, in memory or streamed to a directory.

Both entry points first plan from headers (:func:`~adapterfmt.merge_plan.plan_merge`), so every
refusal comes before any work; then they execute the plan with the math of
:mod:`adapterfmt.delta` (PEFT's order of operations: ``ΔW = (B @ A) · s`` in float32, added to
the base weight in float32, rounded once).

:func:`merge_to_directory` streams. An untouched tensor is copied file to file by the kernel. A
merged one gets its full ``B @ A`` product in one matmul (the call PEFT makes, so the bits agree;
split into row blocks a matmul may sum in another order), then is scaled, added, rounded and
written in blocks of rows that stay in cache. Whole tensors are computed on worker threads with
one intra-op thread each (torch releases the GIL in its kernels), file writes run on a writer
thread, fsyncs on another; at most ``workers + 1`` tensors are in flight, so peak memory is a few
times the largest tensor, never the model.

One intra-op thread is not how PEFT runs its matmul. MKL splits an ``(out, r) @ (r, in)``
product over rows and columns, not over the rank, so the bits are the same for any thread count
for LoRA shapes (checked up to r=256 on 2048x5632 and 32000x2048; only matrices a few elements
wide with a rank of 64 or more differed); the PEFT parity tests run this way.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from math import prod
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from .base import BaseModel, read_base
from .constants import MODEL_CONFIG_FILE, SAFETENSORS_INDEX_FILE
from .delta import add_scaled, dora_weight, lora_product
from .describe import AdapterCheckpoint, read_adapter
from .errors import AdapterFormatError, DiskSpaceError, HeaderError, MergeError, NonFiniteValuesError, UnsupportedFeatureError
from .findings import Finding
from .header import TensorInfo, read_header
from .keys import Role, parse_saved
from .merge_plan import COPY, CONVERT, MERGE, REPLACE, BiasTerm, LoraTerm, MergePlan, PlannedTensor, RowsTerm, Term, plan_merge
from .torch_io import SAFETENSORS_DTYPES, TORCH_DTYPES
from .io_thread import BackgroundIO
from .pause import hooked, pause_point
from .safetensors_stream import ShardWriter, TensorSpec, file_size
from .staging import StagedDirectory, check_free_space, check_output_path, clean_stale, copy_file, format_bytes, write_text

AdapterSpec = Union[str, "os.PathLike[str]", AdapterCheckpoint]
#: Elements per block of rows when a tensor is added up, rounded and written (1 MiB of float32:
#: the block stays in cache through its three passes).
BLOCK_ELEMENTS = 1 << 18
_METADATA = {"format": "pt"}
_STATE_DICT = "<state_dict>"


@dataclass
class MergeSummary:
    """What :func:`merge_to_directory` wrote.

    ``timings`` (seconds): ``plan``; ``compute``, the worker threads on merged and converted
    tensors, summed over workers, reads included; ``read``, the part of it spent reading inputs;
    ``write``, the writer thread writing tensor bytes and kernel-copying untouched tensors (it
    overlaps compute); ``compute_wait`` and ``io_wait``, the main thread waiting for the workers
    and for the writer; ``files``; ``sync``, waiting for fsync, verification and the rename.
    """

    output: str
    adapters: list[str]
    tensors_merged: int
    tensors_replaced: int
    tensors_copied: int
    tensors_converted: int
    bytes_written: int
    seconds: float
    files: list[str]
    untied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["findings"] = [f.as_dict() for f in self.findings]
        return doc


def merge_state_dict(
    base_state_dict: Mapping[str, torch.Tensor],
    adapter_or_adapters: "AdapterSpec | Sequence[AdapterSpec]",
    *,
    weights: Optional[Sequence[float]] = None,
    out_dtype: "torch.dtype | str | None" = None,
    allow_unused: bool = False,
    allow_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge adapters into a state dict in memory; returns a new dict with the base key names.

    The input is never modified. Tensors that nothing changes are returned as the same objects
    (not copied); every changed tensor is new. Keys that share storage in the input (tied
    embeddings, as ``model.state_dict()`` gives them) are treated as one tied tensor, as PEFT
    sees them: a LoRA on either changes both.

    Args:
        base_state_dict (`Mapping[str, torch.Tensor]`): the base model's tensors.
        adapter_or_adapters: an adapter directory, Hub id or :class:`AdapterCheckpoint`, or a list.
        weights (`Sequence[float]`, *optional*): one per adapter, defaults to 1.0 each.
        out_dtype (`torch.dtype` or `str`, *optional*): dtype of every floating-point output
            tensor; defaults to each input tensor's dtype.
        allow_unused (`bool`, *optional*, defaults to `False`): skip adapter modules that match
            no tensor instead of raising.
        allow_pickle (`bool`, *optional*, defaults to `False`): permit ``adapter_model.bin``.

    Returns:
        `dict[str, torch.Tensor]`: the merged state dict, in the input's key order.

    Raises:
        UnresolvedModulesError, ShapeMismatchError, UnsupportedFeatureError, MergeError: see
            :func:`~adapterfmt.merge_plan.plan_merge`.

    Example:
        ```python
        >>> from safetensors.torch import load_file
        >>> import adapterfmt
        >>> base = load_file("testdata/tiny-bert/model.safetensors")
        >>> merged = adapterfmt.merge_state_dict(base, "testdata/tiny-bert-classifier")
        >>> merged["classifier.weight"].shape
        torch.Size([3, 32])
        ```
    """
    state = dict(base_state_dict)
    base = _state_dict_base(state)
    checkpoints = [_adapter(a, allow_pickle) for a in _as_list(adapter_or_adapters)]
    plan = plan_merge(base, checkpoints, weights=weights, dtype=_dtype_name(out_dtype), allow_unused=allow_unused)
    made: dict[str, torch.Tensor] = {}
    with _Inputs(checkpoints, {_STATE_DICT: state}) as inputs:
        for t in plan.tensors():
            made[t.key] = state[t.source.key] if t.action == COPY else next(_blocks(t, inputs, None))
    out = {key: made.get(key, tensor) for key, tensor in state.items()}
    out.update((key, tensor) for key, tensor in made.items() if key not in out)
    return out


def merge_to_directory(
    base: "str | os.PathLike[str] | BaseModel",
    adapters: "AdapterSpec | Sequence[AdapterSpec]",
    out: "str | os.PathLike[str]",
    *,
    weights: Optional[Sequence[float]] = None,
    dtype: "torch.dtype | str | None" = None,
    max_shard_size: "int | str | None" = None,
    overwrite: bool = False,
    allow_unused: bool = False,
    allow_pickle: bool = False,
    verify: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> MergeSummary:
    """Merge adapters into a base model and write a Hugging Face model directory, streaming.

    ``out`` gets the base's shard files and key order (or ``max_shard_size`` shards), a correct
    ``model.safetensors.index.json``, safetensors metadata ``{"format": "pt"}``, and every
    non-weight file of the base (config, generation config, tokenizer files). It is staged beside
    ``out`` and renamed into place only when complete; a killed run leaves no ``out``. While it
    runs, torch's intra-op thread count is 1 (restored on return): whole tensors are computed on
    worker threads instead, one per core torch would use, less one for the writer thread.

    Args:
        base (`str`, `os.PathLike` or `BaseModel`): model directory or Hub id.
        adapters: an adapter directory, Hub id or :class:`AdapterCheckpoint`, or a list, merged in order.
        out (`str` or `os.PathLike`): the output directory; must not be inside an input.
        weights (`Sequence[float]`, *optional*): one per adapter, defaults to 1.0 each.
        dtype (`torch.dtype` or `str`, *optional*): ``bf16``, ``fp16`` or ``fp32`` for every
            floating-point tensor (and ``dtype`` in config.json); defaults to the base's dtypes.
        max_shard_size (`int` or `str`, *optional*): re-shard (``"5GB"``) with huggingface_hub's planner.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty ``out``.
        allow_unused (`bool`, *optional*, defaults to `False`): skip adapter modules that match nothing.
        allow_pickle (`bool`, *optional*, defaults to `False`): permit ``adapter_model.bin`` adapters.
        verify (`bool`, *optional*, defaults to `False`): check the output's files against each
            other and the plan (:func:`adapterfmt.verify.verify_directory`) before the rename.
        progress (`Callable[[int, int], None]`, *optional*): called with (bytes just written, total).

    Returns:
        :class:`MergeSummary`.

    Raises:
        OutputPathError: ``out`` is inside or contains an input, is a file, or is not empty
            (without ``overwrite``); another merge is writing it.
        DiskSpaceError: not enough free space (checked before starting, and on ENOSPC).
        UnresolvedModulesError, ShapeMismatchError, UnsupportedFeatureError, MergeError: see
            :func:`~adapterfmt.merge_plan.plan_merge`; raised before anything is written.
        MergeError: ``verify`` found a problem (nothing is left behind).
    """
    started = time.perf_counter()
    timings = dict.fromkeys(("plan", "read", "compute", "compute_wait", "write", "io_wait", "files", "sync"), 0.0)
    model = base if isinstance(base, BaseModel) else read_base(base)
    checkpoints = [_adapter(a, allow_pickle) for a in _as_list(adapters)]
    removed = clean_stale(out)
    target = check_output_path(out, [model.directory] + [c.directory for c in checkpoints], overwrite=overwrite)
    plan = plan_merge(model, checkpoints, weights=weights, dtype=_dtype_name(dtype), max_shard_size=max_shard_size, allow_unused=allow_unused)
    sizes = _output_sizes(plan)
    check_free_space(target, sizes)
    timings["plan"] = time.perf_counter() - started
    report = None if progress is None else (lambda n: progress(n, plan.total_size))
    with StagedDirectory(target, overwrite=overwrite) as staging:
        try:
            with _Inputs(checkpoints) as inputs, _one_thread_per_worker() as workers:
                _write_shards(plan, staging.path, inputs, workers, report, timings)
            mark = time.perf_counter()
            files = _write_files(plan, staging.path)
            timings["files"] = time.perf_counter() - mark
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(
                    f"ran out of space while writing the merged model (it needs {format_bytes(sum(sizes))})",
                    path=target,
                    hint="free some space or write to another disk (-o); nothing was left behind",
                ) from None
            raise
        pause_point("files")
        mark = time.perf_counter()
        if verify:
            _verify(staging.path, plan, target)
        staging.commit()
        timings["sync"] += time.perf_counter() - mark
    return MergeSummary(
        output=target,
        adapters=[c.directory for c in checkpoints],
        tensors_merged=plan.count(MERGE),
        tensors_replaced=plan.count(REPLACE),
        tensors_copied=plan.count(COPY),
        tensors_converted=plan.count(CONVERT),
        bytes_written=sum(sizes),
        seconds=time.perf_counter() - started,
        files=files,
        untied=plan.untied,
        skipped=plan.skipped,
        removed_stale=removed,
        findings=plan.findings,
        timings={k: round(v, 3) for k, v in timings.items()},
    )


# ---------------------------------------------------------------------------------------------
# INPUTS
# ---------------------------------------------------------------------------------------------


def _as_list(adapters: Any) -> list[Any]:
    return list(adapters) if isinstance(adapters, (list, tuple)) else [adapters]


def _adapter(spec: AdapterSpec, allow_pickle: bool) -> AdapterCheckpoint:
    return spec if isinstance(spec, AdapterCheckpoint) else read_adapter(spec, allow_pickle=allow_pickle)


def _dtype_name(dtype: "torch.dtype | str | None") -> Optional[str]:
    if isinstance(dtype, torch.dtype):
        name = SAFETENSORS_DTYPES.get(dtype)
        if name is None:
            raise MergeError(f"cannot write {dtype}", key="dtype", hint="use torch.bfloat16, torch.float16 or torch.float32")
        return name
    return dtype


def _state_dict_base(state: Mapping[str, Any]) -> BaseModel:
    """A :class:`BaseModel` over in-memory tensors; weights sharing storage become ``tied``."""
    tensors: dict[str, TensorInfo] = {}
    tied: dict[str, str] = {}
    owner: dict[tuple, str] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise MergeError(f"is a {type(t).__name__}, not a tensor", key=key)
        dtype = SAFETENSORS_DTYPES.get(t.dtype)
        if dtype is None:
            raise UnsupportedFeatureError(f"has dtype {t.dtype}, which safetensors cannot hold", key=key)
        parts = parse_saved(key, prefix="")
        if t.numel() and parts.role is Role.PLAIN and parts.param == "weight":
            storage = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if storage in owner:
                tied[parts.module] = parse_saved(owner[storage], prefix="").module
                continue
            owner[storage] = key
        tensors[key] = TensorInfo(key, _STATE_DICT, dtype, tuple(t.shape), -1, -1)
    base = BaseModel(directory="", config={}, tensors=tensors, shards=[_STATE_DICT], shard_keys={_STATE_DICT: list(tensors)})
    base.tied = tied
    return base


@contextmanager
def _one_thread_per_worker() -> Iterator[int]:
    """Set torch to one intra-op thread and yield how many compute workers to run instead: one
    per core torch would use, less one for the writer thread (at least one).

    Whole tensors are spread over worker threads, which scales better than splitting the small
    blockwise passes, and leaves no thread spinning in a barrier while the writer thread holds a
    core (on 2 cores that spinning made a merge ten times slower). Each worker holds a product
    and an output tensor, so fewer workers also keep memory down. See the module docstring for
    why the matmul's bits do not change.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield max(1, min(threads, os.cpu_count() or 1) - 1)
    finally:
        torch.set_num_threads(threads)


class _Inputs:
    """Reads input tensors by :class:`TensorInfo`.

    File tensors are read with ``os.preadv`` at the header's byte offsets (validated by
    :func:`~adapterfmt.header.read_header`) into fresh buffers, whole or a block of rows at a
    time; this is what lets a merge stream rows, which ``safe_open`` would serve through mmap page
    faults. Tensors held in memory (``.bin`` adapters, a state dict) are looked up by key.
    """

    def __init__(self, adapters: Sequence[AdapterCheckpoint], memory: Optional[dict[str, Mapping[str, torch.Tensor]]] = None) -> None:
        self._memory = dict(memory or {})
        for a in adapters:
            if a.tensors_in_memory is not None:
                self._memory[a.weights_file] = a.tensors_in_memory
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self.seconds = 0.0  #: time spent reading, summed over threads

    def __enter__(self) -> "_Inputs":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, file: str) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = os.open(file, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[file] = fd
            return fd

    def read(self, info: TensorInfo, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The tensor ``info`` (rows ``rows[0]:rows[1]`` of it), in its stored dtype."""
        if info.start < 0:
            t = self._memory[info.file][info.key]
            return t if rows is None else t[rows[0] : rows[1]]
        mark = time.perf_counter()
        start, length, shape = info.start, info.nbytes, info.shape
        if rows is not None:
            row = info.nbytes // info.shape[0]
            start, length, shape = info.start + rows[0] * row, (rows[1] - rows[0]) * row, (rows[1] - rows[0], *info.shape[1:])
        # A bytearray, not tensor.numpy(): numpy is not a dependency. frombuffer shares its memory.
        raw = bytearray(length)
        view, got = memoryview(raw), 0
        while got < length:
            n = os.preadv(self.fd(info.file), [view[got:]], start + got)
            if n == 0:
                raise HeaderError("ended before the tensor's bytes (was it changed during the merge?)", path=info.file, key=info.key)
            got += n
        with self._lock:
            self.seconds += time.perf_counter() - mark
        buf = torch.frombuffer(raw, dtype=torch.uint8) if length else torch.empty(0, dtype=torch.uint8)
        return buf.view(TORCH_DTYPES[info.dtype]).reshape(shape)


# ---------------------------------------------------------------------------------------------
# COMPUTE
# ---------------------------------------------------------------------------------------------


def _row_blocks(shape: tuple[int, ...], block: Optional[int]) -> Iterator[Optional[tuple[int, int]]]:
    if block is None or not shape:
        yield None
        return
    step = max(1, block // max(1, prod(shape[1:])))
    for r0 in range(0, shape[0], step):
        yield (r0, min(r0 + step, shape[0]))


def _whole(term: Term) -> bool:
    """Terms that need the whole tensor at once (norms across rows, scattered rows)."""
    return isinstance(term, RowsTerm) or (isinstance(term, LoraTerm) and term.lora.module.use_dora)


class _Workspace:
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


def _finite(inputs: _Inputs, info: TensorInfo) -> torch.Tensor:
    """An adapter tensor that a merge applies, refused if it holds NaN or infinity.

    Raises:
        NonFiniteValuesError: naming the adapter file and the saved key.
    """
    t = inputs.read(info)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise NonFiniteValuesError(
            "holds NaN or infinite values; merging it would corrupt the model",
            path=info.file,
            key=info.key,
            hint="the adapter is broken (`adapterfmt inspect --scan` lists every such tensor)",
        )
    return t


def _prepare(term: Term, n: int, inputs: _Inputs, shape: tuple[int, ...], workspace: Optional[_Workspace]) -> Any:
    """What a term adds, read and computed once per tensor: LoRA ``(B @ A, magnitude)``, bias, rows."""
    if isinstance(term, LoraTerm):
        m = term.lora.module
        a, b = _finite(inputs, m.tensors["lora_A"]), _finite(inputs, m.tensors["lora_B"])
        product = lora_product(a, b, term.lora.layout, shape, out=workspace.get(n, prod(shape)) if workspace else None)
        return product, (_finite(inputs, m.tensors["magnitude"]) if m.use_dora else None)
    if isinstance(term, BiasTerm):
        return _finite(inputs, term.info).float() * term.scaling
    return torch.tensor(term.indices, dtype=torch.long), _finite(inputs, term.info)


def _rows(t: torch.Tensor, rows: Optional[tuple[int, int]]) -> torch.Tensor:
    return t if rows is None else t[rows[0] : rows[1]]


def _apply(term: Term, value: Any, acc: torch.Tensor, src: torch.Tensor, rows: Optional[tuple[int, int]]) -> torch.Tensor:
    """One term of ``W + Σ``: in place on the float32 accumulator where it can be."""
    if isinstance(term, LoraTerm):
        product, magnitude = value
        if magnitude is not None:  # whole tensor only; the product is used once
            return dora_weight(src, product.mul_(term.scaling), magnitude, term.lora.layout, onto=acc)
        return add_scaled(acc, _rows(product, rows), term.scaling)
    if isinstance(term, BiasTerm):
        return acc.add_(_rows(value, rows))
    index, values = value
    return acc.index_copy_(0, index, values.to(acc.dtype))


def _fused(term: Term) -> bool:
    """A first term that can be computed straight into the accumulator (``W + s·P`` in one pass)."""
    return isinstance(term, LoraTerm) and not term.lora.module.use_dora


def _blocks(t: PlannedTensor, inputs: _Inputs, block: Optional[int], workspace: Optional[_Workspace] = None) -> Iterator[torch.Tensor]:
    """The output tensor ``t`` in its output dtype, in blocks of rows (one block if ``block`` is None).

    Every yielded tensor is new (never a view of an input, of ``workspace`` or of another block).
    """
    dtype = TORCH_DTYPES[t.dtype]
    if not t.terms:
        for rows in _row_blocks(t.shape, block):
            src = inputs.read(t.source, rows)
            yield src.to(dtype, copy=src.dtype == dtype and t.source.start < 0)
        return
    prepared = [_prepare(term, n, inputs, t.shape, workspace) for n, term in enumerate(t.terms)]
    buffer: Optional[torch.Tensor] = None
    for rows in _row_blocks(t.shape, None if any(_whole(term) for term in t.terms) else block):
        src = inputs.read(t.source, rows)
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


# ---------------------------------------------------------------------------------------------
# OUTPUT
# ---------------------------------------------------------------------------------------------


def _specs(tensors: Sequence[PlannedTensor]) -> list[TensorSpec]:
    return [TensorSpec(t.key, t.dtype, t.shape) for t in tensors]


def _output_sizes(plan: MergePlan) -> list[int]:
    """Bytes of every output file (the index and a rewritten config.json are counted as copied)."""
    sizes = [file_size(_specs(s.tensors), _METADATA) for s in plan.shards]
    sizes += [os.path.getsize(os.path.join(plan.base.directory, f)) for f in plan.files]
    return sizes + ([len(json.dumps(plan.index(), indent=2)) + 1] if plan.indexed else [])


def _copied(t: PlannedTensor) -> bool:
    """Written by a kernel copy of its source's bytes."""
    return t.raw and t.source.start >= 0


def _runs(tensors: Sequence[PlannedTensor]) -> Iterator[list[PlannedTensor]]:
    """Consecutive tensors whose bytes are copied and lie back to back in one file, as one run."""
    run: list[PlannedTensor] = []
    for t in tensors:
        if _copied(t) and run and _copied(run[-1]) and run[-1].source.file == t.source.file and run[-1].source.end == t.source.start:
            run.append(t)
            continue
        if run:
            yield run
        run = [t]
    if run:
        yield run


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _compute(t: PlannedTensor, inputs: _Inputs, local: threading.local) -> tuple[list[torch.Tensor], float]:
    """A worker's job: every block of ``t`` (and the seconds it took)."""
    start = time.perf_counter()
    if not hasattr(local, "workspace"):
        local.workspace = _Workspace()
    return list(_blocks(t, inputs, BLOCK_ELEMENTS, local.workspace)), time.perf_counter() - start


def _write_shards(
    plan: MergePlan, directory: str, inputs: _Inputs, workers: int, progress: Optional[Callable[[int], None]], timings: dict[str, float]
) -> None:
    """Write every shard, in order: tensors computed ``workers`` at a time on worker threads, file
    writes and kernel copies on one background thread, fsyncs on another.

    The main thread keeps the output order: it hands a tensor's blocks to the writer thread once
    that tensor and everything before it are done, and lets at most ``workers + 1`` tensors be in
    flight, which bounds memory to a few of the largest tensors.
    """
    writers: list[ShardWriter] = []
    local = threading.local()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapterfmt-compute")
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterfmt-fsync") as syncer, BackgroundIO() as io:
            synced: list[Any] = []
            jobs: deque[tuple[Any, ...]] = deque()
            computing = 0

            def finish_one() -> None:
                nonlocal computing
                kind, writer, run, payload, pause = jobs.popleft()
                if kind == "copy":
                    io.submit(writer.copy, [t.key for t in run], inputs.fd(run[0].source.file), run[0].source.start)
                elif kind == "compute":
                    mark = time.perf_counter()
                    blocks, seconds = payload.result()
                    timings["compute_wait"] += time.perf_counter() - mark
                    timings["compute"] += seconds
                    computing -= 1
                    for block in blocks:
                        io.submit(writer.write, run[0].key, _as_bytes(block), nbytes=block.nbytes)
                else:
                    io.submit(lambda w=writer: synced.append(syncer.submit(w.close)))
                if pause and hooked():
                    io.drain()
                    pause_point(pause)

            for number, shard in enumerate(plan.shards, 1):
                writer = ShardWriter(os.path.join(directory, shard.name), _specs(shard.tensors), metadata=_METADATA, progress=progress)
                writers.append(writer)
                for i, run in enumerate(_runs(shard.tensors)):
                    pause = f"write:{number}" if i == 0 else None
                    if _copied(run[0]):
                        jobs.append(("copy", writer, run, None, pause))
                    else:
                        jobs.append(("compute", writer, run, pool.submit(_compute, run[0], inputs, local), pause))
                        computing += 1
                    while computing > workers:
                        finish_one()
                jobs.append(("close", writer, None, None, None))
            while jobs:
                finish_one()
            io.close()
            timings["write"] += io.busy
            timings["io_wait"] += io.waited
            mark = time.perf_counter()
            for future in synced:
                future.result()
            timings["sync"] += time.perf_counter() - mark
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for writer in writers:
            writer.abort()
        timings["read"] += inputs.seconds


def _write_files(plan: MergePlan, directory: str) -> list[str]:
    """Copy the base's non-weight files, write config.json (if changed) and the index; fsync all."""
    written = [s.name for s in plan.shards]
    for name in plan.files:
        target = os.path.join(directory, name)
        if name == MODEL_CONFIG_FILE and plan.config is not None:
            write_text(target, json.dumps(plan.config, indent=2) + "\n")
        else:
            copy_file(os.path.join(plan.base.directory, name), target)
        written.append(name)
    if plan.indexed:
        write_text(os.path.join(directory, SAFETENSORS_INDEX_FILE), json.dumps(plan.index(), indent=2) + "\n")
        written.append(SAFETENSORS_INDEX_FILE)
    return sorted(written)


def _verify(directory: str, plan: MergePlan, target: str) -> None:
    """:func:`adapterfmt.verify.verify_directory` on the staged output, then each shard's header
    against the plan (keys in order, dtypes, shapes, metadata).

    Raises:
        MergeError: the first problem (the staged output is then removed, ``out`` never appears).
    """
    from .verify import verify_directory

    problems = [f.message for f in verify_directory(directory)]
    for shard in plan.shards:
        try:
            header = read_header(os.path.join(directory, shard.name))
        except AdapterFormatError as e:
            problems.append(str(e))
            continue
        got = [(k, i.dtype, i.shape) for k, i in header.tensors.items()]
        want = [(t.key, t.dtype, t.shape) for t in shard.tensors]
        if got != want or dict(header.metadata) != _METADATA:
            problems.append(f"{shard.name}: its header does not match the merge plan")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MergeError(f"the merged output failed verification: {problems[0]}{more}", path=target, hint="nothing was written; please report this")
