"""Plan a merge from headers alone: what every output tensor is, where it goes, what it costs.

:func:`plan_merge` gives every tensor of the base model one action and lays the output out in
shards (:mod:`adapterfmt.merging.output` decides that layout: shard files, index, config.json,
side files). No tensor byte is read and torch is not imported, so every refusal (unresolved modules,
shape errors, unsupported features, adapters that conflict) happens before anything is written.

Actions:

* ``copy`` — nothing changes it: its bytes are copied through, no decode, no dtype round trip;
* ``convert`` — only ``dtype`` changes it;
* ``replace`` — a full copy (``modules_to_save``) or a base tensor saved in the adapter takes
  its place, cast to the output dtype;
* ``merge`` — ``W + Σ weight_i · ΔW_i`` in float32, rounded once (DoRA, ``lora_bias`` and
  trainable-token rows are terms of the same sum, applied in adapter order).

Tied embeddings (FORMAT §6.9): where the base ties an output head to its input embedding and
an adapter changes either, both tensors are written and ``tie_word_embeddings`` is set to false.
The values follow PEFT's ``merge_and_unload``: LoRA deltas and token rows on either module land
in the one shared tensor, so both get them; a full copy replaces only its own module. (PEFT's
merged model keeps the tie in the LoRA case, the two tensors being one; writing both with equal
values gives the same logits and cannot be re-tied wrongly by a later change.)

An output ``dtype`` applies to every floating-point tensor, not only the merged ones, and is
written to config.json: asking for an fp16 model means all of it, as transformers' ``dtype``
does. Integer, bool and fp8 tensors are copied as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from ..base.reading import BaseModel
from ..base.resolution import Resolution, ResolvedLora, resolve
from ..checkpoint.findings import Finding
from ..checkpoint.keys import KeyParts, Role, render_base
from ..checkpoint.matching import apply_prefix_map
from ..checkpoint.weight_tying import tied_lora_twins, ties_in_effect, without_twins
from ..constants import DTYPE_BITS
from ..errors import (
    MergeError,
    ShapeMismatchError,
    UnresolvedModulesError,
    UnsupportedFeatureError,
)
from ..formats.peft.reading import AdapterCheckpoint
from ..storage.gc_pause import with_gc_paused
from ..storage.header import TensorInfo
from ..tables.architectures import checkpoint_key, untie_flag_allowed
from .checks import FLOAT_DTYPES, refuse_bad_resolution, refuse_non_float, refuse_unplaced, refuse_unsupported, token_indices
from .output import OutputNames, ShardPlan, changed_config, index_document, layout_shards, output_names, side_files

COPY, CONVERT, REPLACE, MERGE = "copy", "convert", "replace", "merge"

#: ``--dtype`` spellings -> safetensors dtype.
DTYPE_NAMES = {
    "bf16": "BF16", "bfloat16": "BF16",
    "fp16": "F16", "float16": "F16", "half": "F16",
    "fp32": "F32", "float32": "F32", "float": "F32",
}  # fmt: skip


@dataclass(frozen=True)
class LoraTerm:
    """``+ scaling · ΔW`` of one LoRA module (``scaling`` includes the adapter's weight)."""

    adapter: int
    lora: ResolvedLora
    scaling: float


@dataclass(frozen=True)
class BiasTerm:
    """``+ scaling · lora_B.bias`` on a base bias (``lora_bias``)."""

    adapter: int
    info: TensorInfo
    scaling: float


@dataclass(frozen=True)
class RowsTerm:
    """Rows ``indices[j]`` replaced by row ``j`` of a trainable-token tensor (FORMAT §6.7)."""

    adapter: int
    info: TensorInfo
    indices: tuple[int, ...]


Term = Union[LoraTerm, BiasTerm, RowsTerm]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its key, dtype and shape, and how it is made from ``source``."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    action: str
    source: TensorInfo  #: the base tensor, or the adapter tensor that replaces it
    terms: tuple[Term, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BITS[self.dtype] // 8

    @property
    def raw(self) -> bool:
        """Written by copying the source's bytes (same dtype, nothing added)."""
        return not self.terms and self.source.dtype == self.dtype


@dataclass
class MergePlan:
    """Everything :func:`~adapterfmt.merging.engine.merge_to_directory` writes, decided from headers.

    Attributes:
        shards: output files in write order.
        indexed: whether ``model.safetensors.index.json`` is written.
        config: the ``config.json`` to write when it must change (untied head, dtype), else None.
        files: the base's non-weight files copied as they are, relative to ``output.root``.
        untied: head tensors written next to their embedding (``lm_head.weight``).
        skipped: adapter modules or keys left out under ``allow_unused``.
        findings: warnings about the base (``shadowed-weights``) and from resolving the adapters.
        output: where the weights go inside OUT and their names (the base's layout).
        applied: per adapter, how many of its LoRA modules, full copies, saved base tensors and
            token-row tensors the output carries, next to how many it has (every one, unless
            ``allow_unused`` skipped some: the plan refuses to drop a resolved part).
    """

    base: BaseModel
    adapters: list[AdapterCheckpoint]
    weights: list[float]
    dtype: Optional[str]
    shards: list[ShardPlan]
    indexed: bool
    config: Optional[dict[str, Any]]
    files: list[str]
    untied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    output: OutputNames = field(default_factory=lambda: OutputNames(""))
    applied: list[dict[str, list[int]]] = field(default_factory=list)

    def tensors(self) -> Iterator[PlannedTensor]:
        for shard in self.shards:
            yield from shard.tensors

    @property
    def total_size(self) -> int:
        """Tensor bytes of the output (``metadata.total_size`` of the index)."""
        return sum(s.nbytes for s in self.shards)

    def count(self, action: str) -> int:
        return sum(1 for t in self.tensors() if t.action == action)

    def index(self) -> dict[str, Any]:
        """The ``model.safetensors.index.json`` document (keys sorted, as transformers writes them)."""
        return index_document(self.shards, self.base.index_metadata)


def normalize_dtype(dtype: Optional[str]) -> Optional[str]:
    """``"bf16"`` / ``"bfloat16"`` / ``"BF16"`` -> ``"BF16"``; None stays None.

    Raises:
        MergeError: an unknown spelling.
    """
    if dtype is None:
        return None
    name = DTYPE_NAMES.get(str(dtype).lower(), str(dtype).upper())
    if name not in ("F16", "BF16", "F32"):
        raise MergeError(f"unknown output dtype {dtype!r}", key="dtype", hint="use bf16, fp16 or fp32")
    return name


@with_gc_paused
def plan_merge(
    base: BaseModel,
    adapters: Sequence[AdapterCheckpoint],
    *,
    weights: Optional[Sequence[float]] = None,
    dtype: Optional[str] = None,
    max_shard_size: "int | str | None" = None,
    allow_unused: bool = False,
    prefix_map: Optional[dict[str, str]] = None,
    resolver: Optional[Callable[[AdapterCheckpoint, BaseModel], Resolution]] = None,
) -> MergePlan:
    """Decide every output tensor of merging ``adapters`` into ``base``, from headers.

    Args:
        base (`BaseModel`): from :func:`~adapterfmt.base.reading.read_base`.
        adapters (`Sequence[AdapterCheckpoint]`): merged in this order.
        weights (`Sequence[float]`, *optional*): one per adapter, defaults to 1.0 each. Multiplies
            the LoRA deltas (and ``lora_bias``); full copies and token rows are not weighted, and
            an adapter with DoRA modules takes weight 1 only.
        dtype (`str`, *optional*): output dtype of every floating-point tensor (``bf16``,
            ``fp16``, ``fp32``); defaults to each base tensor's own dtype.
        max_shard_size (`int` or `str`, *optional*): re-plan the shards with huggingface_hub's
            planner (``"5GB"``); defaults to the base's own shard layout.
        allow_unused (`bool`, *optional*, defaults to `False`): merge what resolves and skip
            adapter modules that match no base tensor, instead of refusing.
        prefix_map (`dict`, *optional*): module-path prefix rewrites ``{old: new}`` applied to
            every adapter's module paths before they are looked up (``--prefix-map``).
        resolver (`Callable`, *optional*): binds an adapter to the base in place of
            :func:`~adapterfmt.base.resolution.resolve` (a single-file checkpoint, whose fused
            tensors take LoRAs on rows: :attr:`~adapterfmt.base.resolution.ResolvedLora.rows`).

    Returns:
        A :class:`MergePlan`.

    Raises:
        UnresolvedModulesError: adapter modules match no base tensor (and not ``allow_unused``).
        UnknownKeyError: adapter keys that fit no rule of the key grammar (and not ``allow_unused``).
        ShapeMismatchError: adapter tensors that do not fit their base tensors.
        UnsupportedFeatureError: config features adapterfmt cannot merge, conv ``groups > 1``,
            merging into a non-float (quantized) tensor.
        MergeError: bad weights or dtype, two adapters replacing one tensor, a full copy and a
            LoRA on one module.
    """
    adapters = list(adapters)
    if not adapters:
        raise MergeError("no adapter to merge", hint="give at least one adapter")
    weights = _weights(weights, len(adapters))
    out_dtype = normalize_dtype(dtype)
    slots = _Slots(base)
    skipped: list[str] = []
    findings: list[Finding] = []
    applied: list[dict[str, list[int]]] = []
    for i, adapter in enumerate(adapters):
        refuse_unsupported(adapter)
        res = resolver(adapter, base) if resolver is not None else resolve(adapter, base, prefix_map=prefix_map)
        refuse_bad_resolution(adapter, res, allow_unused)
        skipped += res.unresolved
        findings += [f for f in res.findings if f not in findings]  # the base's own warnings come once
        # a config that disagrees with its tensors is merged by the tensors: say so (BEHAVIOUR §2.1)
        findings += [f for f in adapter.findings if f.code == "config-tensor-mismatch"]
        if adapter.unknown_keys:
            skipped += adapter.unknown_keys
        before = len(skipped)
        slots.add(i, adapter, res, weights[i], skipped, allow_unused, prefix_map)
        tokens = len(adapter.token_deltas)
        applied.append(
            {
                "lora_modules": [len(res.lora) + len(res.param_lora), len(adapter.lora)],
                "full_copies": [len(res.full_copies), len(adapter.full_copies)],
                "base_tensors": [len(res.overrides), len(adapter.base_overrides)],
                "token_rows": [tokens - (len(skipped) - before), tokens],
            }
        )
    planned, extra, untied = slots.plan(out_dtype)
    shards, indexed = layout_shards(base, planned, extra, max_shard_size)
    return MergePlan(
        base=base,
        adapters=adapters,
        weights=weights,
        dtype=out_dtype,
        shards=shards,
        indexed=indexed,
        config=changed_config(base.config, untie=bool(untied) and untie_flag_allowed(base.config), dtype=out_dtype),
        files=side_files(base),
        untied=untied,
        skipped=skipped,
        findings=findings,
        output=output_names(base),
        applied=applied,
    )


def _weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0] * n
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} adapters", key="weight", hint="give one --weight per --adapter, or none")
    out = [float(w) for w in weights]
    bad = [w for w in out if not math.isfinite(w)]
    if bad:
        raise MergeError(f"weight {bad[0]} is not a finite number", key="weight")
    return out


