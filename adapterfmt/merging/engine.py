"""The merge engine: LoRA adapters folded into a base model, in memory or streamed to a directory.

Both entry points first plan from headers (:func:`~adapterfmt.merging.plan.plan_merge`), so every
refusal comes before any work; then they execute it. Where each job lives: what is computed,
:mod:`adapterfmt.merging.compute` (the math of :mod:`adapterfmt.deltas.lora`); where tensors are read
from, :mod:`adapterfmt.storage.tensor_source`; what the output directory holds,
:mod:`adapterfmt.merging.plan` (decided) and :mod:`adapterfmt.merging.output` (written); how it
appears all or nothing, :mod:`adapterfmt.storage.staging`. This module orchestrates.

:func:`merge_to_directory` streams. Every shard's header is known from the plan, so each tensor's
bytes have a known place: worker threads (one per core, one intra-op thread each; torch releases
the GIL in its kernels) take tensors in order and write them straight there
(:mod:`adapterfmt.storage.parallel_write`) — an untouched run is copied file to file by the kernel, a
merged tensor is computed and written a block of rows at a time from reused buffers
(:mod:`adapterfmt.merging.compute`). Nothing waits to keep an order, so memory is a few buffers per
worker, never a whole tensor. Writeback starts after each tensor and each shard is synced as soon
as it is complete, in parallel with the rest.

One intra-op thread is not how PEFT runs its matmul. MKL splits an ``(out, r) @ (r, in)``
product over rows and columns, not over the rank, so for large LoRA products the bits were the
same for any thread count (checked up to r=256 on 2048x5632 and 32000x2048, 1-64 threads); small
ones (9×64 @ 64×40, 3000×16 @ 16×17) were not. So a tensor the blocked kernel computes as one
whole-tensor call (too small for two blocks, or DoRA / LoHa / LoKr) is computed first, on the
calling thread with the process's intra-op threads — PEFT's exact call
(:func:`~adapterfmt.merging.compute.on_callers_threads`); only the blocked tensors run on the
workers. The PEFT parity tests compare with PEFT on the machine that runs them.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from ..base.reading import BaseModel, read_base
from ..checkpoint.findings import Finding
from ..checkpoint.keys import Role, parse_saved
from ..errors import DiskSpaceError, MergeError, UnsupportedFeatureError
from ..formats.peft.reading import AdapterCheckpoint, read_adapter
from ..storage.header import TensorInfo
from ..storage.parallel_write import PlacedFile, write_files
from ..storage.pause import hooked, pause_point
from ..storage.safetensors_stream import encode_header
from ..storage.staging import (
    StagedDirectory,
    StagedFile,
    check_free_space,
    check_output_file,
    check_output_path,
    clean_stale,
    format_bytes,
    no_free_inodes,
)
from ..storage.tensor_source import TensorSource
from ..storage.torch_io import SAFETENSORS_DTYPES
from .compute import on_callers_threads, tensor_blocks, write_tensor
from .output import METADATA, OutputNames, ShardPlan, output_sizes, shard_path, shard_specs, verify_output, write_side_files
from .plan import CONVERT, COPY, MERGE, REPLACE, MergePlan, PlannedTensor, plan_merge

AdapterSpec = Union[str, "os.PathLike[str]", AdapterCheckpoint]
_STATE_DICT = "<state_dict>"


@dataclass
class MergeSummary:
    """What :func:`merge_to_directory` wrote.

    ``timings`` (seconds): ``plan``; ``compute``, the worker threads' jobs (merged, converted and
    copied tensors, reads and writes included), summed over workers; ``read`` and ``write``, the
    parts of it spent reading inputs and writing or kernel-copying output bytes; ``io_wait``, the
    main thread waiting for the workers; ``files``; ``sync``, waiting for the last shard syncs,
    verification and the rename.
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
    applied: list[dict[str, list[int]]] = field(default_factory=list)  #: per adapter: part -> [applied, in the adapter]
    removed_stale: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    #: how the output was written where it differs from one atomic rename (a mount point as OUT)
    notes: list[str] = field(default_factory=list)
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
    prefix_map: Optional[Mapping[str, str]] = None,
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
            :func:`~adapterfmt.merging.plan.plan_merge`.

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
    plan = plan_merge(base, checkpoints, weights=weights, dtype=_dtype_name(out_dtype), allow_unused=allow_unused, prefix_map=prefix_map)
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
    prefix_map: Optional[Mapping[str, str]] = None,
    allow_pickle: bool = False,
    verify: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    side_files: Optional[Sequence[str]] = None,
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
        prefix_map (`dict`, *optional*): module-path prefix rewrites ``{old: new}`` for the
            adapters' module paths (``--prefix-map``), as :func:`~adapterfmt.load` takes.
        allow_pickle (`bool`, *optional*, defaults to `False`): permit pickle weights
            (``adapter_model.bin`` adapters, ``pytorch_model.bin`` bases), read with
            ``torch.load(weights_only=True)``; the output is safetensors.
        verify (`bool`, *optional*, defaults to `False`): check the output's files against each
            other and the plan (:func:`adapterfmt.reports.verify.verify_directory`) before the rename.
        progress (`Callable[[int, int], None]`, *optional*): called with (bytes just written, total).
        subfolder (`str`, *optional*): the component of a diffusers pipeline to merge into; the
            whole pipeline is written, the other components copied.
        revision (`str`, *optional*): Hub revision of ``base``.
        side_files (`Sequence[str]`, *optional*): the files of the base directory copied beside the
            weights; defaults to every file that is not weights (config, tokenizer, README ...).

    Returns:
        :class:`MergeSummary`.

    Raises:
        OutputPathError: ``out`` is inside or contains an input, is a file, or is not empty
            (without ``overwrite``); another merge is writing it.
        DiskSpaceError: not enough free space (checked before starting, and on ENOSPC).
        UnresolvedModulesError, ShapeMismatchError, UnsupportedFeatureError, MergeError: see
            :func:`~adapterfmt.merging.plan.plan_merge`; raised before anything is written.
        MergeError: ``verify`` found a problem (nothing is left behind).
    """
    started = time.perf_counter()
    timings = dict.fromkeys(("plan", "read", "compute", "write", "io_wait", "files", "sync"), 0.0)
    model = base if isinstance(base, BaseModel) else read_base(base, subfolder=subfolder, revision=revision, allow_pickle=allow_pickle, download=True)
    if model.remote is not None:
        raise MergeError(f"was read from headers only ({model.remote})", hint="pass the Hub id itself: merge downloads the weights through the cache")
    checkpoints = [_adapter(a, allow_pickle) for a in _as_list(adapters)]
    removed = clean_stale(out)
    target = check_output_path(out, [_input_path(model)] + [c.directory for c in checkpoints], overwrite=overwrite)
    plan = plan_merge(
        model, checkpoints, weights=weights, dtype=_dtype_name(dtype), max_shard_size=max_shard_size, allow_unused=allow_unused, prefix_map=prefix_map
    )
    if side_files is not None:
        plan.files = list(side_files)
    index = plan.index() if plan.indexed else None
    sizes = output_sizes(plan.shards, plan.output.root, plan.files, index)
    check_free_space(target, sizes)
    timings["plan"] = time.perf_counter() - started
    total_size = plan.total_size  # once: the callback runs for every block written
    report = None if progress is None else (lambda n: progress(n, total_size))
    with StagedDirectory(target, overwrite=overwrite) as staging:
        try:
            with _source(checkpoints, _base_memory(model)) as inputs, _one_thread_per_worker() as (workers, threads):
                _write_shards(plan, staging.path, inputs, (workers, threads), report, timings)
            mark = time.perf_counter()
            written = write_side_files(staging.path, plan.output.root, plan.files, plan.config, index, plan.output)
            files = sorted([plan.output.path(s.name) for s in plan.shards] + written)
            timings["files"] = time.perf_counter() - mark
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT) and not no_free_inodes(target):
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
        applied=plan.applied,
        removed_stale=removed,
        findings=plan.findings,
        notes=[staging.note] if staging.note else [],
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def merge_to_file(
    base: BaseModel,
    adapters: Sequence[AdapterCheckpoint],
    out: "str | os.PathLike[str]",
    *,
    resolver: Callable[[AdapterCheckpoint, BaseModel], Any],
    weights: Optional[Sequence[float]] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> MergeSummary:
    """Merge adapters into a one-file base (a single-file checkpoint) and write ``out``, one file.

    The same file back: every key, dtype and the file's own ``__metadata__``, tensors nothing
    changes copied byte for byte; planned, computed and streamed like :func:`merge_to_directory`
    (``resolver`` binds the adapters, e.g. LoRAs on rows of fused tensors), written through
    :class:`~adapterfmt.storage.staging.StagedFile`: a killed run leaves no ``out``.

    Raises:
        OutputPathError: ``out`` is an input, a folder, or exists (without ``overwrite``).
        see :func:`merge_to_directory`.
    """
    started = time.perf_counter()
    timings = dict.fromkeys(("plan", "read", "compute", "write", "io_wait", "files", "sync"), 0.0)
    removed = clean_stale(out)
    target = check_output_file(out, [_input_path(base)] + [c.directory for c in adapters], overwrite=overwrite)
    plan = plan_merge(base, list(adapters), weights=weights, resolver=resolver)
    name = os.path.basename(target)
    plan.shards = [ShardPlan(name, [t for shard in plan.shards for t in shard.tensors])]
    plan.output = OutputNames(os.path.dirname(target))
    metadata = dict(base.headers[base.shards[0]].metadata) if base.shards and base.shards[0] in base.headers else dict(METADATA)
    sizes = output_sizes(plan.shards, plan.output.root, [], None)
    check_free_space(target, sizes)
    timings["plan"] = time.perf_counter() - started
    total_size = plan.total_size
    report = None if progress is None else (lambda n: progress(n, total_size))
    with StagedFile(target, overwrite=overwrite) as staging:
        with _source(list(adapters)) as inputs, _one_thread_per_worker() as (workers, threads):
            _write_shards(plan, staging.path, inputs, (workers, threads), report, timings, metadata=metadata)
        pause_point("files")
        mark = time.perf_counter()
        staging.commit()
        timings["sync"] += time.perf_counter() - mark
    return MergeSummary(
        output=target, adapters=[c.directory for c in adapters], tensors_merged=plan.count(MERGE), tensors_replaced=plan.count(REPLACE),
        tensors_copied=plan.count(COPY), tensors_converted=plan.count(CONVERT), bytes_written=sum(sizes),
        seconds=time.perf_counter() - started, files=[name], skipped=plan.skipped, applied=plan.applied, removed_stale=removed,
        findings=plan.findings, timings={k: round(v, 3) for k, v in timings.items()},
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
def _one_thread_per_worker() -> Iterator[tuple[int, int]]:
    """Set torch to one intra-op thread and yield how many worker threads to run instead (one per
    core torch would use) and the intra-op threads it had (PEFT's, for the whole-tensor products).

    Whole tensors are spread over worker threads, which scales better than splitting the small
    blockwise passes, and leaves no thread spinning in a barrier while another holds a core (on
    2 cores that spinning made a merge ten times slower). See the module docstring for why the
    matmul's bits do not change.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield max(1, min(threads, os.cpu_count() or 1)), threads
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
    plan: MergePlan,
    directory: str,
    inputs: TensorSource,
    threads: tuple[int, int],
    progress: Optional[Callable[[int], None]],
    timings: dict[str, float],
    *,
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Write every shard: its header at once, then each run of copied tensors and each computed
    tensor as one job at its offset; each shard synced once complete. ``threads``: (workers, the
    process's intra-op threads). Tensors whose products are whole-tensor calls
    (:func:`~adapterfmt.merging.compute.on_callers_threads`) are computed first, one at a time on
    this thread, their products with the process's intra-op threads — PEFT's call, so PEFT's bits
    on any CPU — and their element-wise passes with one; the rest ``workers`` jobs at a time, one
    intra-op thread each.

    Pause point ``write:<N>`` (tests) comes right after the first job of shard N.
    """
    workers, intra_op = threads
    files: list[PlacedFile] = []
    jobs: list[tuple[int, Callable[[PlacedFile], None]]] = []
    first: list[tuple[int, Callable[[PlacedFile], None]]] = []
    local = threading.local()
    try:
        for number, shard in enumerate(plan.shards):
            header = encode_header(shard_specs(shard.tensors), METADATA if metadata is None else metadata)
            files.append(PlacedFile(shard_path(directory, plan.output, shard.name), len(header) + shard.nbytes, header=header, progress=progress))
            offset = len(header)
            for run in _runs(shard.tensors):
                if _copied(run[0]):
                    jobs.append((number, partial(_copy_run, run, inputs, offset)))
                elif on_callers_threads(run[0]):
                    first.append((number, partial(_compute_run, run[0], inputs, offset, local, intra_op)))
                else:
                    jobs.append((number, partial(_compute_run, run[0], inputs, offset, local, None)))
                offset += sum(t.nbytes for t in run)
        write = dict.fromkeys(("jobs", "wait", "sync"), 0.0)
        write_files(files, jobs, workers=workers, after_first=(lambda i: pause_point(f"write:{i + 1}")) if hooked() else None, timings=write, first=first)
        timings["compute"] += write["jobs"]
        timings["io_wait"] += write["wait"]
        timings["sync"] += write["sync"]
    finally:
        for f in files:
            f.abort()
            timings["write"] += f.seconds
        timings["read"] += inputs.seconds


def _copy_run(run: Sequence[PlannedTensor], inputs: TensorSource, offset: int, out: PlacedFile) -> None:
    """Copy a run of untouched tensors that lie back to back in their source file."""
    length = sum(t.nbytes for t in run)
    out.copy(inputs.fd(run[0].source.file), run[0].source.start, length, offset)
    out.written(offset, length)


def _compute_run(t: PlannedTensor, inputs: TensorSource, offset: int, local: threading.local, product_threads: Optional[int], out: PlacedFile) -> None:
    write_tensor(t, inputs, out, offset, local, product_threads)
