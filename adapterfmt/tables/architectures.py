"""What an architecture says about its tensors: on-disk names, tied and shared weights.

PEFT adapters name modules as they are **in memory** (transformers 5 renames and fuses checkpoint
tensors while loading), while a base model on disk keeps the **checkpoint** names:
ViT ``vit.layers.0.attention.q_proj`` is ``vit.encoder.layer.0.attention.attention.query`` on
disk, GPT-NeoX ``lm_head`` is ``embed_out``, Mixtral ``mlp.experts.gate_up_proj`` is the
per-expert ``block_sparse_moe.experts.N.w1/w3``. :class:`Architecture` maps in-memory keys to
on-disk keys with transformers' own conversion rules, and lists the tied weights the model class
declares (``_tied_weights_keys``, active when the config's ``tie_word_embeddings`` is true).

Every fact comes from ``adapterfmt/tables/arch_tables.json``, generated from the pinned transformers by
``scripts/gen_architecture_tables.py``; transformers itself is never imported. The reverse
(memory -> disk) rules are built exactly as transformers' ``revert_weight_conversion`` builds them
for ``save_pretrained``: each rule reversed, converters first, then every renaming in turn.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Iterator, Optional

#: Conversion rule kinds the reverse mapping understands (others, e.g. a PrefixChange, are skipped
#: as transformers skips them when saving a model it did not load).
_RENAMING_KINDS = ("WeightRenaming",)
_CONVERTER_KINDS = ("WeightConverter",)


@dataclass(frozen=True)
class Fused:
    """An in-memory tensor that is several tensors on disk (a ``WeightConverter``).

    ``parts[j]`` is the on-disk key pattern of the j-th concatenated piece, with ``*`` standing
    for the expert index when ``stacked`` (``MergeModulelist``: the in-memory tensor stacks the
    experts along dim 0). ``concat_dim`` is the in-memory dimension the pieces are concatenated
    along (``Concatenate``), or None for a single piece.
    """

    memory_key: str
    parts: tuple[str, ...]
    stacked: bool
    concat_dim: Optional[int]
    operations: tuple[tuple, ...]

    @property
    def supported(self) -> bool:
        """Only stacking experts and concatenating pieces are understood (the MoE layouts)."""
        names = [op[0] for op in self.operations]
        return names in (["MergeModulelist"], ["MergeModulelist", "Concatenate"], ["Concatenate"])


class _Rule:
    """One transformers rule compiled as ``WeightTransform`` compiles it: ``matched`` patterns are
    searched for, the first ``written`` pattern replaces the match. For saving (in-memory ->
    on-disk, as ``revert_weight_conversion``) the rule is reversed: ``written`` are the original
    sources; for loading, the original targets."""

    def __init__(self, kind: str, written: tuple[str, ...], matched: tuple[str, ...], operations: tuple, scope: Optional[str], base_prefix: str) -> None:
        self.kind = kind
        self.operations = operations
        self.scope = scope
        self.base_prefix = base_prefix
        written, matched = list(written), list(matched)
        self.targets: list[str] = []
        groups: list[str] = []
        for pattern in written:  # made literal (process_target_pattern)
            processed, group = _process_target_pattern(pattern)
            self.targets.append(processed)
            if group is not None:
                groups.append(group)
        group = groups[0] if groups else None
        self.sources: list[str] = []
        for i, pattern in enumerate(matched):  # process_source_pattern: anchored where the written side is
            if r"\1" in pattern and group is not None:
                pattern = pattern.replace(r"\1", group, 1)
            if len(matched) == len(written) and written[i].startswith("^") and not pattern.startswith("^"):
                pattern = "^" + pattern
            self.sources.append(pattern)
        branches = []
        for i, source in sorted(enumerate(self.sources), key=lambda item: -len(item[1])):
            pattern = source.replace("*.", r".*\.")
            if re.search(r"[a-zA-Z0-9]$", pattern):
                pattern += r"(?!\w)"
            branches.append(f"(?P<g{i}>{pattern})")
        self.compiled = re.compile("|".join(branches))

    def rename(self, key: str) -> tuple[str, bool]:
        """``(renamed key, matched)``, as ``WeightTransform.rename_source_key``."""
        prefix = None
        to_match = key
        if self.scope is not None:
            scope = f"{self.scope}." if self.scope else ""
            base = f"{self.base_prefix}." if self.base_prefix else ""
            if key.startswith(base + scope):
                prefix = base + scope
            elif key.startswith(scope):
                prefix = scope
            else:
                return key, False
            to_match = key[len(prefix) :]
        m = self.compiled.search(to_match)
        if m is None:
            return key, False
        group = next(name for name, val in m.groupdict().items() if val is not None)
        replacement = self.targets[0]
        if r"\1" in replacement:
            replacement = replacement.replace(r"\1", m.group(self.compiled.groupindex[group] + 1))
        renamed = to_match.replace(m.group(0), replacement, 1)
        return (prefix + renamed if prefix is not None else renamed), True


def _process_target_pattern(pattern: str) -> tuple[str, Optional[str]]:
    """transformers' ``process_target_pattern``: a pattern written to, made literal."""
    pattern = pattern[1:] if pattern.startswith("^") else pattern
    pattern = re.sub(r"\(\?.+?\)?\)", "", pattern)
    m = re.search(r"\(.+?\)", pattern)
    group = None
    if m:
        group = m.group(0)
        pattern = pattern.replace(group, r"\1", 1)
    return pattern.replace(r"\.", "."), group