def _weight_key(module: str) -> str:
    return render_base(KeyParts(module, Role.PLAIN, "weight"))


@dataclass
class _Slot:
    """What the adapters do to one output key."""

    full_copy: Optional[tuple[int, TensorInfo]] = None  #: modules_to_save: the module is replaced
    override: Optional[tuple[int, TensorInfo]] = None  #: a saved base tensor: replaced, LoRA applies on top
    terms: list[Term] = field(default_factory=list)


class _Slots:
    """Per output key, the replacements and terms of every adapter; then the planned tensors."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.slots: dict[str, _Slot] = {}
        self.heads: dict[str, str] = {}  #: embedding module -> tied head module an adapter named
        self.expected: list[tuple[int, str, object]] = []  #: (adapter, name, term or replacing tensor) to place
        self.twins: set[tuple[int, str]] = set()  #: (adapter, head LoRA) mirroring an embedding LoRA (ensure_weight_tying)
        self.accounted: set[int] = set()  #: ids of twin terms applied through their embedding LoRA

    def _slot(self, key: str) -> _Slot:
        return self.slots.setdefault(key, _Slot())

    def _replace(self, key: str, which: str, adapter: int, info: TensorInfo, where: str) -> None:
        slot = self._slot(key)
        held = slot.full_copy or slot.override
        if held is not None:
            raise MergeError(
                f"adapters #{held[0] + 1} and #{adapter + 1} both replace this tensor",
                key=key,
                path=where,
                hint="merge them separately or drop one of the full copies",
            )
        setattr(slot, which, (adapter, info))
        self.expected.append((adapter, key, info))

    def _tied_head(self, module: str, key: str) -> Optional[str]:
        """The embedding module if ``module`` is a tied head that ``key`` reaches through the tie."""
        if module in self.base.tied and _weight_key(module) != key:
            return self.base.tied[module]
        return None

    def add(
        self, i: int, adapter: AdapterCheckpoint, res: Resolution, weight: float, skipped: list[str], allow_unused: bool, prefix_map: Optional[dict[str, str]] = None
    ) -> None:
        where = adapter.weights_file
        dora = [path for path, rl in res.lora.items() if rl.module.use_dora]
        if dora and weight != 1.0:
            raise MergeError(
                f"has DoRA modules ('{dora[0]}'), which merge only with weight 1: DoRA is not linear in ΔW, so weight {weight} has no meaning",
                path=where,
                key="weight",
                hint="drop --weight for this adapter",
            )
        by_saved_key = {saved: key for key, saved in adapter.base_override_keys.items()}
        for base_key, saved_key in res.overrides.items():  # base_key: as stored on disk
            self._replace(base_key, "override", i, adapter.base_overrides[by_saved_key[saved_key]], where)
        for module, params in res.full_copies.items():
            copy_ = adapter.full_copies[module]
            for param, base_key in params.items():
                key = render_base(KeyParts(module, Role.FULL_COPY, param))
                embedding = self._tied_head(module, base_key)
                if embedding is not None:
                    self.heads.setdefault(embedding, module)
                self._replace(key if embedding else base_key, "full_copy", i, copy_.tensors[param], where)
        self.twins.update((i, head) for head in tied_lora_twins(adapter))
        for path, bound in res.param_lora.items():  # target_parameters: one term per on-disk tensor
            for rl in bound:
                term = LoraTerm(i, rl, rl.scaling * weight)
                self._slot(rl.base_key).terms.append(term)
                self.expected.append((i, f"{path} -> {rl.base_key}", term))
        for path, rl in res.lora.items():
            for slot, info in rl.module.tensors.items():
                refuse_non_float(info, rl.module.keys[slot], where)
            embedding = self._tied_head(path, rl.base_key)
            if embedding is not None:
                self.heads.setdefault(embedding, path)
            if rl.module.factors != "diff" or "diff" in rl.module.tensors:  # a ComfyUI .diff_b alone changes only the bias
                term = LoraTerm(i, rl, rl.module.scaling * weight)
                self._slot(rl.base_key).terms.append(term)
                self.expected.append((i, path, term))
            if rl.bias_key:
                bias = rl.module.tensors["lora_B.bias"]
                base_bias = self.base.tensors[rl.bias_key]
                if tuple(bias.shape) != tuple(base_bias.shape):
                    raise ShapeMismatchError(
                        f"lora_B.bias has shape {list(bias.shape)} but the base bias '{rl.bias_key}' has {list(base_bias.shape)}",
                        path=where,
                        key=rl.module.keys["lora_B.bias"],
                    )
                bias_scale = rl.module.scaling if rl.module.bias_scaling is None else rl.module.bias_scaling
                bias_term = BiasTerm(i, bias, bias_scale * weight)
                self._slot(rl.bias_key).terms.append(bias_term)
                self.expected.append((i, f"{path} (lora_B.bias)", bias_term))
        for path, td in adapter.token_deltas.items():
            key = checkpoint_key(self.base.config, render_base(KeyParts(apply_prefix_map(path, prefix_map), Role.TOKENS_DELTA)), self.base.tensors)
            module = key[: -len(".weight")]
            if key not in self.base.tensors and module in self.base.tied:
                key = _weight_key(self.base.tied[module])
            if key not in self.base.tensors:
                if not allow_unused:
                    raise UnresolvedModulesError(
                        f"trainable tokens for '{path}' match no tensor of the base model",
                        unresolved=[path],
                        path=where,
                        key=td.key,
                        hint="pass --allow-unused to merge the rest",
                    )
                skipped.append(path)
                continue
            refuse_non_float(td.tensor, td.key, where)
            rows = RowsTerm(i, td.tensor, token_indices(td, self.base.tensors[key], where))
            self._slot(key).terms.append(rows)
            self.expected.append((i, f"{path} (trainable tokens)", rows))

    def plan(self, out_dtype: Optional[str]) -> tuple[dict[str, PlannedTensor], dict[str, str], list[str]]:
        """``(planned by key, new key -> key it follows, untied head keys)``."""
        base = self.base
        heads_of: dict[str, list[str]] = {}
        ties = {**base.tied, **ties_in_effect(base, set(self.slots))}  # + both stored, equal: one tensor in memory
        for head, embedding in ties.items():
            heads_of.setdefault(embedding, []).append(head)
        shared: dict[str, list[str]] = {}  # embedding key -> every tied key written beside it
        for embedding, heads in heads_of.items():
            emb_key = _weight_key(embedding)
            head_keys = [_weight_key(h) for h in heads]
            if emb_key in base.tensors and (emb_key in self.slots or any(k in self.slots for k in head_keys)):
                # Every module of the tie group gets its own tensor: once the config unties the
                # group (BART: lm_head and the encoder/decoder embeddings share model.shared),
                # transformers ties none of them back.
                shared[emb_key] = head_keys
        for key, slot in self.slots.items():
            if slot.full_copy and slot.terms and key not in shared:
                raise MergeError(
                    f"adapter #{slot.full_copy[0] + 1} replaces this module (modules_to_save) while adapter "
                    f"#{slot.terms[0].adapter + 1} changes it with LoRA; PEFT cannot combine the two either",
                    key=key,
                    hint="merge the adapters one at a time",
                )
        planned = {key: self._tensor(key, info, self.slots.get(key), out_dtype) for key, info in base.tensors.items()}
        for emb_key, head_keys in shared.items():
            emb = self.slots.get(emb_key) or _Slot()
            heads = [(k, self.slots.get(k) or _Slot()) for k in head_keys]
            if emb.full_copy and emb.terms and all(h.full_copy for _, h in heads):
                raise MergeError(
                    "LoRA on a tied embedding whose input and output modules are both replaced by full copies changes nothing",
                    key=emb_key,
                    hint="drop the LoRA or one of the full copies",
                )
            # One tensor shared by every module of the group: LoRA and token rows on any land in
            # it (as in PEFT's in-place merge); a full copy replaces only its own module.
            terms = list(emb.terms)
            override = emb.override
            for _, head in heads:
                if not head.full_copy:
                    kept, applied = without_twins(head.terms, emb.terms, self.twins)
                    terms += kept
                    self.accounted.update(id(t) for t in applied)
                if head.override and override:  # several sides of the one tied tensor saved in full
                    self.accounted.add(id(head.override[1]))
                override = override or head.override
            together = _Slot(override=override, terms=sorted(terms, key=lambda t: t.adapter))
            info = base.tensors[emb_key]
            planned[emb_key] = self._tensor(emb_key, info, _Slot(full_copy=emb.full_copy) if emb.full_copy else together, out_dtype)
            for key, head in heads:
                planned[key] = self._tensor(key, info, _Slot(full_copy=head.full_copy) if head.full_copy else together, out_dtype)
        _check_disjoint_rows(planned)
        refuse_unplaced(self.expected, planned.values(), self.accounted)
        new = {key: emb for emb, keys in shared.items() for key in keys if key not in base.tensors}
        return planned, new, [key for keys in shared.values() for key in keys]

    def _tensor(self, key: str, base_info: TensorInfo, slot: Optional[_Slot], out_dtype: Optional[str]) -> PlannedTensor:
        dtype = out_dtype if out_dtype and base_info.dtype in FLOAT_DTYPES else base_info.dtype
        slot = slot or _Slot()
        replaced = slot.full_copy or slot.override
        if not replaced and not slot.terms:
            return PlannedTensor(key, dtype, base_info.shape, COPY if dtype == base_info.dtype else CONVERT, base_info)
        source = replaced[1] if replaced else base_info
        if slot.terms:
            if base_info.dtype not in FLOAT_DTYPES or source.dtype not in FLOAT_DTYPES:
                raise UnsupportedFeatureError(
                    f"is stored as {source.dtype}; LoRA can only be merged into float tensors ({', '.join(FLOAT_DTYPES)})",
                    path=source.file,
                    key=key,
                    hint="dequantize the base model first",
                )
            return PlannedTensor(key, dtype, base_info.shape, MERGE, source, tuple(slot.terms))
        if replaced and source.dtype not in FLOAT_DTYPES and source.dtype != dtype:
            raise UnsupportedFeatureError(f"is stored as {source.dtype} but the base tensor is {dtype}", path=source.file, key=key)
        return PlannedTensor(key, dtype, base_info.shape, REPLACE, source)


def _check_disjoint_rows(planned: dict[str, PlannedTensor]) -> None:
    for t in planned.values():
        seen: dict[int, int] = {}
        for term in t.terms:
            if isinstance(term, RowsTerm):
                for idx in term.indices:
                    if idx in seen and seen[idx] != term.adapter:
                        raise MergeError(
                            f"adapters #{seen[idx] + 1} and #{term.adapter + 1} both replace token row {idx}",
                            key=t.key,
                            hint="PEFT refuses overlapping trainable tokens too; merge one of them",
                        )
                    seen[idx] = term.adapter


__all__ = [
    "BiasTerm",
    "LoraTerm",
    "MergePlan",
    "PlannedTensor",
    "RowsTerm",
    "ShardPlan",
    "normalize_dtype",
    "plan_merge",
]
