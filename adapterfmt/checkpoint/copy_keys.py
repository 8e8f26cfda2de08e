"""Which saved keys are full copies (``modules_to_save``): the one rule, for every PEFT type.

PEFT LoRA, AdaLoRA, LoHa and LoKr all save the trained copy of a module under its real path with
no infix (``base_model.model.classifier.weight``, docs/FORMAT.md §3.6), so a plain key is a full
copy exactly when it lies under a module PEFT wrapped for a ``modules_to_save`` entry. The readers
(:mod:`adapterfmt.formats.peft.reading` for LoRA / AdaLoRA, :mod:`adapterfmt.formats.peft.lycoris` for LoHa /
LoKr) hand their plain keys to :func:`full_copies_of`. Headers only; no torch.
"""

from __future__ import annotations

from typing import Optional

from ..storage.header import TensorInfo
from .keys import KeyParts, param_key, split_prefix
from .matching import is_within, module_names_from_keys, peft_full_copy_matches
from .records import FullCopyModule

__all__ = ["full_copies_of"]


def full_copies_of(
    plain: "list[tuple[str, KeyParts]]", entries: "list[str]", tensors: "dict[str, TensorInfo]"
) -> "tuple[dict[str, FullCopyModule], list[tuple[str, KeyParts]]]":
    """Sort plain saved keys (``(key, parsed key)``, no wrapper infix) into full copies.

    A key belongs to the outermost module PEFT wrapped for an entry of ``entries`` (the config's
    ``modules_to_save``) that it lies under (:func:`_full_copy_modules`); a container's nested
    parameters stay with it (``classifier.dense.weight`` -> copy ``classifier``, param
    ``dense.weight``).

    Returns:
        The copies (module path -> record, parameters relative to the module) and the keys under
        no such module, in their order (the caller decides what they are: base biases, or unknown).
    """
    full_modules = _full_copy_modules([k for k, _ in plain], entries)
    copies: dict[str, FullCopyModule] = {}
    rest: list[tuple[str, KeyParts]] = []
    for key, parts in plain:
        module = _owning(parts, full_modules)
        if module is None:
            rest.append((key, parts))
            continue
        copy = copies.setdefault(module, FullCopyModule(module))
        param = key[len(parts.prefix) + len(module) + 1 :]
        copy.tensors[param] = tensors[key]
        copy.keys[param] = key
    return copies, rest


def _full_copy_modules(keys: "list[str]", entries: "list[str]") -> "list[str]":
    """Module paths under which plain keys are full copies.

    These are the module names (derived from the keys) that PEFT wrapped for an entry of
    ``modules_to_save``: PEFT uses a plain ``name.endswith(entry)`` (:func:`peft_full_copy_matches`),
    so a real checkpoint made with ``["classifier"]`` also holds ``pre_classifier.*``. The file is
    described as PEFT wrote it; ``full-copy-suffix`` findings then point out where exact matching
    would differ."""
    names, _ = module_names_from_keys(split_prefix(k)[1] for k in keys)
    out = {n for e in entries for n in peft_full_copy_matches(names, e)}
    # keep outermost: a full copy of ``classifier`` owns ``classifier.dense.*``
    return sorted(n for n in out if not any(n != o and is_within(n, o) for o in out))


def _owning(parts: KeyParts, full_modules: "list[str]") -> Optional[str]:
    key = param_key(parts.module, parts.param or "")
    best = None
    for m in full_modules:
        if key.startswith(m + ".") and (best is None or len(m) > len(best)):
            best = m
    return best
