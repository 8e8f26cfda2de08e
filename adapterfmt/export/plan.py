"""Which part of an adapter goes where for one serving engine, decided from headers only.

Every LoRA module is *kept* (the engine reads it as PEFT does), *folded* (the engine reads it
with another scale: PEFT's scale is multiplied into ``lora_B``; a power-of-two factor is
bit-exact, any other is computed in float32 and stored as float32), or *baked* (the engine cannot
serve it: the whole module is merged into a serving base by the merge engine). Full copies,
trainable-token rows and saved base biases are baked unless the engine serves them; PEFT's
``base_layer`` copies of an embedding (``save_embedding_layers``) are dropped: no engine reads
them. :class:`ExportPlan` also holds the exported ``adapter_config.json`` and the
``max_lora_rank`` the engine must be started with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..checkpoint.config import MODIFIED_BASE_INITS
from ..checkpoint.records import AdapterCheckpoint, LoraModule
from ..errors import InvalidConfigError, UnknownKeyError, UnsupportedFeatureError
from .engines import ENGINES, REFUSED_FIELDS, VLLM_INITS, Engine, engine_scaling

KEEP, FOLD, BAKE = "keep", "fold", "bake"


@dataclass
class ModuleExport:
    """What happens to one LoRA module: ``action`` is keep / fold / bake.

    ``factor`` multiplies ``lora_B`` (fold); ``exact`` says whether that is bit-exact (a power
    of two) or within float32 rounding; ``pad_to`` zero-pads the rank (an exact change);
    ``reason`` says why a module is baked.
    """

    path: str
    action: str
    rank: int
    factor: float = 1.0
    exact: bool = True
    pad_to: Optional[int] = None
    reason: str = ""


@dataclass
class ModuleGroup:
    """LoRA modules that get the same treatment (same kind, rank and PEFT scale): what a plan
    decides once, whatever the adapter's size (a 100k-module MoE adapter has a handful)."""

    paths: list[str]
    action: str
    rank: int
    scaling: float
    factor: float = 1.0
    exact: bool = True
    pad_to: Optional[int] = None
    reason: str = ""


