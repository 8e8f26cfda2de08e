"""``verify-merge``: is ``M`` the merge of adapter ``A`` into base ``B``? Tensor by tensor, streaming.

The merge plan (:func:`~adapterfmt.merging.plan.plan_merge`, headers only) says what every tensor
of the merged model must be; this module reads the three inputs one tensor (one block of rows)
at a time and checks it:

* ``copy`` tensors: byte-equal to the base (compared a chunk at a time, never decoded);
* ``convert`` / ``replace``: equal to the base tensor, or the full copy, cast to the merged dtype;
* ``merge``: equal, bit for bit, to one of PEFT's merge paths, rebuilt from the deltas the merge
  itself computes (:func:`adapterfmt.merging.compute.term_delta`): ``peft`` (the default
  ``merge_and_unload``: ``W += Δ`` with Δ in float32, one rounding — adapterfmt's own merge),
  ``peft-adapter-dtype`` (Δ rounded to the adapter's dtype first, as PEFT does on CPU for a
  bf16/fp16 adapter), ``peft-safe-merge`` (``W += Δ.to(W.dtype)``: two roundings; also PEFT's
  default for embeddings); with a merged dtype other than the base's, each again from ``W``
  cast to that dtype first (the model loaded in it). DoRA and trainable-token tensors have one
  path, the merge's own (:func:`adapterfmt.merging.compute.tensor_blocks`).
* ``--tolerance ulp``: every element within one ulp of the merged dtype (taken at
  ``max(|W+Δ|, |Δ|)``) of the unrounded ``W + Δ``.

Every tensor gets a verdict (:mod:`.verdicts`); untied heads are checked against the tie:
a merged model that keeps ``lm_head`` tied passes where PEFT's merge gives the head the
embedding's values (LoRA on either), and fails where they must differ (a full copy of the head).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from typing import Any, Optional

import torch

from ..base.reading import BaseModel, read_base
from ..checkpoint.keys import split_param, weight_key
from ..errors import MergeError, ModelMismatchError
from ..formats.peft.reading import AdapterCheckpoint, read_adapter
from ..merging.checks import FLOAT_DTYPES
from ..merging.compute import BLOCK_ELEMENTS, Workspace, kernel_blocks, on_callers_threads, tensor_blocks, term_delta
from ..merging.kernel import BlockedMerge
from ..merging.plan import CONVERT, COPY, MERGE, REPLACE, LoraTerm, PlannedTensor, plan_merge
from ..storage.header import TensorInfo
from ..storage.tensor_source import TensorSource
from ..storage.torch_io import TORCH_DTYPES
from . import verdicts as V

TOLERANCES = ("exact", "ulp")

#: names of the accepted results of a merged tensor (BEHAVIOUR §11.2)
PEFT_DEFAULT = "peft"
PEFT_ADAPTER_DTYPE = "peft-adapter-dtype"
PEFT_SAFE = "peft-safe-merge"


@dataclass
class TensorVerdict:
    """One tensor of the merged model: what it should be, whether it is, and why not."""

    key: str
    action: str  #: copy / convert / replace / merge (the plan's), or ``extra`` (not in the plan)
    ok: bool
    verdict: str  #: a code of :mod:`.verdicts`
    detail: str = ""
    path: Optional[str] = None  #: the merge path matched (``peft``, ``peft-safe-merge``, ...)
    max_error: Optional[float] = None  #: max |M − (W+Δ)| / max |Δ|
    mean_error: Optional[float] = None  #: mean |M − (W+Δ)| / mean |Δ|
    worst_ulps: Optional[float] = None  #: largest error in ulps of the merged dtype

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class MergeVerification:
    """The report of :func:`verify_merge`."""

    base: str
    adapter: str
    merged: str
    tolerance: str
    dtype: Optional[str]
    tensors: list[TensorVerdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors)

    @property
    def failures(self) -> list[TensorVerdict]:
        return [t for t in self.tensors if not t.ok]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {"tensors": len(self.tensors), "passed": sum(t.ok for t in self.tensors), "failed": len(self.failures)}
        for t in self.tensors:
            out[t.action] = out.get(t.action, 0) + 1
        return out

    def paths(self) -> dict[str, int]:
        """How many merged tensors matched each merge path."""
        out: dict[str, int] = {}
        for t in self.tensors:
            if t.path:
                out[t.path] = out.get(t.path, 0) + 1
        return out

    def as_dict(self) -> dict[str, Any]:
        verdicts: dict[str, int] = {}
        for t in self.failures:
            verdicts[t.verdict] = verdicts.get(t.verdict, 0) + 1
        return {
            "base": self.base,
            "adapter": self.adapter,
            "merged": self.merged,
            "tolerance": self.tolerance,
            "dtype": self.dtype,
            "ok": self.ok,
            "totals": self.counts(),
            "paths": self.paths(),
            "failed_verdicts": verdicts,
            "tensors": [t.as_dict() for t in self.tensors],
        }


def verify_merge(
    base: "str | os.PathLike[str] | BaseModel",
    adapter: "str | os.PathLike[str] | AdapterCheckpoint",
    merged: "str | os.PathLike[str]",
    *,
    tolerance: str = "exact",
    allow_pickle: bool = False,
    base_subfolder: Optional[str] = None,
    base_revision: Optional[str] = None,
) -> MergeVerification:
    """Check ``merged`` against the merge of ``adapter`` into ``base``, one tensor at a time.

    Args:
        base: the base model (any layout :func:`~adapterfmt.read_base` reads; a Hub id is
            downloaded through the cache).
        adapter: a PEFT adapter directory or Hub id (LoRA, DoRA, ``lora_bias``, full copies,
            trainable tokens, AdaLoRA, LoHa / LoKr: whatever ``merge`` merges).
        merged: the merged model directory or weights file.
        tolerance: ``exact`` (bit-equal to one of PEFT's paths) or ``ulp`` (within one ulp).

    Returns:
        :class:`MergeVerification`; ``.ok`` is False when any tensor fails.

    Raises:
        ModelMismatchError: ``merged`` lacks tensors of the base, or has other shapes.
        MergeError: an unknown tolerance.
        The errors of :func:`~adapterfmt.merging.plan.plan_merge` and of the readers.
    """
    if tolerance not in TOLERANCES:
        raise MergeError(f"unknown tolerance {tolerance!r}", key="tolerance", hint="use exact or ulp")
    model = base if isinstance(base, BaseModel) else read_base(base, subfolder=base_subfolder, revision=base_revision, allow_pickle=allow_pickle, download=True)
    ckpt = adapter if isinstance(adapter, AdapterCheckpoint) else read_adapter(adapter, allow_pickle=allow_pickle)
    out = read_base(merged, allow_pickle=allow_pickle)
    dtype = _merged_dtype(model, out)
    plan = plan_merge(model, [ckpt], dtype=dtype)
    planned = {t.key: t for t in plan.tensors()}
    _refuse_mismatch(planned, out, set(plan.untied))
    report = MergeVerification(model.directory, ckpt.directory, out.directory, tolerance, dtype)
    memory: dict[str, Any] = {}
    for m in (model, out):
        if m.tensors_in_memory:
            memory.update({info.file: m.tensors_in_memory for info in list(m.tensors.values())[:1]})
    if ckpt.tensors_in_memory is not None:
        memory[ckpt.weights_file] = ckpt.tensors_in_memory
    checker = _Checker(model, out, tolerance)
    threads = torch.get_num_threads()
    # one intra-op thread: the work is many short element-wise passes over blocks of rows, where
    # torch's threads spin in barriers (3x slower on 2 busy cores); the matmul of B @ A is small
    torch.set_num_threads(1)
    try:
        _check_all(checker, report, planned, plan.untied, memory, out)
    finally:
        torch.set_num_threads(threads)
    return report


def _check_all(checker: "_Checker", report: MergeVerification, planned: dict[str, PlannedTensor], untied: list[str], memory: dict[str, Any], out: BaseModel) -> None:
    def one(item: tuple[str, PlannedTensor]) -> TensorVerdict:
        key, t = item
        if key not in out.tensors:
            return checker.kept_tie(t, planned)
        verdict = checker.check(t, out.tensors[key])
        if key in untied and verdict.ok:
            verdict = checker.untied_config(t, planned, verdict)
        return verdict

    with TensorSource(memory) as source:
        checker.source = source
        # tensors on worker threads, one per core, each with one intra-op thread (torch releases
        # the GIL in its kernels), as the merge does; verdicts kept in the plan's order. At most
        # 4: each holds a tensor's float32 delta (46 MB for a 1.1B MLP weight)
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            report.tensors.extend(pool.map(one, planned.items()))
        for key in out.tensors:
            if key in planned:
                continue
            emb = checker.tied_embedding(key)
            if emb in planned:  # a head the base ties, stored: it must hold what its embedding holds
                v = checker.check(planned[emb], out.tensors[key])
                v.key, v.detail = key, (v.detail or f"stored, equal to the merged '{emb}' it is tied to")
                report.tensors.append(v)
                continue
            report.tensors.append(TensorVerdict(key, "extra", False, V.UNEXPECTED, "is not a tensor of the base model: a leftover of the adapter wrapper?"))
        checker.find_wrong_modules(report.tensors)


def _merged_dtype(base: BaseModel, out: BaseModel) -> Optional[str]:
    """The merged model's one float dtype when it differs from every float dtype of the base (a merge
    with ``--dtype`` / a model loaded in another dtype); None otherwise."""
    merged = {info.dtype for key, info in out.tensors.items() if key in base.tensors and info.dtype in FLOAT_DTYPES}
    based = {info.dtype for info in base.tensors.values() if info.dtype in FLOAT_DTYPES}
    if len(merged) == 1 and merged != based:
        return next(iter(merged))
    return None


def _refuse_mismatch(planned: dict[str, PlannedTensor], out: BaseModel, untied: set[str]) -> None:
    missing = [k for k in planned if k not in out.tensors and k not in untied]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelMismatchError(
            f"the merged model has no tensor '{missing[0]}'{more} of the base model",
            path=out.directory,
            key=missing[0],
            hint="is it a merge of this base? verify-merge needs every tensor",
        )
    for key, t in planned.items():
        info = out.tensors.get(key)
        if info is not None and tuple(info.shape) != tuple(t.shape):
            raise ModelMismatchError(
                f"has shape {list(info.shape)} in the merged model but {list(t.shape)} in the base",
                path=info.file,
                key=key,
                hint="is it a merge of this base?",
            )


def _rows(shape: tuple[int, ...]) -> list[Optional[tuple[int, int]]]:
    if not shape:
        return [None]
    step = max(1, BLOCK_ELEMENTS // max(1, prod(shape[1:])))
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)] or [None]


def _part(t: torch.Tensor, rows: Optional[tuple[int, int]]) -> torch.Tensor:
    return t if rows is None else t[rows[0] : rows[1]]


class _Checker:
    """Checks one planned tensor against the merged model's tensor; keeps what the wrong-module
    pass needs (sketches of every expected and every unexplained change)."""

    def __init__(self, base: BaseModel, out: BaseModel, tolerance: str) -> None:
        self.base = base
        self.out = out
        self.tolerance = tolerance
        self.source: TensorSource = TensorSource()
        self.expected: dict[str, torch.Tensor] = {}  #: key -> sketch of the delta the adapter meant for it
        self.observed: dict[str, torch.Tensor] = {}  #: key -> sketch of an unexplained change
        self.merged: dict[str, PlannedTensor] = {}  #: every merged tensor checked, for the wrong-module pass
        self.local = threading.local()  #: per worker thread: the merge kernel's buffers and a read buffer

    # -- plain tensors ------------------------------------------------------------------------

    def check(self, t: PlannedTensor, info: TensorInfo) -> TensorVerdict:
        if info.dtype != t.dtype:
            return TensorVerdict(t.key, t.action, False, V.DTYPE, f"is {info.dtype} in the merged model, expected {t.dtype}")
        if t.action == COPY:
            if self.source.same_bytes(t.source, info):
                return TensorVerdict(t.key, t.action, True, V.OK)
            return self._unexplained(t, info, "changed, but the adapter does not touch it")
        if t.action in (CONVERT, REPLACE):
            return self._cast(t, info)
        return self._merged(t, info)

    def _cast(self, t: PlannedTensor, info: TensorInfo) -> TensorVerdict:
        dtype = TORCH_DTYPES[t.dtype]
        equal = equal_base = True
        base_info = self.base.tensors.get(t.key)
        for rows in _rows(t.shape):
            m = self.source.read(info, rows)
            equal = equal and V.same_bits(self.source.read(t.source, rows).to(dtype), m)
            if base_info is not None and t.action == REPLACE:
                equal_base = equal_base and V.same_bits(self.source.read(base_info, rows).to(dtype), m)
        if equal:
            return TensorVerdict(t.key, t.action, True, V.OK)
        if t.action == CONVERT:
            return self._unexplained(t, info, f"changed, but the adapter does not touch it (expected the base cast to {t.dtype})")
        if equal_base and base_info is not None:
            return TensorVerdict(t.key, t.action, False, V.FULL_COPY_NOT_APPLIED, "holds the base tensor: the adapter's full copy (modules_to_save) was not put in its place")
        return TensorVerdict(t.key, t.action, False, V.FULL_COPY_WRONG, "differs from both the base tensor and the adapter's full copy")

    def _unexplained(self, t: PlannedTensor, info: TensorInfo, detail: str) -> TensorVerdict:
        base_info = self.base.tensors.get(t.key, t.source)
        parts, err, ref = [], 0.0, 0.0
        for rows in _rows(t.shape):
            w = self.source.read(base_info, rows).float()
            d = self.source.read(info, rows).float() - w
            err = max(err, float(d.abs().max())) if d.numel() else err
            ref = max(ref, float(w.abs().max())) if w.numel() else ref
            if d.dim() >= 2:
                parts.append(d.reshape(d.shape[0], -1) @ V.sketch_vector(prod(d.shape[1:])))
        if parts:
            self.observed[t.key] = torch.cat(parts)
        rel = f" (largest change {err:.3g}, largest base value {ref:.3g})"
        return TensorVerdict(t.key, t.action, False, V.CHANGED, detail + rel)

    # -- merged tensors -----------------------------------------------------------------------

    def _merged(self, t: PlannedTensor, info: TensorInfo) -> TensorVerdict:
        """A merged tensor: one cheap pass that checks PEFT's paths; the statistics behind a
        verdict (or the ulp test) only when none matched."""
        out_dtype = TORCH_DTYPES[t.dtype]
        base_dtype = TORCH_DTYPES[t.source.dtype]
        self.merged[t.key] = t
        if self.tolerance == "exact" and self._merge_kernel_equal(t, info):
            return TensorVerdict(t.key, t.action, True, V.OK, path=PEFT_DEFAULT)
        if not hasattr(self.local, "workspace"):
            self.local.workspace = Workspace()
        deltas = [term_delta(term, self.source, t.shape, self.local.workspace, slot) for slot, term in enumerate(t.terms)]
        if any(d is None for d in deltas):  # DoRA, token rows: the merge's own whole-tensor path only
            w = self.source.read(t.source).float()
            expected = next(tensor_blocks(t, self.source, None))
            m = self.source.read(info)
            r = expected.float()
            stats = V.Stats()
            stats.add(w, m, r, r - w, None, out_dtype, self._base_same(t, m))
            path = PEFT_DEFAULT if V.same_bits(expected, m) else None
            numbers = dict(max_error=stats.max_error, mean_error=stats.mean_error, worst_ulps=stats.worst_ulps)
        else:
            total = deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(0)
            matched, (max_err, sum_err, max_delta, sum_delta) = self._paths(t, info, deltas, out_dtype, base_dtype)
            path = next((name for name, ok in matched.items() if ok), None)
            measured = self.tolerance == "ulp"
            numbers = dict(
                max_error=max_err / max_delta if max_delta and measured else None,
                mean_error=sum_err / sum_delta if sum_delta and measured else None,
                worst_ulps=None,
            )
            if path is None:  # the evidence for a verdict: a second pass
                stats = self._stats(t, info, deltas, total, out_dtype)
                numbers = dict(max_error=stats.max_error, mean_error=stats.mean_error, worst_ulps=stats.worst_ulps)
        if path is not None:
            return TensorVerdict(t.key, t.action, True, V.OK, path=path, **numbers)
        if self.tolerance == "ulp" and stats.over_ulp == 0 and stats.dd > 0:
            return TensorVerdict(t.key, t.action, True, V.OK, "within one ulp of W + Δ", path="ulp", **numbers)
        if stats.expected and stats.DD > 0:
            self.expected[t.key] = torch.cat(stats.expected)
        lora = next((term for term in t.terms if isinstance(term, LoraTerm)), None)
        code, detail = V.classify(
            stats,
            scaling=lora.scaling if lora else None,
            rank=lora.lora.module.rank if lora else None,
            alpha=lora.lora.module.alpha if lora else None,
        )
        if code == V.CHANGED:
            self.observed[t.key] = torch.cat(stats.observed) if stats.observed else torch.empty(0)
        if code == V.ROUNDING and self.tolerance == "ulp":
            detail = f"{stats.over_ulp} of {stats.n} elements are more than one ulp from W + Δ (worst {stats.worst_ulps:.3g} ulp)"
        return TensorVerdict(t.key, t.action, False, code, detail, **numbers)

    def _merge_kernel_equal(self, t: PlannedTensor, info: TensorInfo) -> bool:
        """The fast path of a merged tensor: the merge's own blocked kernel (PEFT's default bits,
        ``adapterfmt merge``'s output) compared byte for byte with ``M``, a block of rows at a time,
        stopping at the first block that differs. False also where the kernel does not take the
        tensor (DoRA, biases, rows, LyCORIS factors, a tensor too small for two blocks, one held in
        memory): then the full check (:meth:`_paths`) decides, as it does after a difference."""
        if info.start < 0 or on_callers_threads(t):
            return False
        local = self.local
        if not hasattr(local, "merger"):
            local.merger, local.raw, local.bytes = BlockedMerge(), bytearray(0), torch.empty(0, dtype=torch.uint8)
        blocks = kernel_blocks(t, self.source, local.merger)
        if blocks is None:
            return False
        row = info.nbytes // info.shape[0]
        for block in blocks:
            size = (block.stop - block.first) * row
            if len(local.raw) < size:
                local.bytes, local.raw = torch.empty(0, dtype=torch.uint8), bytearray(0)
                local.raw = bytearray(size)
                local.bytes = torch.frombuffer(local.raw, dtype=torch.uint8)
            self.source.read_into(info.file, info.start + block.first * row, memoryview(local.raw)[:size], key=info.key)
            if not _same_bytes(local.bytes[:size], torch.frombuffer(block.data, dtype=torch.uint8)):
                return False
        return True

    def _base_same(self, t: PlannedTensor, m: torch.Tensor) -> bool:
        info = self.base.tensors.get(t.key)
        return info is not None and info.dtype == t.dtype and V.same_bits(self.source.read(info), m)

    def _paths(self, t: PlannedTensor, info: TensorInfo, deltas: list, out_dtype: torch.dtype, base_dtype: torch.dtype) -> tuple[dict[str, bool], tuple[float, float, float, float]]:
        """Which of PEFT's paths the merged tensor matches bit for bit, a block of rows at a time;
        and (``--tolerance ulp``) max / sum of |M − (W + Δ)| and of |Δ|."""
        adapter_dtypes = {_adapter_dtype(term) for term in t.terms} - {None, torch.float32}
        adapter_dtype = next(iter(adapter_dtypes)) if len(adapter_dtypes) == 1 else None
        # (name, dtype Δ is rounded to first, whether W was cast to the merged dtype first)
        cases: list[tuple[str, Optional[torch.dtype], bool]] = [(PEFT_DEFAULT, None, False)]
        if adapter_dtype is not None:
            cases.append((PEFT_ADAPTER_DTYPE, adapter_dtype, False))
        cases.append((PEFT_SAFE, base_dtype, False))
        if out_dtype != base_dtype:  # the model loaded in the merged dtype, then merged
            suffix = f"-loaded-as-{t.dtype.lower()}"
            cases += [(name + suffix, out_dtype if name == PEFT_SAFE else dt, True) for name, dt, _ in list(cases)]
        matched = {name: True for name, _, _ in cases}
        max_err = sum_err = max_delta = sum_delta = 0.0
        for rows in _rows(t.shape):
            w = self.source.read(t.source, rows).float()
            m = self.source.read(info, rows)
            parts = [_part(d, rows) for d in deltas]
            r = w + parts[0]  # W + Δ as the merge adds it: the default path before its rounding
            for d in parts[1:]:
                r += d
            for name, dt, loaded in cases:
                if not matched[name]:
                    continue
                if name == PEFT_DEFAULT:
                    matched[name] = V.same_bits(r.to(out_dtype), m)
                    continue
                acc = w.to(out_dtype).float() if loaded else w
                for d in parts:
                    acc = acc + (d if dt is None else d.to(dt).float())
                matched[name] = V.same_bits(acc.to(out_dtype), m)
            if r.numel() and self.tolerance == "ulp":  # the error of a bit-exact match is just its rounding
                total = (parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)).abs()  # |Δ|, a block in cache
                max_delta, sum_delta = max(max_delta, float(total.max())), sum_delta + float(total.sum())
                err = r.sub_(m.float()).abs_()
                max_err = max(max_err, float(err.max()))
                sum_err += float(err.sum())
        return matched, (max_err, sum_err, max_delta, sum_delta)

    def _stats(self, t: PlannedTensor, info: TensorInfo, deltas: list, total: torch.Tensor, out_dtype: torch.dtype) -> V.Stats:
        """The statistics a verdict is drawn from (:class:`.verdicts.Stats`), a second pass."""
        square = total.dim() == 2 and total.shape[0] == total.shape[1]
        base_info = self.base.tensors.get(t.key)
        same_source = base_info is not None and base_info.key == t.source.key and base_info.file == t.source.file
        stats = V.Stats()
        for rows in _rows(t.shape):
            raw = self.source.read(t.source, rows)
            w = raw.float()
            m = self.source.read(info, rows)
            r = w
            for d in deltas:
                r = r + _part(d, rows)
            base_same = base_info is not None and base_info.dtype == t.dtype and V.same_bits(raw if same_source else self.source.read(base_info, rows), m)
            stats.add(w, m, r, _part(total, rows), _part(total.T, rows) if square else None, out_dtype, base_same)
        return stats

    # -- tied heads ---------------------------------------------------------------------------

    def tied_embedding(self, key: str) -> Optional[str]:
        """The weight key of the embedding the base ties ``key``'s module to, if any."""
        module, param = split_param(key)
        emb = self.base.tied.get(module)
        return f"{emb}.{param}" if emb is not None else None

    def _embedding_of(self, head_key: str) -> Optional[str]:
        module, _ = split_param(head_key)
        emb = self.base.tied.get(module)
        return weight_key(emb) if emb is not None else None

    def _still_tied(self, module: str) -> bool:
        """Whether transformers ties ``module`` (a head the base ties) when it loads the merged model:
        unless its config.json says ``tie_word_embeddings: false`` (top level or text config)."""
        if module in self.out.tied:
            return True
        cfg = self.out.config
        flag = cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings"))
        return module in self.base.tied and flag is not False

    def kept_tie(self, t: PlannedTensor, planned: dict[str, PlannedTensor]) -> TensorVerdict:
        """An untied head the merged model does not store: fine where the tie gives it the right values."""
        emb = self._embedding_of(t.key)
        e = planned.get(emb) if emb else None
        module, _ = split_param(t.key)
        if e is not None and self._still_tied(module) and (e.source, e.terms) == (t.source, t.terms):
            return TensorVerdict(t.key, t.action, True, V.OK, f"kept tied to '{emb}', which holds the values PEFT's merge gives both")
        return TensorVerdict(
            t.key,
            t.action,
            False,
            V.TIED_HEAD,
            f"is not stored and the model ties it to '{emb}', but the adapter gives it other values: the tied head was not untied",
        )

    def untied_config(self, t: PlannedTensor, planned: dict[str, PlannedTensor], verdict: TensorVerdict) -> TensorVerdict:
        """A head stored with the right values, but a config that ties it again at load time."""
        emb = self._embedding_of(t.key)
        e = planned.get(emb) if emb else None
        module, _ = split_param(t.key)
        if self._still_tied(module) and e is not None and (e.source, e.terms) != (t.source, t.terms):
            return TensorVerdict(
                t.key,
                t.action,
                False,
                V.TIED_HEAD,
                f"holds the right values, but config.json still ties it to '{emb}': transformers will load the embedding in its place (set tie_word_embeddings to false)",
            )
        return verdict

    # -- after the pass -----------------------------------------------------------------------

    def _expected_sketch(self, t: PlannedTensor) -> Optional[torch.Tensor]:
        deltas = [term_delta(term, self.source, t.shape) for term in t.terms]
        if any(d is None for d in deltas) or len(t.shape) < 2:
            return None
        total = deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(0)
        return total.reshape(total.shape[0], -1) @ V.sketch_vector(prod(total.shape[1:]))

    def find_wrong_modules(self, verdicts: list[TensorVerdict]) -> None:
        """A change that is another tensor's delta, and a missing delta that landed elsewhere."""
        by_key = {v.key: v for v in verdicts}
        if not self.observed:
            return
        shapes = {tuple(by_shape.shape) for by_shape in self.observed.values()}
        for key, t in self.merged.items():  # the deltas of tensors that passed: sketched only now
            if key not in self.expected and any(len(s) and s[0] == t.shape[0] for s in shapes):
                sketch = self._expected_sketch(t)
                if sketch is not None:
                    self.expected[key] = sketch
        for key, seen in self.observed.items():
            for other, meant in self.expected.items():
                if other != key and V.matches(seen, meant):
                    v = by_key[key]
                    v.verdict, v.detail = V.WRONG_MODULE, f"holds the delta meant for '{other}': the adapter was applied to the wrong module"
                    o = by_key.get(other)
                    if o is not None and o.verdict == V.NOT_APPLIED:
                        o.verdict, o.detail = V.WRONG_MODULE, f"not applied here: its delta was applied to '{key}' instead"
                    break


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two byte tensors of one size compared as the widest integers their size allows (a
    byte-wise ``torch.equal`` is several times slower)."""
    n = a.numel()
    if n != b.numel():
        return False
    wide = next(dt for size, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8)) if n % size == 0)
    return bool(torch.equal(a.view(wide), b.view(wide)))


def _adapter_dtype(term: Any) -> Optional[torch.dtype]:
    """The dtype PEFT computes a term's delta in (its ``lora_B``'s), None for non-LoRA terms."""
    if not isinstance(term, LoraTerm):
        return None
    info = term.lora.module.tensors.get("lora_B")
    return TORCH_DTYPES.get(info.dtype) if info is not None else None
