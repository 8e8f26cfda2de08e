"""The ``adapter_config.json`` of an adapter known only from its tensors (a wrapped state dict).

:func:`rebuild_config` turns ranks, full copies and layout flags read from tensor names and
shapes into the config document PEFT would have written; :func:`exact_pattern` spells a
``rank_pattern`` key that PEFT resolves to exactly one module.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Mapping, Optional

from ..errors import InvalidConfigError
from .config import LoraConfig

__all__ = ["exact_pattern", "rebuild_config"]

#: Fields of a rebuilt ``adapter_config.json`` that the tensors cannot tell (PEFT's defaults).
_CONFIG_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "bias": "none",
    "lora_dropout": 0.0,
    "init_lora_weights": True,
    "use_rslora": False,
    "alpha_pattern": {},
    "trainable_token_indices": None,
}
#: Fields that filter target modules: meaningless next to an exact ``target_modules`` list.
_TARGET_FILTERS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def exact_pattern(module: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that PEFT resolves to ``module`` alone.

    PEFT matches ``re.match(r"(.*\\.)?(KEY)$", name)``; a leading ``^`` forbids the optional
    prefix, and escaping makes the dots literal.
    """
    return "^" + re.escape(module)


def rebuild_config(
    ranks: Mapping[str, int],
    *,
    full_copies: "list[str]",
    use_dora: bool,
    lora_bias: bool,
    fan_in_fan_out: bool,
    base_modules: "list[str]" = (),  # type: ignore[assignment]
    alpha: Optional[float] = None,
    config: Optional[LoraConfig] = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` document of an adapter whose tensors are known.

    From the tensors: ``r`` (the most common rank; ties -> the smaller), ``rank_pattern``
    (:func:`exact_pattern` keys for the other modules), ``target_modules`` (the module paths; a
    full-match regex instead when a path is also the dotted tail of another module of the base,
    which PEFT's list rule would catch too), ``modules_to_save``, ``use_dora``, ``lora_bias``,
    ``fan_in_fan_out``. From the caller: ``lora_alpha`` (``alpha``), or everything else of a known
    ``config`` (alpha, alpha_pattern, rsLoRA, task type, token indices ...; its target filters are
    dropped since the target list is exact).

    Args:
        ranks: LoRA module path -> rank read from its tensors.
        full_copies: module paths saved in full.
        base_modules: every module name of the base (to spot ambiguous target names).
        alpha: ``lora_alpha``; ``None`` with no config leaves it ``None`` (unknown).
        config: a known config of this adapter.

    Raises:
        InvalidConfigError: both ``alpha`` and ``config`` were given.
    """
    if alpha is not None and config is not None:
        raise InvalidConfigError("give lora_alpha or a config, not both", key="lora_alpha", hint="use --alpha or --config")
    known = {"lora_alpha": alpha} if config is None else {**config.raw, "lora_alpha": config.lora_alpha}
    doc: dict[str, Any] = {**_CONFIG_DEFAULTS, **known}
    for name in _TARGET_FILTERS:
        doc[name] = None
    counts = Counter(ranks.values())
    r = min(counts, key=lambda k: (-counts[k], k)) if counts else int(doc.get("r", 8))
    modules = sorted(ranks)
    others = set(base_modules) - set(modules)
    ambiguous = any(o.endswith("." + m) for m in modules for o in others)
    doc.update(
        r=r,
        rank_pattern={exact_pattern(m): k for m, k in sorted(ranks.items()) if k != r},
        target_modules=("^(" + "|".join(re.escape(m) for m in modules) + ")$") if ambiguous else modules,
        modules_to_save=sorted(full_copies) or None,
        use_dora=use_dora,
        lora_bias=lora_bias,
        fan_in_fan_out=fan_in_fan_out,
    )
    return doc