@dataclass
class Architecture:
    """The facts of one model class (``config.json``'s ``architectures[0]`` and ``model_type``)."""

    class_name: str
    model_type: str
    tie_word_embeddings: bool
    #: in-memory tied parameter -> in-memory parameter it shares (active only when tying).
    tied_params: dict[str, str] = field(default_factory=dict)
    renamings: list[_Rule] = field(default_factory=list)
    converters: list[_Rule] = field(default_factory=list)
    #: the rules in transformers' loading direction (on-disk -> in-memory), in order
    load_renamings: list[_Rule] = field(default_factory=list)
    load_converters: list[_Rule] = field(default_factory=list)
    tie_flag_reinterpreted: bool = False

    @property
    def has_conversions(self) -> bool:
        return bool(self.renamings or self.converters)

    def to_checkpoint(self, memory_key: str) -> str:
        """The on-disk key of an in-memory key that is renamed only (converters not applied)."""
        key = memory_key
        for rule in self.renamings:
            key, _ = rule.rename(key)
        return key

    def to_memory(self, disk_key: str) -> Optional[str]:
        """The in-memory key of an on-disk key, as transformers loads it; None when a converter
        fuses it into another tensor (a per-expert piece)."""
        key = disk_key
        for rule in self.load_renamings:
            key, _ = rule.rename(key)
        for rule in self.load_converters:
            if rule.rename(key)[1]:
                return None
        return key

    def fused(self, memory_key: str) -> Optional[Fused]:
        """How ``memory_key`` is split into on-disk tensors, when a converter produces it."""
        for rule in self.converters:
            renamed, matched = rule.rename(memory_key)
            if not matched:
                continue
            ops = rule.operations
            stacked = any(op[0] == "MergeModulelist" for op in ops)
            concat = next((dict(op[1:]).get("dim") for op in ops if op[0] == "Concatenate"), None)
            # renamed holds the first piece; build every piece the same way, then the renamings.
            first = rule.targets[0]
            parts = []
            for target in rule.targets:
                part = renamed.replace(first, target, 1) if first in renamed else renamed
                parts.append(self.to_checkpoint(part))
            return Fused(memory_key, tuple(parts), stacked, concat, ops)
        return None


