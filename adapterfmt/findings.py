"""Warnings about a checkpoint: stable codes, a message, and the keys concerned.

Codes (docs/FORMAT.md §7): ``target-and-full-copy``, ``orphan-lora``, ``rank-mismatch``,
``unknown-key``, ``non-finite``, ``tied-full-copy``, ``config-tensor-mismatch``,
``unsupported-feature``, ``pattern-overlap``, ``full-copy-suffix``, ``wrapper-leftover``,
``mixed-prefix``, ``full-copy-unchanged``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .matching import is_within, matches_entry, matches_spec, peft_full_copy_matches

if TYPE_CHECKING:  # pragma: no cover
    from .describe import AdapterCheckpoint

_MAX_KEYS = 20
#: Heads PEFT adds to modules_to_save for a task type (peft_model.py); a model has only one of them.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


@dataclass(frozen=True)
class Finding:
    """One warning: ``code`` (stable), ``message`` (one line), ``keys`` (saved keys or module names)."""

    code: str
    message: str
    keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "keys": list(self.keys)}


def adapter_findings(ckpt: "AdapterCheckpoint", overlaps: Callable[..., list[tuple[str, str, str]]]) -> list[Finding]:
    """Everything that can be said about an adapter from its config and header alone."""
    cfg = ckpt.config
    out: list[Finding] = []
    where = ckpt.weights_file

    for path, m in ckpt.lora.items():
        missing = [s for s in ("lora_A", "lora_B") if s not in m.tensors]
        if missing:
            out.append(
                Finding(
                    "orphan-lora",
                    f"{where}: module '{path}' has {' and '.join(sorted(set(m.tensors) - set(missing)))} but no {missing[0]}",
                    sorted(m.keys.values()),
                )
            )
            continue
        a, b = m.tensors["lora_A"], m.tensors["lora_B"]
        a_rank = a.shape[0]
        b_rank = b.shape[1] if len(b.shape) >= 2 else None
        if b_rank is not None and a_rank != b_rank:
            out.append(
                Finding(
                    "rank-mismatch",
                    f"{where}: module '{path}' lora_A has rank {a_rank} but lora_B has rank {b_rank}",
                    [m.keys["lora_A"], m.keys["lora_B"]],
                )
            )
        elif m.rank != m.config_rank:
            out.append(
                Finding(
                    "rank-mismatch",
                    f"{where}: module '{path}' has rank {m.rank} in its tensors but the config gives r={m.config_rank}"
                    " (r / rank_pattern); scaling uses the tensor rank",
                    [m.keys["lora_A"], m.keys["lora_B"]],
                )
            )
        if m.use_dora != cfg.use_dora:
            out.append(
                Finding(
                    "config-tensor-mismatch",
                    f"{where}: module '{path}' {'has' if m.use_dora else 'lacks'} a DoRA magnitude but use_dora is {cfg.use_dora}",
                    sorted(m.keys.values()),
                )
            )

    if ckpt.unknown_keys:
        out.append(
            Finding(
                "unknown-key",
                f"{where}: {len(ckpt.unknown_keys)} tensor(s) fit no rule of the format "
                f"(not LoRA, not under a modules_to_save entry), e.g. '{ckpt.unknown_keys[0]}'",
                ckpt.unknown_keys[:_MAX_KEYS],
            )
        )

    # A module that is both a LoRA target and a full copy (by tensors or by config).
    entries = cfg.modules_to_save or []
    both = sorted(
        p for p in ckpt.lora if any(is_within(p, c) for c in ckpt.full_copies) or any(matches_entry(p, e) for e in entries)
    )
    if isinstance(cfg.target_modules, list):
        both += sorted(set(cfg.target_modules) & set(entries))
    if both:
        out.append(
            Finding(
                "target-and-full-copy",
                f"'{both[0]}' is both a LoRA target and a module to save; PEFT keeps only the full copy and drops the LoRA",
                both[:_MAX_KEYS],
            )
        )

    # Config vs tensors.
    if cfg.target_modules is not None and not (isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear"):
        not_targeted = [p for p in ckpt.lora if not matches_spec(p, cfg.target_modules)]
        if not_targeted:
            out.append(
                Finding(
                    "config-tensor-mismatch",
                    f"{len(not_targeted)} LoRA module(s) in the file are not matched by target_modules, e.g. '{not_targeted[0]}'",
                    not_targeted[:_MAX_KEYS],
                )
            )
        if isinstance(cfg.target_modules, list):
            unused = [e for e in cfg.target_modules if not any(matches_entry(p, e) for p in ckpt.lora)]
            if unused:
                out.append(
                    Finding(
                        "config-tensor-mismatch",
                        f"target_modules entr{'y' if len(unused) == 1 else 'ies'} {', '.join(repr(u) for u in unused)} "
                        "match no LoRA tensors in the file",
                        unused,
                    )
                )
    # PEFT adds every head name of the task type (SEQ_CLS: classifier *and* score); the model has one.
    auto = _TASK_HEADS.get(str(cfg.task_type or "").upper(), ())
    has_auto = any(matches_entry(c, e) for e in auto for c in ckpt.full_copies)
    missing_copies = [
        e
        for e in entries
        if not any(matches_entry(c, e) for c in ckpt.full_copies) and not (has_auto and e in auto)
    ]
    if missing_copies:
        out.append(
            Finding(
                "config-tensor-mismatch",
                f"modules_to_save entr{'y' if len(missing_copies) == 1 else 'ies'} "
                f"{', '.join(repr(u) for u in missing_copies)} have no tensors in the file",
                missing_copies,
            )
        )

    # Where PEFT's plain endswith would bind modules_to_save differently from the exact rule.
    module_names = set(ckpt.full_copies) | set(ckpt.lora)
    for e in entries:
        loose = sorted(set(peft_full_copy_matches(module_names, e)) - {n for n in module_names if matches_entry(n, e)})
        if loose:
            out.append(
                Finding(
                    "full-copy-suffix",
                    f"modules_to_save entry '{e}' also catches {', '.join(loose)} under PEFT's plain endswith rule",
                    loose,
                )
            )

    for fieldname, why in cfg.unsupported.items():
        out.append(Finding("unsupported-feature", f"config field '{fieldname}' is set: {why}; merge and load refuse it", [fieldname]))

    for name, patterns in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        hits = overlaps(patterns, list(ckpt.lora))
        if hits:
            m, first, other = hits[0]
            out.append(
                Finding(
                    "pattern-overlap",
                    f"{name} keys '{first}' and '{other}' both match '{m}' with different values; PEFT takes the first in "
                    "sorted order, which may not be the training-time order",
                    sorted({h[0] for h in hits})[:_MAX_KEYS],
                )
            )
    return out


def tied_full_copy_findings(ckpt: "AdapterCheckpoint", tied_modules: set[str]) -> list[Finding]:
    """``tied-full-copy``: full copies (or LoRA) of modules whose weight the base ties to another."""
    hits = sorted(p for p in ckpt.full_copies if p in tied_modules)
    if not hits:
        return []
    return [
        Finding(
            "tied-full-copy",
            f"'{hits[0]}' is saved in full but the base ties its weight to the input embedding; the trained copy "
            "diverges from the tied embedding, and a merge must untie them (tie_word_embeddings: false)",
            hits,
        )
    ]
