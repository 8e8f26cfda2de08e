"""``adapter_config.json``: read, validate and resolve per-module rank, alpha and scaling.

Fields and defaults are PEFT's ``LoraConfig`` (docs/FORMAT.md §4). Unknown keys are kept in
``raw`` and reported, never fatal, because newer PEFT versions add fields.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ..errors import InvalidConfigError
from .config_types import check_field_types
from .matching import PatternKeyIndex
from .patterns import FULL, LAYERS, MODULES_TO_SAVE, bounded

TargetSpec = Union[list[str], str, None]

#: LoRA config fields whose value changes the math or the tensor layout in ways adapterfmt does
#: not implement. Present and truthy -> merge/load refuse, inspect warns.
UNSUPPORTED_FIELDS: dict[str, str] = {
    "layer_replication": "layers are duplicated before LoRA is applied",
    "alora_invocation_tokens": "Activated LoRA cannot be merged",
    "use_qalora": "QA-LoRA pools inputs before lora_A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "velora_config": "VeLoRA changes the forward pass",
    "kasa_config": "KaSA adds lora_diag tensors",
    "monteclora_config": "MonteCLoRA samples its factors",
    "arrow_config": "Arrow routes between adapters",
}

#: ``init_lora_weights`` values whose adapters are relative to a modified base (FORMAT.md §4.4).
MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraConfig:
    """The fields of ``adapter_config.json`` that decide shapes, scaling and matching."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Union[int, list[int], None] = None
    layers_pattern: Union[str, list[str], None] = None
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    fan_in_fan_out: bool = False
    target_parameters: Optional[list[str]] = None
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None
    init_lora_weights: Union[bool, str] = True
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    peft_version: Optional[str] = None
    raw: Mapping[str, Any] = field(default_factory=dict)
    path: Optional[str] = None
    #: built on first use: field name -> :class:`PatternKeyIndex` (not part of the value)
    _indexes: dict = field(default_factory=dict, repr=False, compare=False)

    def pattern_index(self, name: str) -> PatternKeyIndex:
        """The index of ``rank_pattern`` or ``alpha_pattern`` keys, built once."""
        index = self._indexes.get(name)
        if index is None:
            index = self._indexes[name] = PatternKeyIndex(list(getattr(self, name)), name, self.path)
        return index

    # -- per-module values, resolved as PEFT resolves them (LoraModel._create_and_replace) --

    def rank_for(self, module: str) -> int:
        """``r`` for ``module``: first ``rank_pattern`` key (dict order) matching, else ``r``."""
        key = self.pattern_index("rank_pattern").first(module) if self.rank_pattern else None
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """``lora_alpha`` for ``module``, looked up in ``alpha_pattern`` independently of the rank."""
        key = self.pattern_index("alpha_pattern").first(module) if self.alpha_pattern else None
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module: str, rank: Optional[int] = None) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). ``rank`` overrides the config rank
        (pass the rank read from the tensors: it is what the layer was built with)."""
        r = self.rank_for(module) if rank is None else rank
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def unsupported(self) -> dict[str, str]:
        """Fields set in this config that adapterfmt cannot merge or load, with the reason."""
        out = {k: why for k, why in UNSUPPORTED_FIELDS.items() if self.raw.get(k)}
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(MODIFIED_BASE_INITS):
            out["init_lora_weights"] = f"{init!r} adapters are relative to a modified base"
        return out


def pattern_key(patterns: Mapping[str, Any], module: str) -> Optional[str]:
    """The first key ``k`` of ``patterns`` (in order) with ``re.match(r"(.*\\.)?(k)$", module)``.

    This is PEFT's ``get_pattern_key``: ``k`` matches at the end of the name after an optional
    dotted prefix; a leading ``^`` anchors it to the whole name.
    """
    return PatternKeyIndex(list(patterns)).first(module) if patterns else None


def overlapping_pattern_keys(patterns: Mapping[str, Any], modules: list[str]) -> list[tuple[str, str, str]]:
    """``(module, first_key, other_key)`` where two pattern keys both match a module with different values.

    PEFT writes patterns with ``sort_keys=True``, so the order at training time is lost; an
    overlap can silently change r or alpha on reload (FORMAT.md §4.2).
    """
    out = []
    if not patterns:
        return out
    index = PatternKeyIndex(list(patterns))
    for m in modules:
        hits = index.matching(m)
        for other in hits[1:]:
            if patterns[other] != patterns[hits[0]]:
                out.append((m, hits[0], other))
    return out


def _as_target_spec(value: Any, name: str, path: Optional[str]) -> TargetSpec:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value.lower() != "all-linear":
            _compile(value, name, path)
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidConfigError(f"must be a string, a list of strings or null, got {value!r}", path=path, key=name)


def _compile(pattern: str, name: str, path: Optional[str], template: str = FULL) -> None:
    """Vet and compile an untrusted pattern once (invalid or unbounded: one line naming it)."""
    bounded(pattern, template, name, path)


def _is_finite_number(value: Any, kind: type) -> bool:
    """A JSON number usable as ``kind``: not a bool, not NaN/Infinity (Python's json accepts
    both), not too large for a float, and whole when ``kind`` is int."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        as_float = float(value)
    except OverflowError:
        return False
    return math.isfinite(as_float) and (kind is not int or as_float.is_integer())