def _memory_module(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


@lru_cache(maxsize=1)
def tables() -> dict[str, Any]:
    """The generated tables (``arch_tables.json`` beside this module), read once."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "arch_tables.json"), encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=64)
def _architecture(class_name: str, model_type: str, tie: Optional[bool]) -> Optional[Architecture]:
    t = tables()
    entry = t["classes"].get(class_name)
    if entry is None and not model_type:
        return None
    model_type = model_type or entry["model_type"]
    tie_flag = tie if tie is not None else t["tie_word_embeddings"].get(model_type, True)
    arch = Architecture(
        class_name,
        model_type,
        tie_flag,
        dict(entry["tied"]) if entry else {},
        tie_flag_reinterpreted=model_type in t["tie_flag_reinterpreted"],
    )
    # transformers' get_expanded_tied_weights_keys(all_submodels=True): the base model's own ties too.
    base_entry = t["classes"].get(entry["base_class"]) if entry and entry["base_class"] != class_name else None
    if base_entry and entry["base_model_prefix"]:
        prefix = entry["base_model_prefix"]
        for target, source in base_entry["tied"].items():
            arch.tied_params.setdefault(f"{prefix}.{target}", f"{prefix}.{source}")
    # transformers' get_model_conversion_mapping: the root class (by class name, else model_type),
    # then the base model at base_model_prefix (scope ""), skipping what an ancestor already claimed.
    transforms: list[tuple[tuple, Optional[str], str]] = []
    seen: set[str] = set()
    conversions = t["conversions"]
    root = conversions.get(class_name)
    if root is not None:
        seen.add(class_name)
    elif model_type in conversions:
        root = conversions[model_type]
        seen.update((class_name, model_type))
    for rule in root or []:
        transforms.append((rule, None, ""))
    if entry and entry["base_class"] and entry["base_class"] != class_name and entry["base_class"] not in seen:
        base_cls, prefix = entry["base_class"], entry["base_model_prefix"]
        sub = conversions.get(base_cls)
        if sub is None and model_type not in seen:
            sub = conversions.get(model_type)
        for rule in sub or []:
            transforms.append((rule, "", prefix))
    for (kind, sources, targets, ops), scope, prefix in reversed(transforms):
        if kind in _RENAMING_KINDS:
            arch.renamings.append(_Rule(kind, sources, targets, ops, scope, prefix))
        elif kind in _CONVERTER_KINDS:
            arch.converters.append(_Rule(kind, sources, targets, ops, scope, prefix))
    for (kind, sources, targets, ops), scope, prefix in transforms:  # loading: match the disk side
        if kind in _RENAMING_KINDS:
            arch.load_renamings.append(_Rule(kind, targets, sources, ops, scope, prefix))
        elif kind in _CONVERTER_KINDS:
            arch.load_converters.append(_Rule(kind, targets, sources, ops, scope, prefix))
    return arch


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def architecture_of(config: dict[str, Any]) -> Optional[Architecture]:
    """The :class:`Architecture` a ``config.json`` names, or None for a model transformers does not know."""
    archs = config.get("architectures") or []
    class_name = str(archs[0]) if archs else ""
    model_type = config.get("model_type") if isinstance(config.get("model_type"), str) else ""
    tie = config.get("tie_word_embeddings", _text_config(config).get("tie_word_embeddings"))
    if not class_name and not model_type:
        return None
    try:
        return _architecture(class_name, model_type, tie if isinstance(tie, bool) else None)
    except (re.error, KeyError, IndexError):  # a rule this reader cannot compile: no facts rather than wrong ones
        return None


def _declared_weight_ties(config: dict[str, Any], tensor_keys: Iterable[str]) -> Iterator[tuple[str, str, bool, bool]]:
    """``(target key, source key, target stored, source stored)`` on disk for every weight tie the
    model class declares, when ``tie_word_embeddings`` is true (the config's value, else the config
    class's default)."""
    arch = architecture_of(config)
    if arch is None or not arch.tie_word_embeddings:
        return
    keys = set(tensor_keys)
    for target, source in arch.tied_params.items():
        if target.endswith(".weight") and source.endswith(".weight"):
            t_key, s_key = _on_disk(arch, target, keys), _on_disk(arch, source, keys)
            yield t_key, s_key, t_key in keys, s_key in keys


def tied_modules(config: dict[str, Any], tensor_keys: Iterable[str]) -> dict[str, str]:
    """On-disk module -> on-disk module whose weight it uses, for every tie with one side stored.

    From the model class's ``_tied_weights_keys`` when ``tie_word_embeddings`` is true. A pair whose
    two tensors are both stored is not tied (transformers loads them apart when they differ); a pair
    with neither stored is not reported.
    """
    return {
        _memory_module(t_key): _memory_module(s_key)
        for t_key, s_key, t_stored, s_stored in _declared_weight_ties(config, tensor_keys)
        if s_stored and not t_stored
    }


def stored_ties(config: dict[str, Any], tensor_keys: Iterable[str]) -> dict[str, str]:
    """Declared ties (as :func:`tied_modules`) whose two tensors are both stored: transformers ties
    them in memory when their values are equal, so whether they are one tensor depends on the bytes."""
    return {
        _memory_module(t_key): _memory_module(s_key)
        for t_key, s_key, t_stored, s_stored in _declared_weight_ties(config, tensor_keys)
        if t_stored and s_stored
    }


def _on_disk(arch: Architecture, memory_key: str, keys: set[str]) -> str:
    """``memory_key`` as stored: itself when the checkpoint already uses it, else the converted name."""
    if memory_key in keys:
        return memory_key
    return arch.to_checkpoint(memory_key)


def checkpoint_key(config: dict[str, Any], memory_key: str, keys: "set[str] | dict[str, Any]") -> str:
    """The on-disk key of an in-memory (PEFT) key: itself when stored, else through the conversion rules."""
    if memory_key in keys:
        return memory_key
    arch = architecture_of(config)
    if arch is None:
        return memory_key
    return arch.to_checkpoint(memory_key)


def memory_modules(config: dict[str, Any], modules: Iterable[str]) -> dict[str, Optional[str]]:
    """On-disk module path -> the module path PEFT sees in memory (through its ``weight``), None
    for a per-expert piece that transformers fuses; only modules the rules rename are listed."""
    arch = architecture_of(config)
    if arch is None or not (arch.load_renamings or arch.load_converters):
        return {}
    out: dict[str, Optional[str]] = {}
    for module in modules:
        memory = arch.to_memory(f"{module}.weight")
        if memory is None:
            out[module] = None
        elif memory != f"{module}.weight" and memory.endswith(".weight"):
            out[module] = memory[: -len(".weight")]
    return out


def fused_tensor(config: dict[str, Any], memory_key: str) -> Optional[Fused]:
    """How an in-memory fused tensor (MoE experts) is stored, or None."""
    arch = architecture_of(config)
    return arch.fused(memory_key) if arch is not None else None


def untie_flag_allowed(config: dict[str, Any]) -> bool:
    """False for configs that read ``tie_word_embeddings`` as something else (T5's output scaling)."""
    arch = architecture_of(config)
    return arch is None or not arch.tie_flag_reinterpreted


__all__ = [
    "Architecture",
    "Fused",
    "architecture_of",
    "checkpoint_key",
    "fused_tensor",
    "memory_modules",
    "stored_ties",
    "tied_modules",
    "untie_flag_allowed",
]
