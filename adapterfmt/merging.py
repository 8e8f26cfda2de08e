"""The merge engine: LoRA adapters folded into a base model, in memory or streamed to a directory.

Both entry points first plan from headers (:func:`~adapterfmt.merge_plan.plan_merge`), so every
refusal comes before any work; then they execute it. Where each job lives: what is computed,
:mod:`adapterfmt.merge_compute` (the math of :mod:`adapterfmt.delta`); where tensors are read
from, :mod:`adapterfmt.tensor_source`; what the output directory holds,
:mod:`adapterfmt.merge_plan` (decided) and :mod:`adapterfmt.merge_output` (written); how it
appears all or nothing, :mod:`adapterfmt.staging`. This module orchestrates.

:func:`merge_to_directory` streams. An untouched tensor is copied file to file by the kernel
(:mod:`adapterfmt.safetensors_stream`); a merged one is computed and written in blocks of rows
that stay in cache. Whole tensors are computed on worker threads with
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
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from .base import BaseModel, read_base
from .describe import AdapterCheckpoint, read_adapter
from .errors import DiskSpaceError, MergeError, UnsupportedFeatureError
from .findings import Finding
from .header import TensorInfo
from .io_thread import BackgroundIO
from .keys import Role, parse_saved
from .merge_compute import compute_tensor, tensor_blocks
from .merge_output import METADATA, output_sizes, shard_path, shard_specs, verify_output, write_side_files
from .merge_plan import COPY, CONVERT, MERGE, REPLACE, MergePlan, PlannedTensor, plan_merge
from .pause import hooked, pause_point
from .safetensors_stream import ShardWriter
from .staging import StagedDirectory, check_free_space, check_output_path, clean_stale, format_bytes
from .tensor_source import TensorSource
from .torch_io import SAFETENSORS_DTYPES, tensor_bytes

AdapterSpec = Union[str, "os.PathLike[str]", AdapterCheckpoint]
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
    with _source(checkpoints, {_STATE_DICT: state}) as inputs:
        for t in plan.tensors():
            made[t.key] = state[t.source.key] if t.action == COPY else next(tensor_blocks(t, inputs, None))
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
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
) -> MergeSummary:
    """Merge adapters into a base model and write a model directory of the base's kind, streaming.

    ``out`` is the same kind of directory as the base (docs/FORMAT.md §1.3): the base's weight
    file names, shard files and key order (or ``max_shard_size`` shards), its index, safetensors
    metadata ``{"format": "pt"}``, and every non-weight file and folder of the base (config,
    generation config, tokenizer files, sentence-transformers modules, the other components of a
    pipeline); a loose or pickle weights file becomes the layout's standard name. It is staged beside
    ``out`` and renamed into place only when complete; a killed run leaves no ``out``. While it
    runs, torch's intra-op thread count is 1 (restored on return): whole tensors are computed on
    worker threads instead, one per core torch would use, less one for the writer thread.

    Args:
        base (`str`, `os.PathLike` or `BaseModel`): model or pipeline directory, weights file, or
            Hub id (downloaded through the huggingface_hub cache).
        adapters: an adapter directory, Hub id or :class:`AdapterCheckpoint`, or a list, merged in order.
        out (`str` or `os.PathLike`): the output directory; must not be inside an input.
        weights (`Sequence[float]`, *optional*): one per adapter, defaults to 1.0 each.
        dtype (`torch.dtype` or `str`, *optional*): ``bf16``, ``fp16`` or ``fp32`` for every
            floating-point tensor (and ``dtype`` in config.json); defaults to the base's dtypes.
        max_shard_size (`int` or `str`, *optional*): re-shard (``"5GB"``) with huggingface_hub's planner.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty ``out``.
        allow_unused (`bool`, *optional*, defaults to `False`): skip adapter modules that match nothing.
        allow_pickle (`bool`, *optional*, defaults to `False`): permit pickle weights
            (``adapter_model.bin`` adapters, ``pytorch_model.bin`` bases), read with
            ``torch.load(weights_only=True)``; the output is safetensors.
        verify (`bool`, *optional*, defaults to `False`): check the output's files against each
            other and the plan (:func:`adapterfmt.verify.verify_directory`) before the rename.
        progress (`Callable[[int, int], None]`, *optional*): called with (bytes just written, total).
        subfolder (`str`, *optional*): the component of a diffusers pipeline to merge into; the
            whole pipeline is written, the other components copied.
        revision (`str`, *optional*): Hub revision of ``base``.

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
    model = base if isinstance(base, BaseModel) else read_base(base, subfolder=subfolder, revision=revision, allow_pickle=allow_pickle, download=True)
    if model.remote is not None:
        raise MergeError(f"was read from headers only ({model.remote})", hint="pass the Hub id itself: merge downloads the weights through the cache")
    checkpoints = [_adapter(a, allow_pickle) for a in _as_list(adapters)]
    removed = clean_stale(out)
    target = check_output_path(out, [_input_path(model)] + [c.directory for c in checkpoints], overwrite=overwrite)
    plan = plan_merge(model, checkpoints, weights=weights, dtype=_dtype_name(dtype), max_shard_size=max_shard_size, allow_unused=allow_unused)
    index = plan.index() if plan.indexed else None
    sizes = output_sizes(plan.shards, plan.output.root, plan.files, index)
    check_free_space(target, sizes)
    timings["plan"] = time.perf_counter() - started
    report = None if progress is None else (lambda n: progress(n, plan.total_size))
    with StagedDirectory(target, overwrite=overwrite) as staging:
        try:
            with _source(checkpoints, _base_memory(model)) as inputs, _one_thread_per_worker() as workers:
                _write_shards(plan, staging.path, inputs, workers, report, timings)
            mark = time.perf_counter()
            written = write_side_files(staging.path, plan.output.root, plan.files, plan.config, index, plan.output)
            files = sorted([plan.output.path(s.name) for s in plan.shards] + written)
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
            verify_output(staging.path, plan.shards, target, plan.output)
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