@dataclass
class ExportPlan:
    """One adapter, one engine: what is written, what must be baked, what is dropped.

    ``blockers`` lists, one short phrase each, what the engine cannot serve from the adapter
    (the parts that go into the serving base); ``dropped`` the saved keys no engine reads.
    """

    engine: Engine
    adapter: AdapterCheckpoint
    groups: list[ModuleGroup]
    config: dict[str, Any]
    rank: int
    max_lora_rank: Optional[int]
    blockers: list[str] = field(default_factory=list)
    baked_full_copies: list[str] = field(default_factory=list)
    baked_tokens: list[str] = field(default_factory=list)
    baked_base_keys: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    unservable_modules: dict[str, str] = field(default_factory=dict)

    @property
    def modules(self) -> dict[str, ModuleExport]:
        """Module path -> what happens to it, in the adapter's order (built from :attr:`groups` on first use)."""
        built = self.__dict__.get("_modules")
        if built is None:
            by_path = {p: ModuleExport(p, g.action, g.rank, g.factor, g.exact, g.pad_to, g.reason) for g in self.groups for p in g.paths}
            built = self.__dict__["_modules"] = {p: by_path[p] for p in self.adapter.lora if p in by_path}
        return built

    @property
    def kept(self) -> list[ModuleExport]:
        return [m for m in self.modules.values() if m.action in (KEEP, FOLD)]

    @property
    def folds(self) -> bool:
        """Some kept module has PEFT's scale folded into its ``lora_B``."""
        return any(g.action == FOLD for g in self.groups)

    @property
    def pads(self) -> bool:
        """Some kept module's rank is zero-padded to the adapter's rank."""
        return any(g.pad_to is not None for g in self.groups)

    @property
    def baked_modules(self) -> list[str]:
        return [m.path for m in self.modules.values() if m.action == BAKE] if any(g.action == BAKE for g in self.groups) else []

    @property
    def needs_base(self) -> bool:
        return bool(self.blockers)

    @property
    def exactness(self) -> str:
        """``bit-exact`` when every kept factor is stored as read or scaled by a power of two,
        ``float32`` when some scale was folded in float32."""
        return "bit-exact" if all(m.exact for m in self.kept) else "float32"

    def baked_checkpoint(self) -> AdapterCheckpoint:
        """The part of the adapter that goes into the serving base, as an adapter the merge engine
        takes: the same files and config, only the baked records."""
        a = self.adapter
        return replace(
            a,
            lora={p: a.lora[p] for p in self.baked_modules},
            full_copies={p: a.full_copies[p] for p in self.baked_full_copies},
            token_deltas={p: a.token_deltas[p] for p in self.baked_tokens},
            base_overrides={k: a.base_overrides[k] for k in self.baked_base_keys},
            base_override_keys={k: a.base_override_keys[k] for k in self.baked_base_keys},
            unknown_keys=[],
            findings=[],
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine.name,
            "rank": self.rank,
            "max_lora_rank": self.max_lora_rank,
            "exactness": self.exactness,
            "kept": sorted(m.path for m in self.modules.values() if m.action == KEEP),
            "folded": [
                {"module": m.path, "factor": m.factor, "exact": m.exact} for m in sorted(self.modules.values(), key=lambda m: m.path) if m.action == FOLD
            ],
            "padded": sorted(m.path for m in self.kept if m.pad_to is not None),
            "baked": {
                "modules": [{"module": m.path, "reason": m.reason} for m in sorted(self.modules.values(), key=lambda m: m.path) if m.action == BAKE],
                "full_copies": sorted(self.baked_full_copies),
                "trainable_tokens": sorted(self.baked_tokens),
                "base_tensors": sorted(self.baked_base_keys),
            },
            "dropped": sorted(self.dropped),
            "blockers": list(self.blockers),
        }


def is_power_of_two(x: float) -> bool:
    """``x`` is ±2^k: multiplying a float by it only moves the exponent (bit-exact, barring overflow)."""
    return x != 0 and math.isfinite(x) and math.frexp(abs(x))[0] == 0.5


def refused_fields(adapter: AdapterCheckpoint) -> dict[str, str]:
    """Config fields no engine serves and no serving base can carry: field -> what it is."""
    raw = adapter.config.raw
    out = {k: why for k, why in REFUSED_FIELDS.items() if raw.get(k)}
    for k, why in adapter.config.unsupported.items():
        if k != "init_lora_weights":
            out.setdefault(k, why)
    return out


def modified_base_init(adapter: AdapterCheckpoint) -> Optional[str]:
    """The ``init_lora_weights`` value when it makes the adapter relative to a modified base
    (PiSSA, OLoRA, CorDA, LoftQ); ``None`` otherwise. ``lora_ga`` only changes the base during
    training (vLLM accepts it), so it does not count."""
    init = adapter.config.init_lora_weights
    if isinstance(init, str) and init.lower() not in VLLM_INITS and init.lower().startswith(MODIFIED_BASE_INITS):
        return init
    return None


def is_embedding_copy(saved_key: str) -> bool:
    """A ``base_layer`` weight PEFT saves beside an embedding / head LoRA (``save_embedding_layers``):
    what vLLM and llama.cpp's converter skip. A saved ``base_layer.bias`` (``bias="lora_only"``) is
    a trained value, never one of these."""
    return saved_key.endswith(".base_layer.weight")


def allowed_max_rank(engine: Engine, rank: int) -> Optional[int]:
    """The smallest ``max_lora_rank`` the engine may be started with that serves ``rank``."""
    if engine.max_lora_ranks is None:
        return rank if engine.name == "sglang" else None
    fits = [r for r in engine.max_lora_ranks if r >= rank]
    return fits[0] if fits else None


