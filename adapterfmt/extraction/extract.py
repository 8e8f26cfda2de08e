"""``extract``: a PEFT LoRA adapter for ``T − B``, one module at a time, written atomically.

Memory: one module's base and tuned weights and its float32 delta (plus the SVD workspace), and
the factors made so far (``rank · (m + n)`` per module, a few percent of the model at usual
ranks); full copies are copied file to file from the tuned model, never decoded. Headers of both
models are read and checked first (a Hub id by range requests, then downloaded through the cache).
The adapter is written through :mod:`adapterfmt.storage.staging` with the streaming safetensors
writer, so a failed run leaves nothing.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ..base.reading import BaseModel, read_base
from ..checkpoint.keys import KeyParts, Role, bias_key, render_saved
from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, PEFT_PREFIX
from ..deltas.rank_rules import RankRule, make_rule
from ..errors import MergeError, UnsupportedFeatureError
from ..storage.safetensors_stream import ShardWriter, TensorSpec
from ..storage.staging import StagedDirectory, check_output_path, clean_stale, write_text
from ..storage.tensor_source import TensorSource
from ..storage.torch_io import SAFETENSORS_DTYPES, TORCH_DTYPES, tensor_bytes
from .factorize import Factors, factorize
from .pairing import NotLowRank, Pairing, classify, pair_models

#: ranks vLLM accepts as ``max_lora_rank`` (the largest bounds every adapter rank)
VLLM_MAX_RANK = 512
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModuleReport:
    module: str
    shape: tuple[int, ...]
    rank: int
    retained_energy: float
    relative_error: float
    method: str
    bias: bool
    delta_norm: float  #: ‖Δ‖_F
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


@dataclass
class ExtractSummary:
    """What :func:`extract_adapter` wrote, per module and in total."""

    output: str
    base: str
    tuned: str
    rule: dict[str, Any]
    target: Optional[str]
    svd: str = "auto"
    modules: list[ModuleReport] = field(default_factory=list)
    not_low_rank: list[NotLowRank] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unchanged: int = 0
    full_copies: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def totals(self) -> dict[str, Any]:
        total = sum(m.delta_norm**2 for m in self.modules)
        res = sum((m.delta_norm * m.relative_error) ** 2 for m in self.modules)
        return {
            "modules": len(self.modules),
            "params": sum(m.rank * sum(m.shape) for m in self.modules),
            "randomized": sum(m.method == "randomized" for m in self.modules),
            "exact": sum(m.method == "exact" for m in self.modules),
            "retained_energy": 1.0 - res / total if total else 1.0,
            "relative_error": (res / total) ** 0.5 if total else 0.0,
            "unchanged_tensors": self.unchanged,
            "not_low_rank": len(self.not_low_rank),
            "full_copies": len(self.full_copies),
            "seconds": round(self.seconds, 3),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "base": self.base,
            "tuned": self.tuned,
            "rule": self.rule,
            "svd": self.svd,
            "for": self.target,
            "totals": self.totals(),
            "modules": [m.as_dict() for m in self.modules],
            "not_low_rank": [n.as_dict() for n in self.not_low_rank],
            "dropped": self.dropped,
            "files": self.files,
        }


def extract_adapter(
    base: "str | os.PathLike[str]",
    tuned: "str | os.PathLike[str]",
    out: "str | os.PathLike[str]",
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    target_modules: Optional[Sequence[str]] = None,
    full_copies: Sequence[str] = (),
    target: Optional[str] = None,
    seed: int = 0,
    dtype: str = "fp32",
    svd: str = "auto",
    overwrite: bool = False,
    base_revision: Optional[str] = None,
    tuned_revision: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> ExtractSummary:
    """Write a PEFT LoRA adapter for ``tuned − base`` to ``out`` (BEHAVIOUR §10).

    Args:
        base, tuned: model directories, weights files or Hub ids (any layout ``read_base`` reads).
        rank / energy: exactly one: a fixed rank per module, or the fraction of each module's
            ``‖Δ‖²_F`` to keep (0 < F ≤ 1).
        target_modules: only modules matching these names (PEFT's suffix rule) become LoRA modules.
        full_copies: modules saved whole (``modules_to_save``) when they changed.
        target: ``"vllm"``: an adapter vLLM loads (no full copies, no ``lora_bias``, rank ≤ 512).
        seed: the randomized SVD's generator seed (per module: seed and module name).
        dtype: the factors' dtype (``fp32``, ``bf16``, ``fp16``); errors are measured as stored.
        svd: ``auto`` (randomized, exact SVD where it misses the rule's target), ``randomized``
            (``--rank``: the randomized result without the optimality certificate), ``exact``.

    Raises:
        ModelMismatchError: the tuned model is not a fine-tune of ``base`` (names the tensor).
        MergeError: a bad rule, dtype or option combination.
        OutputPathError, and the readers' errors.
    """
    started = time.perf_counter()
    rule = _rule(rank, energy)
    if dtype not in DTYPES:
        raise MergeError(f"unknown dtype {dtype!r}", key="dtype", hint="use fp32, bf16 or fp16")
    if svd not in ("auto", "randomized", "exact"):
        raise MergeError(f"unknown svd method {svd!r}", key="svd", hint="use auto, randomized or exact")
    if target not in (None, "vllm"):
        raise MergeError(f"unknown target {target!r}", key="for", hint="use vllm")
    if target == "vllm" and full_copies:
        raise UnsupportedFeatureError("vLLM refuses full copies (modules_to_save)", key="--full-copies", hint="drop --full-copies or --for vllm")
    if target == "vllm" and rank is not None and rank > VLLM_MAX_RANK:
        raise UnsupportedFeatureError(f"rank {rank} is above vLLM's largest max_lora_rank ({VLLM_MAX_RANK})", key="--rank")
    # headers first: a mismatch or a Hub failure is reported before anything is downloaded
    b_head, t_head = read_base(base, revision=base_revision), read_base(tuned, revision=tuned_revision)
    pair_models(b_head, t_head)
    b_model = b_head if b_head.remote is None else read_base(base, revision=base_revision, download=True)
    t_model = t_head if t_head.remote is None else read_base(tuned, revision=tuned_revision, download=True)
    clean_stale(out)
    target_dir = check_output_path(out, [_root(b_model), _root(t_model)], overwrite=overwrite)
    summary = ExtractSummary(target_dir, os.fspath(base), os.fspath(tuned), {rule.kind: int(rule.value) if rule.kind == "rank" else rule.value}, target, svd)
    with TensorSource(_memory(b_model, t_model)) as source:
        pairing = classify(b_model, t_model, source, targets=target_modules, full_copies=full_copies)
        summary.unchanged = pairing.unchanged
        summary.not_low_rank = pairing.not_low_rank
        summary.full_copies = sorted(pairing.full_copies)
        biases = dict(pairing.biases)
        if target == "vllm" and biases:
            summary.dropped = [f"{t.key}: vLLM refuses lora_bias" for _, t in biases.values()]
            biases = {}
        made = _factorize_all(pairing, source, rule, seed, DTYPES[dtype], svd, summary, progress)
        biases = _bias_terms(b_model, made, biases, summary)
        too_big = [m for m, f in made.items() if f.rank > VLLM_MAX_RANK]
        if target == "vllm" and too_big:
            raise UnsupportedFeatureError(
                f"needs rank {made[too_big[0]].rank} for the energy asked, above vLLM's largest max_lora_rank ({VLLM_MAX_RANK})",
                key=too_big[0],
                hint="lower --energy or use --rank",
            )
        if not made and not pairing.full_copies:
            raise MergeError("the tuned model does not differ from the base in any tensor the adapter can hold", path=t_model.directory, hint="is it the same model? see the list of changed tensors with --json")
        config = _config(b_model, os.fspath(base), made, biases, pairing, target_modules)
        with StagedDirectory(target_dir, overwrite=overwrite) as staging:
            _write_weights(staging.file(ADAPTER_SAFETENSORS_FILE), made, biases, pairing, source, DTYPES[dtype])
            write_text(staging.file(ADAPTER_CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True) + "\n")
            staging.commit()
    summary.files = [ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE]
    summary.seconds = time.perf_counter() - started
    return summary


def _rule(rank: Optional[int], energy: Optional[float]) -> RankRule:
    if (rank is None) == (energy is None):
        raise MergeError("give exactly one of rank and energy", key="--rank/--energy", hint="--rank 16, or --energy 0.9")
    return make_rule("rank", rank) if rank is not None else make_rule("energy", energy)  # validated as resize's rules


def _root(model: BaseModel) -> str:
    if model.layout is None:
        return model.directory
    return model.layout.loose_file or model.layout.root


def _memory(*models: BaseModel) -> dict[str, Any]:
    memory: dict[str, Any] = {}
    for m in models:
        if m.tensors_in_memory:
            memory.update({info.file: m.tensors_in_memory for info in list(m.tensors.values())[:1]})
    return memory


def _factorize_all(
    pairing: Pairing, source: TensorSource, rule: RankRule, seed: int, dtype: torch.dtype, svd: str, summary: ExtractSummary, progress: Optional[Callable[[str], None]]
) -> dict[str, Factors]:
    made: dict[str, Factors] = {}
    for module, (b, t) in pairing.lora.items():
        mark = time.perf_counter()
        delta = source.read(t).float() - source.read(b).float()  # two tensors and the delta: the workspace
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % (1 << 63))
        f = factorize(delta, rule, generator=generator, dtype=dtype, precision=_coarsest(dtype, b.dtype, t.dtype), svd=svd)
        del delta
        if f.rank == 0:
            continue
        made[module] = f
        summary.modules.append(
            ModuleReport(module, tuple(t.shape), f.rank, f.retained_energy, f.relative_error, f.method, module in pairing.biases, f.total**0.5, round(time.perf_counter() - mark, 4))
        )
        if progress is not None:
            progress(module)
    return made


def _coarsest(dtype: torch.dtype, *stored: str) -> torch.dtype:
    """The dtype of the largest epsilon among the factors' and the models' tensors' (``F32``, ``BF16``, ...)."""
    dtypes = [dtype] + [TORCH_DTYPES[d] for d in stored if d in TORCH_DTYPES and TORCH_DTYPES[d].is_floating_point]
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def _bias_terms(base: BaseModel, made: dict[str, Factors], biases: dict, summary: ExtractSummary) -> dict:
    """The ``lora_B.bias`` of every LoRA module, or none: PEFT's ``lora_bias`` gives every targeted
    module one and cannot merge it into a module without a base bias. So bias deltas are kept
    only when every LoRA module has a base bias (unchanged ones get zeros); else they are listed."""
    biases = {m: pair for m, pair in biases.items() if m in made}
    if not biases:
        return {}
    missing = [m for m in made if bias_key(m) not in base.tensors]
    if missing:
        for module, (_, t) in biases.items():
            summary.not_low_rank.append(NotLowRank(t.key, tuple(t.shape), f"a bias delta: lora_bias would give every LoRA module a bias, and '{missing[0]}' has none in the base"))
        for m in summary.modules:
            m.bias = False
        return {}
    return {m: biases.get(m, (base.tensors[bias_key(m)], None)) for m in made}


def _config(base: BaseModel, base_spec: str, made: dict[str, Factors], biases: dict, pairing: Pairing, target_modules: Optional[Sequence[str]]) -> dict[str, Any]:
    ranks = {m: f.rank for m, f in made.items()}
    r = max(ranks.values(), default=1)
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    architectures = base.config.get("architectures") or []
    task = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_spec,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(made),
        "modules_to_save": sorted(pairing.full_copies) or None,
        "lora_bias": bool(biases),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "inference_mode": True,
    }


def _key(module: str, role: Role, param: Optional[str]) -> str:
    return render_saved(KeyParts(module, role, param), prefix=PEFT_PREFIX)


def _bias_delta(source: TensorSource, b: Any, t: Any, dtype: torch.dtype) -> torch.Tensor:
    base = source.read(b).float()
    return (torch.zeros_like(base) if t is None else source.read(t).float() - base).to(dtype)


def _write_weights(path: str, made: dict[str, Factors], biases: dict, pairing: Pairing, source: TensorSource, dtype: torch.dtype) -> None:
    """The adapter's safetensors file: factors from memory, bias deltas computed now, full copies
    copied from the tuned model's file."""
    name = SAFETENSORS_DTYPES[dtype]
    specs: list[TensorSpec] = []
    jobs: list[tuple[str, Callable[[ShardWriter, str], None]]] = []
    for module, f in sorted(made.items()):
        for role, tensor in ((Role.LORA_A, f.a), (Role.LORA_B, f.b)):
            key = _key(module, role, "weight")
            specs.append(TensorSpec(key, name, tuple(tensor.shape)))
            jobs.append((key, lambda w, k, x=tensor: w.write(k, tensor_bytes(x))))
        if module in biases:
            b, t = biases[module]  # t None: the bias did not change, its delta is zeros
            key = _key(module, Role.LORA_B, "bias")
            specs.append(TensorSpec(key, name, tuple(b.shape)))
            jobs.append((key, lambda w, k, b=b, t=t: w.write(k, tensor_bytes(_bias_delta(source, b, t, dtype)))))
    for module, params in sorted(pairing.full_copies.items()):
        for param, t in params:
            key = _key(module, Role.FULL_COPY, param)
            specs.append(TensorSpec(key, t.dtype, tuple(t.shape)))
            if t.start >= 0:
                jobs.append((key, lambda w, k, t=t: w.copy([k], source.fd(t.file), t.start)))
            else:
                jobs.append((key, lambda w, k, t=t: w.write(k, tensor_bytes(source.read(t)))))
    writer = ShardWriter(path, specs, metadata={"format": "pt"})
    try:
        for key, job in jobs:
            job(writer, key)
        writer.close()
    finally:
        writer.abort()