def modules_to_save_entries(doc: Mapping[str, Any], path: Optional[str] = None) -> Optional[list[str]]:
    """The config's ``modules_to_save`` entries, vetted (``None`` when unset or empty).

    Every PEFT config type that saves full copies (LoRA, AdaLoRA, LoHa, LoKr) spells the field
    the same way, so every reader takes it from here.

    Raises:
        InvalidConfigError: not a list of non-empty strings, or an entry that cannot be matched.
    """
    entries = doc.get("modules_to_save")
    if entries is not None and not (isinstance(entries, list) and all(isinstance(m, str) and m for m in entries)):
        raise InvalidConfigError(f"must be a list of module names, got {entries!r}", path=path, key="modules_to_save")
    for entry in entries or ():
        _compile(entry, "modules_to_save", path, MODULES_TO_SAVE)
    return list(entries) if entries else None


def parse_config(doc: Any, *, path: Optional[str] = None) -> LoraConfig:
    """Validate a decoded ``adapter_config.json`` and return a :class:`LoraConfig`.

    Raises:
        InvalidConfigError: not an object, missing or non-LoRA ``peft_type``, ``r <= 0``,
            negative or non-numeric alpha, bad regex in target/exclude/pattern keys, wrong types.
    """
    if not isinstance(doc, dict):
        raise InvalidConfigError("is not a JSON object", path=path)
    peft_type = doc.get("peft_type")
    if peft_type is None:
        raise InvalidConfigError("has no 'peft_type'", path=path, key="peft_type", hint="add \"peft_type\": \"LORA\"")
    adalora = str(peft_type).upper() == "ADALORA"
    if str(peft_type).upper() != "LORA" and not adalora:
        raise InvalidConfigError(
            f"peft_type is {peft_type!r}; adapterfmt handles LoRA adapters only (and AdaLoRA)", path=path, key="peft_type"
        )
    check_field_types(doc, path=path)

    def num(name: str, default: Any, kind: type, minimum: float, strict: bool) -> Any:
        v = doc.get(name, default)
        if not _is_finite_number(v, kind):
            raise InvalidConfigError(f"must be a finite {'integer' if kind is int else 'number'}, got {v!r}", path=path, key=name)
        if (v <= minimum) if strict else (v < minimum):
            raise InvalidConfigError(f"must be {'>' if strict else '>='} {minimum}, got {v!r}", path=path, key=name)
        return kind(v)

    r = num("init_r", 12, int, 0, True) if adalora else num("r", 8, int, 0, True)
    alpha = num("lora_alpha", 8, float, 0, False)

    patterns: dict[str, dict[str, Any]] = {"rank_pattern": {}}
    for name, kind, strict in (("rank_pattern", int, True), ("alpha_pattern", float, False)):
        if adalora and name == "rank_pattern":
            continue  # AdaLoRA's rank_pattern holds budget masks; the tensors are saved pruned (adalora.py)
        value = doc.get(name) or {}
        if not isinstance(value, dict):
            raise InvalidConfigError(f"must be an object, got {value!r}", path=path, key=name)
        for k, v in value.items():
            if not _is_finite_number(v, kind) or (v <= 0 if strict else v < 0):
                raise InvalidConfigError(f"has an invalid value {v!r}", path=path, key=f"{name}.{k}")
        patterns[name] = {k: kind(v) for k, v in value.items()}

    modules_to_save = modules_to_save_entries(doc, path)
    layers_pattern = doc.get("layers_pattern")
    if isinstance(layers_pattern, tuple):
        layers_pattern = list(layers_pattern)
    for p in [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or []):
        _compile(p, "layers_pattern", path, LAYERS)
    layers_to_transform = doc.get("layers_to_transform")
    if isinstance(layers_to_transform, tuple):
        layers_to_transform = list(layers_to_transform)
    bias = doc.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise InvalidConfigError(f"must be 'none', 'all' or 'lora_only', got {bias!r}", path=path, key="bias")

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(doc.get("use_rslora", False)),
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        target_modules=_as_target_spec(doc.get("target_modules"), "target_modules", path),
        exclude_modules=_as_target_spec(doc.get("exclude_modules"), "exclude_modules", path),
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        use_dora=bool(doc.get("use_dora", False)),
        lora_bias=bool(doc.get("lora_bias", False)),
        bias=bias,
        fan_in_fan_out=bool(doc.get("fan_in_fan_out", False)),
        target_parameters=doc.get("target_parameters") or None,
        trainable_token_indices=doc.get("trainable_token_indices"),
        init_lora_weights=doc.get("init_lora_weights", True),
        task_type=doc.get("task_type"),
        base_model_name_or_path=doc.get("base_model_name_or_path"),
        peft_version=doc.get("peft_version"),
        raw=dict(doc),
        path=path,
    )
    for name in ("rank_pattern", "alpha_pattern"):
        cfg.pattern_index(name)  # vets every regex key now: a refused key is one line at read time
    return cfg


def read_config(path: "str | os.PathLike[str]") -> LoraConfig:
    """Read and validate an ``adapter_config.json`` file."""
    from ..errors import CheckpointNotFoundError

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            # check the size first: read(n) allocates n bytes up front, whatever the file holds
            if os.fstat(f.fileno()).st_size > 10_000_000:
                raise InvalidConfigError("is larger than 10 MB; not an adapter config", path=path)
            data = f.read()
    except FileNotFoundError:
        raise CheckpointNotFoundError("no such file", path=path, hint="an adapter directory needs adapter_config.json") from None
    except OSError as e:
        raise InvalidConfigError(f"cannot be read ({e.strerror or type(e).__name__})", path=path) from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidConfigError(f"is not valid JSON ({type(e).__name__})", path=path, hint="fix or re-export the file") from None
    return parse_config(doc, path=path)