def _bake_reason(engine: Engine, m: LoraModule, unservable: dict[str, str]) -> Optional[str]:
    """Why ``engine`` cannot serve module ``m`` (it goes into the serving base), or ``None``."""
    if m.factors is not None or m.peft_kron:
        return f"a {m.factors or 'LoKr'} module (no engine serves LyCORIS factors)"
    if "lora_E" in m.tensors:
        return "an AdaLoRA module (lora_E)"
    if m.use_dora:
        return "DoRA (the magnitude makes the delta full rank)"
    if m.lora_bias:
        return "lora_bias"
    if m.layer_kind not in ("linear", "embedding"):
        return f"a {m.layer_kind} LoRA"
    if m.layer_kind == "embedding" and not engine.embedding_lora:
        return "an embedding LoRA"
    if m.path in unservable:
        return unservable[m.path]
    return None


#: kind (what :func:`_bake_reason` reads), rank and PEFT scale -> (one such module, every such module's path)
ModuleKinds = dict[tuple, tuple[LoraModule, list[str]]]


def module_kinds(adapter: AdapterCheckpoint) -> ModuleKinds:
    """The adapter's LoRA modules grouped by what an export decides from: one pass over the
    modules, shared by the plans of every engine (``inspect``'s ``serving`` block plans four)."""
    out: ModuleKinds = {}
    for path, m in adapter.lora.items():
        sig = (m.factors, m.peft_kron, "lora_E" in m.tensors, m.use_dora, m.lora_bias, m.layer_kind, m.rank or m.config_rank, m.scaling)
        entry = out.get(sig)
        if entry is None:
            out[sig] = (m, [path])
        else:
            entry[1].append(path)
    return out


def _groups(engine: Engine, kinds: ModuleKinds, unservable: dict[str, str]) -> list[ModuleGroup]:
    """Each kind of module kept or baked for ``engine``; a module ``unservable`` names is baked
    with its own reason (its kind's other modules are not)."""
    groups: list[ModuleGroup] = []
    for sig, (m, paths) in kinds.items():
        rank, scaling = sig[-2], sig[-1]
        reason = _bake_reason(engine, m, {})
        if reason is not None or not unservable:
            groups.append(ModuleGroup(paths, BAKE if reason else KEEP, rank, scaling, reason=reason or ""))
            continue
        own: dict[str, list[str]] = {}
        for p in paths:
            own.setdefault(unservable.get(p, ""), []).append(p)
        groups += [ModuleGroup(ps, BAKE if why else KEEP, rank, scaling, reason=why) for why, ps in own.items()]
    return groups