def _input_path(base: BaseModel) -> str:
    """What OUT must stay out of: the folder the output mirrors, or a loose file itself."""
    if base.layout is None:
        return base.directory
    return base.layout.loose_file or base.layout.root


def _base_memory(base: BaseModel) -> dict[str, Mapping[str, torch.Tensor]]:
    """A pickle base's tensors, held in memory under their file (``TensorInfo.file``)."""
    if not base.tensors_in_memory:
        return {}
    return {info.file: base.tensors_in_memory for info in list(base.tensors.values())[:1]}


def _source(adapters: Sequence[AdapterCheckpoint], memory: Optional[dict[str, Mapping[str, torch.Tensor]]] = None) -> TensorSource:
    """The reader of a merge's inputs: files, plus the tensors of ``.bin`` adapters (and a state dict) in memory."""
    memory = dict(memory or {})
    for a in adapters:
        if a.tensors_in_memory is not None:
            memory[a.weights_file] = a.tensors_in_memory
    return TensorSource(memory)


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


# ---------------------------------------------------------------------------------------------
# STREAMING: shards written in order while tensors are computed on worker threads
# ---------------------------------------------------------------------------------------------


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


def _write_shards(
    plan: MergePlan, directory: str, inputs: TensorSource, workers: int, progress: Optional[Callable[[int], None]], timings: dict[str, float]
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
                        io.submit(writer.write, run[0].key, tensor_bytes(block), nbytes=block.nbytes)
                else:
                    io.submit(lambda w=writer: synced.append(syncer.submit(w.close)))
                if pause and hooked():
                    io.drain()
                    pause_point(pause)

            for number, shard in enumerate(plan.shards, 1):
                writer = ShardWriter(shard_path(directory, plan.output, shard.name), shard_specs(shard.tensors), metadata=METADATA, progress=progress)
                writers.append(writer)
                for i, run in enumerate(_runs(shard.tensors)):
                    pause = f"write:{number}" if i == 0 else None
                    if _copied(run[0]):
                        jobs.append(("copy", writer, run, None, pause))
                    else:
                        jobs.append(("compute", writer, run, pool.submit(compute_tensor, run[0], inputs, local), pause))
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
