"""The JSON type of every ``adapter_config.json`` field adapterfmt reads, checked before any use.

Why: Python truthiness reads ``"fan_in_fan_out": "false"`` as true, and ``"layers_pattern": 3``
crashes deep inside matching. Every field adapterfmt reads is checked here against the type
PEFT's ``LoraConfig`` declares (``peft/tuners/lora/config.py``, ``peft/config.py``), so a wrong
type is one line naming the field and the file. Fields not listed here are kept and ignored, as
PEFT ignores fields it does not know (docs/FORMAT.md §4.1).

``null`` is accepted wherever PEFT's default is ``None`` or ``False`` (PEFT reads ``null`` there
as "not set"); a JSON ``true``/``false`` is never accepted where a number is declared.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

from ..errors import InvalidConfigError

#: A checker returns ``None`` when the value has the declared type, else what was expected.
Checker = Callable[[Any], Optional[str]]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int too large for a float
        return False


def _is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _checker(expected: str, ok: Callable[[Any], bool], *, nullable: bool = True) -> Checker:
    def check(v: Any) -> Optional[str]:
        if v is None and nullable:
            return None
        return None if ok(v) else expected

    return check


_BOOL = _checker("a JSON boolean (true or false)", lambda v: isinstance(v, bool))
_STR = _checker("a string", lambda v: isinstance(v, str))
_STR_OR_STRS = _checker(
    "a string, a list of strings or null", lambda v: isinstance(v, str) or (_is_list(v) and all(isinstance(s, str) for s in v))
)
_STRS = _checker("a list of strings or null", lambda v: _is_list(v) and all(isinstance(s, str) for s in v))
_INTS = _checker("a list of integers or null", lambda v: _is_list(v) and all(_is_int(i) for i in v))
_INT_OR_INTS = _checker("an integer, a list of integers or null", lambda v: _is_int(v) or (_is_list(v) and all(_is_int(i) for i in v)))
_OBJECT = _checker("a JSON object or null", lambda v: isinstance(v, dict))
_OBJECT_OR_FALSE = _checker("a JSON object, false or null", lambda v: isinstance(v, dict) or v is False)
_PAIRS = _checker(
    "a list of [start, end] integer pairs or null",
    lambda v: _is_list(v) and all(_is_list(p) and len(p) == 2 and all(_is_int(i) for i in p) for p in v),
)
_TOKEN_INDICES = _checker(
    "a list of integers, an object of module name -> list of integers, or null",
    lambda v: (_is_list(v) and all(_is_int(i) for i in v))
    or (isinstance(v, dict) and all(isinstance(k, str) and _is_list(i) and all(_is_int(x) for x in i) for k, i in v.items())),
)
_INIT = _checker("true, false or a string", lambda v: isinstance(v, (bool, str)), nullable=False)
_NUMBER = _checker("a finite number", _is_number)
_INT = _checker("an integer", _is_int, nullable=False)
_PATTERN_MAP = _checker("an object of pattern -> number, or null", lambda v: isinstance(v, dict))
#: pattern map -> (value check, what a value must be); each entry is named ``field.pattern``.
_PATTERN_VALUES: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "rank_pattern": (_is_int, "an integer"),
    "alpha_pattern": (_is_number, "a finite number"),
}

#: field -> checker, for every field adapterfmt reads (PEFT's declared type in the comment).
FIELD_TYPES: Mapping[str, Checker] = {
    "peft_type": _STR,  # Optional[Union[str, PeftType]]
    "task_type": _STR,  # Optional[Union[str, TaskType]]
    "base_model_name_or_path": _STR,  # Optional[str]
    "peft_version": _STR,  # Optional[str]
    "r": _INT,  # int
    "lora_alpha": _checker("a finite number", _is_number, nullable=False),  # int (floats work in PEFT)
    "lora_dropout": _NUMBER,  # float
    "use_rslora": _BOOL,  # bool
    "use_dora": _BOOL,  # bool
    "lora_bias": _BOOL,  # bool
    "fan_in_fan_out": _BOOL,  # bool
    "use_qalora": _BOOL,  # bool
    "rank_pattern": _PATTERN_MAP,  # Optional[dict] (str -> int)
    "alpha_pattern": _PATTERN_MAP,  # Optional[dict] (str -> number)
    "target_modules": _STR_OR_STRS,  # Optional[Union[list[str], str]]
    "exclude_modules": _STR_OR_STRS,  # Optional[Union[list[str], str]]
    "modules_to_save": _STRS,  # Optional[list[str]]
    "layers_to_transform": _INT_OR_INTS,  # Optional[Union[list[int], int]]
    "layers_pattern": _STR_OR_STRS,  # Optional[Union[list[str], str]]
    "bias": _checker("'none', 'all' or 'lora_only'", lambda v: v in ("none", "all", "lora_only"), nullable=False),
    "target_parameters": _STRS,  # Optional[list[str]]
    "trainable_token_indices": _TOKEN_INDICES,  # Optional[Union[list[int], dict[str, list[int]]]]
    "init_lora_weights": _INIT,  # bool | Literal[...]
    "layer_replication": _PAIRS,  # Optional[list[tuple[int, int]]]
    "alora_invocation_tokens": _INTS,  # Optional[list[int]]
    "use_bdlora": _OBJECT_OR_FALSE,  # Optional[BdLoraConfig]
    "velora_config": _OBJECT,  # Optional[Union[VeloraConfig, dict]]
    "kasa_config": _OBJECT,  # Optional[KasaConfig]
    "monteclora_config": _OBJECT,  # Optional[MontecloraConfig]
    "arrow_config": _OBJECT,  # Optional[ArrowConfig]
}


#: The same for PEFT's LoHa / LoKr configs (``peft/tuners/lycoris_utils.py``, ``loha/config.py``,
#: ``lokr/config.py``): every field adapterfmt reads or carries through a conversion.
LYCORIS_FIELD_TYPES: Mapping[str, Checker] = {
    **{k: FIELD_TYPES[k] for k in (
        "peft_type", "task_type", "base_model_name_or_path", "peft_version", "r", "rank_pattern", "alpha_pattern", "target_modules",
        "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
    )},
    "alpha": _checker("a finite number", _is_number, nullable=False),  # float
    "rank_dropout": _NUMBER,  # float
    "module_dropout": _NUMBER,  # float
    "use_effective_conv2d": _BOOL,  # bool
    "decompose_both": _BOOL,  # bool (LoKr)
    "decompose_factor": _INT,  # int (LoKr)
    "rank_dropout_scale": _BOOL,  # bool (LoKr)
    "init_weights": _INIT,  # Union[bool, Literal["lycoris"]]
}


def check_field_types(doc: Mapping[str, Any], *, path: Optional[str] = None, fields: Mapping[str, Checker] = FIELD_TYPES) -> None:
    """Raise :class:`InvalidConfigError` naming the first field whose JSON type is not PEFT's.

    Only fields present in ``doc`` are checked (a missing field takes PEFT's default); fields
    adapterfmt does not read are not checked. ``fields``: :data:`FIELD_TYPES` (LoRA, AdaLoRA) or
    :data:`LYCORIS_FIELD_TYPES` (LoHa, LoKr).
    """
    for name, check in fields.items():
        if name not in doc:
            continue
        expected = check(doc[name])
        if expected is not None:
            raise InvalidConfigError(
                f"must be {expected}, got {_show(doc[name])}",
                path=path,
                key=name,
                hint="PEFT declares this type; fix the field",
            )
    for name, (ok, expected) in _PATTERN_VALUES.items():
        for pattern, value in (doc.get(name) or {}).items():
            if not ok(value):
                raise InvalidConfigError(f"has an invalid value: must be {expected}, got {_show(value)}", path=path, key=f"{name}.{pattern}")


def _show(value: Any) -> str:
    """A short rendering of a wrong value: its JSON type and, when short, the value."""
    kind = {bool: "boolean", str: "string", int: "integer", float: "number", list: "list", tuple: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )
    text = repr(value)
    return f"{text} ({kind})" if len(text) <= 60 else f"a {kind} of {len(text)} characters"