def plan_export(
    adapter: AdapterCheckpoint,
    engine_name: str,
    *,
    max_lora_rank: Optional[int] = None,
    unservable: Optional[dict[str, str]] = None,
    differs_from_base: Optional[set[str]] = None,
    kinds: Optional[ModuleKinds] = None,
) -> ExportPlan:
    """Decide, from headers, how ``adapter`` is exported for ``engine_name``.

    Args:
        adapter: the adapter as read by :func:`~adapterfmt.formats.peft.reading.read_adapter`.
        engine_name: ``vllm``, ``sglang``, ``llama.cpp`` or ``portable``.
        max_lora_rank: the engine's ``--max-lora-rank``; a larger rank is refused.
        unservable: module path -> why the engine's file format cannot name it (llama.cpp:
            :func:`adapterfmt.export.gguf.unservable_modules`); those modules are baked.
        differs_from_base: where the base is at hand, the base keys whose saved ``base_layer``
            weight copy differs from the base's tensor (a resized or retrained vocabulary): baked
            instead of dropped. ``None``: not known, every such copy is dropped.
        kinds: :func:`module_kinds` of ``adapter``, where the caller plans for several engines
            (computed here otherwise).

    Raises:
        UnsupportedFeatureError: a config feature no engine serves and no serving base can carry
            (aLoRA, layer_replication, BD-LoRA, QA-LoRA, PiSSA-style inits).
        UnknownKeyError: keys the grammar does not explain (nothing would serve them).
        InvalidConfigError: a rank above ``max_lora_rank``, or a ``max_lora_rank`` the engine does not take.
    """
    engine = ENGINES[engine_name]
    where = adapter.config.path or adapter.directory
    refused = refused_fields(adapter)
    if refused:
        name, why = next(iter(refused.items()))
        raise UnsupportedFeatureError(f"is set ({why}); no serving engine serves it and no serving base can carry it", path=where, key=name)
    init = modified_base_init(adapter)
    if init is not None:
        raise UnsupportedFeatureError(
            f"is {init!r}: the adapter is relative to a base that PEFT modifies when it loads it",
            path=where,
            key="init_lora_weights",
            hint="convert it to a plain LoRA with PEFT's path_initial_model_for_weight_conversion first, then export that",
        )
    if adapter.unknown_keys:
        raise UnknownKeyError(
            f"fits no rule of the key grammar ({len(adapter.unknown_keys)} such keys); no engine would serve them",
            path=adapter.weights_file,
            key=adapter.unknown_keys[0],
        )
    if max_lora_rank is not None and engine.max_lora_ranks is not None and max_lora_rank not in engine.max_lora_ranks:
        raise InvalidConfigError(
            f"--max-lora-rank {max_lora_rank} is not one {engine.name} accepts ({', '.join(map(str, engine.max_lora_ranks))})", key="max_lora_rank"
        )
    cfg = adapter.config
    groups = _groups(engine, kinds if kinds is not None else module_kinds(adapter), dict(unservable or {}))
    blockers: list[str] = []
    baked = [g for g in groups if g.action == BAKE]
    if baked:  # named in the adapter's order, as the file lists them
        reason_of = {p: g.reason for g in baked for p in g.paths}
        ordered = [(p, reason_of[p]) for p in adapter.lora if p in reason_of]
        for kind, names in (
            ("DoRA", [p for p, r in ordered if r.startswith("DoRA")]),
            ("lora_bias", [p for p, r in ordered if r == "lora_bias"]),
        ):
            if names:
                blockers.append(f"{kind} modules ({_few(names)})")
        other = [(p, r) for p, r in ordered if not r.startswith("DoRA") and r != "lora_bias"]
        if other:
            blockers.append(f"modules it cannot take ({_few([p for p, _ in other])}: {other[0][1]})")

    full = [p for p in adapter.full_copies if p.rsplit(".", 1)[-1] not in engine.full_copies_served]
    if full:
        blockers.append(f"full copies of modules_to_save ({_few(full)})")
    tokens = list(adapter.token_deltas)
    if tokens:
        blockers.append(f"trainable-token rows ({_few(tokens)})")
    baked_base: list[str] = []
    dropped: list[str] = []
    for key in adapter.base_overrides:
        saved = adapter.base_override_keys[key]
        if is_embedding_copy(saved) and (differs_from_base is None or key not in differs_from_base):
            dropped.append(saved)
        else:
            baked_base.append(key)
    if baked_base:
        blockers.append(f"saved base tensors ({_few(baked_base)}: bias={cfg.bias!r} or a resized embedding)")

    kept = [g for g in groups if g.action == KEEP]
    rank = max((g.rank for g in kept), default=cfg.r)
    config = _exported_config(adapter, engine, kept, rank)
    if kept and baked:  # name only what the adapter still holds (PEFT builds no empty layers)
        config["target_modules"] = sorted({p.rsplit(".", 1)[-1] for g in kept for p in g.paths})
    r_out, alpha_out = config["r"], float(config["lora_alpha"])
    for g in kept:
        if engine.scale != "peft":
            target = engine_scaling(engine, r=r_out, alpha=alpha_out, tensor_rank=g.rank)
            factor = g.scaling / target if target else 0.0
            if factor != 1.0:
                g.action, g.factor, g.exact = FOLD, factor, is_power_of_two(factor)
        if engine.uniform_rank and g.rank != rank:
            g.pad_to = rank
    top = max([rank, *[int(v) for v in (config.get("rank_pattern") or {}).values()]])
    if max_lora_rank is not None and top > max_lora_rank:
        raise InvalidConfigError(
            f"rank {top} is above --max-lora-rank {max_lora_rank}; {engine.name} would refuse the adapter",
            path=where,
            key="r",
            hint=f"start the engine with --max-lora-rank {allowed_max_rank(engine, top) or top}",
        )
    needed = allowed_max_rank(engine, top)
    if engine.max_lora_ranks is not None and needed is None:
        raise InvalidConfigError(f"rank {top} is above every max_lora_rank {engine.name} accepts (at most {engine.max_lora_ranks[-1]})", path=where, key="r")
    return ExportPlan(
        engine=engine,
        adapter=adapter,
        groups=groups,
        config=config,
        rank=rank,
        max_lora_rank=max_lora_rank if max_lora_rank is not None else needed,
        blockers=blockers,
        baked_full_copies=full,
        baked_tokens=tokens,
        baked_base_keys=baked_base,
        dropped=dropped,
        unservable_modules=unservable,
    )


