"""The one rule that a PEFT adapter's declared ``peft_type`` and its saved tensors agree (BEHAVIOUR §1).

Each PEFT method saves its own tensor names (saved namespace, FORMAT §3 / §3.10 / §10.6):

* ``LORA``: ``X.lora_A.weight``, ``X.lora_B.weight`` (``X.lora_B.bias``), embeddings
  ``X.lora_embedding_A`` / ``X.lora_embedding_B``, DoRA's ``X.lora_magnitude_vector``;
* ``ADALORA``: ParameterDict entries without ``.weight`` — ``X.lora_A``, ``X.lora_B`` and the
  singular values ``X.lora_E`` (embeddings: ``X.lora_embedding_A`` / ``_B`` with ``X.lora_E``);
  ``X.ranknum`` is never saved by PEFT but is AdaLoRA's if present;
* ``LOHA``: ``X.hada_w1_a`` … (LyCORIS's names); ``LOKR``: ``X.lokr_w1`` ….

A config that declares one method over another's tensors builds other layers in PEFT than the
tensors describe (an ``ADALORA`` config over plain ``lora_A.weight`` / ``lora_B.weight`` would be
merged as LoRA by the tensors and as AdaLoRA by PEFT), so every reader calls
:func:`check_method_tensors` on the whole tensor set before it builds records, and inspect, check,
merge, load and convert all refuse the adapter with one line naming ``peft_type``, the missing
and the unexpected tensors. Full copies (``modules_to_save``), saved base tensors and
trainable-token rows belong to no method and are left to the readers' own rules.

Imports :mod:`.keys` and :mod:`adapterfmt.errors` only.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..errors import InconsistentAdapterError, UnknownKeyError
from .keys import Role, parse_saved

LORA, ADALORA, LOHA, LOKR = "LORA", "ADALORA", "LOHA", "LOKR"
#: The methods this rule knows: their tensors are told apart by name alone.
METHODS = (LORA, ADALORA, LOHA, LOKR)
#: AdaLoRA's saved ParameterDict names (no ``.weight``).
_ADALORA_PARAMS = {"lora_A", "lora_B", "lora_E", "ranknum"}
#: How many names one line shows of each list.
_SHOWN = 3


_ONLY_LORA = frozenset({LORA})
#: The names almost every tensor of a LoRA adapter ends with: told apart without parsing the key
#: (a 200k-tensor adapter passes each key here once, besides the reader's own parse).
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def methods_of(key: str) -> Optional[frozenset[str]]:
    """The methods whose layers save a tensor named like ``key`` (None: a tensor of no method —
    a full copy, a saved base tensor, trainable-token rows, or an unparsable key the readers refuse)."""
    if key.endswith(_LORA_SUFFIXES) and key[:1] != "." and ".." not in key and key[:-14] not in ("", "base_model.model", "base_model.model."):
        return _ONLY_LORA  # X.lora_A.weight / X.lora_B.weight with a module X: what parse_saved says too
    try:
        parts = parse_saved(key)
    except UnknownKeyError:
        return None
    if parts.role in (Role.LORA_A, Role.LORA_B, Role.DORA_MAGNITUDE):
        return _ONLY_LORA
    if parts.role in (Role.LORA_EMBEDDING_A, Role.LORA_EMBEDDING_B):
        return frozenset({LORA, ADALORA})
    if parts.role is Role.PLAIN and parts.param:
        if parts.param in _ADALORA_PARAMS:
            return frozenset({ADALORA})
        if parts.param.startswith("hada_"):
            return frozenset({LOHA})
        if parts.param.startswith("lokr_"):
            return frozenset({LOKR})
    return None


def _shown(names: list[str]) -> str:
    more = f", … {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def method_mismatch(peft_type: str, keys: Iterable[str]) -> Optional[str]:
    """What disagrees between the declared ``peft_type`` and the saved tensor names ``keys``, as
    one sentence, or None when they agree (or ``peft_type`` is not one of :data:`METHODS`: the
    config reader decides about those).

    Unexpected: a tensor only another method saves. Missing: for ``ADALORA``, the ``lora_E`` of
    every module that has AdaLoRA / LoRA factors; for ``LOHA`` / ``LOKR``, any factor of the method
    when the file holds tensors of another method instead.
    """
    declared = str(peft_type).upper()
    if declared not in METHODS:
        return None
    unexpected: list[str] = []
    found: set[str] = set()  # the methods whose tensors the file holds
    last: Optional[frozenset[str]] = None
    modules: dict[str, set[str]] = {}  # AdaLoRA: module -> its saved slot names
    for key in keys:  # 200k keys for a big adapter: one cheap test each
        methods = methods_of(key)
        if methods is None:
            continue
        if methods is not last:
            found.update(methods)
            last = methods
        if declared not in methods:
            unexpected.append(key)
        if declared == ADALORA and methods & {LORA, ADALORA}:  # AdaLoRA's slots, or LoRA's in their place
            parts = parse_saved(key)
            modules.setdefault(parts.module, set()).add(parts.param if parts.role is Role.PLAIN else parts.role.value)
    missing: list[str] = []
    if declared == ADALORA:
        for module, slots in modules.items():
            if "lora_E" not in slots and slots - {"ranknum", "lora_magnitude_vector"}:
                missing.append(f"{module}.lora_E")
            if "lora_E" in slots and not ({"lora_A", "lora_embedding_A"} & slots and {"lora_B", "lora_embedding_B"} & slots):
                missing.append(f"{module}.lora_A / lora_B")
    elif declared in (LOHA, LOKR) and unexpected and declared not in found:
        missing.append(f"every {'hada_*' if declared == LOHA else 'lokr_*'} factor")
    if not unexpected and not missing:
        return None
    others = sorted(set().union(*(methods_of(k) or frozenset() for k in unexpected)) - {declared}) if unexpected else []
    what = []
    if missing:
        what.append(f"missing {len(missing)}: {_shown(missing)}")
    if unexpected:
        what.append(f"unexpected {len(unexpected)} {' / '.join(others)} tensors: {_shown(unexpected)}")
    return f"peft_type is {declared} but its tensors are not {declared}'s ({'; '.join(what)})"


def check_method_tensors(peft_type: str, keys: Iterable[str], *, path: str, config_path: Optional[str] = None) -> None:
    """Refuse an adapter whose declared ``peft_type`` and saved tensors disagree (:func:`method_mismatch`).

    Raises:
        InconsistentAdapterError: naming the weights file, ``peft_type`` and the missing /
            unexpected tensors; the hint says how to fix it.
    """
    problem = method_mismatch(peft_type, keys)
    if problem is None:
        return
    where = f" in {config_path}" if config_path else ""
    raise InconsistentAdapterError(
        problem,
        path=path,
        key="peft_type",
        hint=f"set peft_type{where} to the method the adapter was trained with, or re-export it with PEFT's save_pretrained",
    )