def _few(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _exported_config(adapter: AdapterCheckpoint, engine: Engine, kept: list[ModuleGroup], rank: int) -> dict[str, Any]:
    """The exported ``adapter_config.json``: the fields the engine reads, nothing it would refuse
    or silently drop. ``peft`` engines keep PEFT's scale rule; the others get ``r`` and
    ``lora_alpha`` chosen so that most modules need no folding (``portable``: ``lora_alpha = r``)."""
    cfg = adapter.config
    raw = dict(cfg.raw)
    doc: dict[str, Any] = {k: raw[k] for k in engine.config_fields if k in raw}
    doc["peft_type"] = "LORA"
    doc["bias"] = "none"
    doc["modules_to_save"] = [p for p in (cfg.modules_to_save or []) if p.rsplit(".", 1)[-1] in engine.full_copies_served] or None
    doc["use_dora"] = False
    doc["lora_bias"] = False
    doc["init_lora_weights"] = True
    doc.setdefault("target_modules", cfg.target_modules)
    if engine.scale == "peft":
        doc["r"] = cfg.r
        doc["lora_alpha"] = cfg.lora_alpha
        return doc
    doc.pop("use_rslora", None)
    doc.pop("rank_pattern", None)
    doc.pop("alpha_pattern", None)
    doc["use_rslora"] = False
    if engine.scale == "one":
        doc["r"], doc["lora_alpha"] = rank, rank
    elif engine.scale == "alpha_over_r":
        doc["r"] = rank
        doc["lora_alpha"] = _fewest_folds(adapter, kept, rank)
    else:  # alpha_over_tensor_rank: llama.cpp reads lora_alpha once and each lora_b's rank
        doc["r"] = cfg.r
        doc["lora_alpha"] = cfg.lora_alpha
    return doc


def _fewest_folds(adapter: AdapterCheckpoint, kept: list[ModuleGroup], rank: int) -> float:
    """The ``lora_alpha`` for an engine that scales every module by ``lora_alpha / r`` (``r`` =
    ``rank``) under which the most modules keep their factors unchanged: each module's own PEFT
    scale times ``rank`` is a candidate; ties go to the adapter's own ``lora_alpha``."""
    own = float(adapter.config.lora_alpha)
    counts: dict[float, int] = {}
    for g in kept:  # in the order of each group's first module: ties go to the first in the file
        alpha = g.scaling * rank
        counts[alpha] = counts.get(alpha, 0) + len(g.paths)
    if not counts:
        return own
    best = max(counts.values())
    if counts.get(own, 0) == best:
        return own
    chosen = next(a for a, n in counts.items() if n == best)
    return int(chosen) if float(chosen).is_integer() else chosen
