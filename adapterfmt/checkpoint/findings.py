"""Every warning rule about an adapter, and the one message builder for each warning code.

A rule looks at the checkpoint model (records of :mod:`adapterfmt.checkpoint.records`, a base's tensor
names, a targets selection) and returns :class:`~adapterfmt.checkpoint.finding.Finding` records; the readers
and reports (describe, resolution, summary, wrapped) call these rules and never build a warning
message of their own. The dependency runs one way: this module imports the records, never the
readers.

Codes (docs/FORMAT.md §7): ``target-and-full-copy``, ``orphan-lora``, ``rank-mismatch``,
``unknown-key``, ``non-finite``, ``tied-full-copy``, ``config-tensor-mismatch``,
``unsupported-feature``, ``pattern-overlap``, ``full-copy-suffix``, ``wrapper-leftover``,
``mixed-prefix``, ``full-copy-unchanged``, ``full-copy-incomplete``, ``unused-target``,
``unused-exclude``, ``full-copy-missing``, ``unresolved-module``, ``shape-mismatch``,
``shadowed-weights``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from .config import overlapping_pattern_keys
from .finding import Finding
from .keys import param_key
from .matching import (
    entry_index,
    is_within,
    matches_entry,
    module_names_from_keys,
    peft_full_copy_matches,
    unselected_modules,
    unused_entries,
)

if TYPE_CHECKING:  # pragma: no cover
    from .matching import TargetSelection
    from .records import AdapterCheckpoint, LoraModule

__all__ = [
    "Finding",
    "adapter_findings",
    "endswith_findings",
    "full_copy_incomplete_finding",
    "full_copy_suffix_finding",
    "full_copy_unchanged_finding",
    "lora_rank_mismatch_finding",
    "mixed_prefix_finding",
    "non_finite_finding",
    "shadowed_weights_finding",
    "shape_mismatch_finding",
    "targets_findings",
    "tied_full_copy_findings",
    "unknown_keys_finding",
    "unresolved_module_finding",
    "wrapper_leftover_finding",
]

_MAX_KEYS = 20
#: How many module names a ``full-copy-suffix`` warning lists.
_MAX_LISTED = 10
#: Heads PEFT adds to modules_to_save for a task type (peft_model.py); a model has only one of them.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


# ---------------------------------------------------------------------------------------------
# MESSAGE BUILDERS: one per code that more than one rule or reader reports
# ---------------------------------------------------------------------------------------------


def full_copy_suffix_finding(
    entry: str, peft_binds: Sequence[str], exact_binds: Sequence[str], keys: Sequence[str], *, adapter: Optional[str] = None
) -> Finding:
    """``full-copy-suffix``: PEFT's plain ``endswith`` binds ``entry`` to other modules than the exact rule.

    ``keys`` are the modules the warning is about (those only PEFT's rule binds, or all it binds
    when it binds several); ``adapter`` names the adapter when a file holds more than one.
    """
    where = f"adapter '{adapter}': " if adapter is not None else ""
    return Finding(
        "full-copy-suffix",
        f"{where}modules_to_save entry '{entry}' binds {', '.join(peft_binds[:_MAX_LISTED]) or 'nothing'} under PEFT's "
        f"plain endswith matching, but {', '.join(exact_binds[:_MAX_LISTED]) or 'nothing'} under exact matching; "
        "PEFT expects full tensors for every module it binds",
        list(keys[:_MAX_LISTED]),
    )


def shadowed_weights_finding(where: str, library: str, chosen: str, shadowed: Sequence[str]) -> Finding:
    """``shadowed-weights``: a base folder holds other candidate weight files than the ``chosen`` one ``library`` loads."""
    return Finding(
        "shadowed-weights",
        f"{where}: holds two candidate weight sets; {library} loads {chosen}, so adapterfmt reads it and ignores "
        f"{', '.join(shadowed[:_MAX_LISTED])}{' …' if len(shadowed) > _MAX_LISTED else ''} (not copied into a merge output)",
        list(shadowed[:_MAX_KEYS]),
    )


def mixed_prefix_finding(where: str, unprefixed: Sequence[str]) -> Finding:
    """``mixed-prefix``: some keys of ``where`` carry ``base_model.model.`` and ``unprefixed`` do not."""
    return Finding(
        "mixed-prefix", f"{where}: some keys carry the 'base_model.model.' prefix and some do not", list(unprefixed[:_MAX_KEYS])
    )


def unknown_keys_finding(where: str, keys: Sequence[str], grammar: str) -> Finding:
    """``unknown-key``: ``keys`` of ``where`` fit no rule of ``grammar`` (the saved format or PEFT's in-memory names)."""
    return Finding("unknown-key", f"{where}: {len(keys)} key(s) fit no rule of {grammar}, e.g. '{keys[0]}'", list(keys[:_MAX_KEYS]))


def incomplete_factors_finding(where: str, modules: Sequence[str]) -> Finding:
    """``orphan-lora``: kohya / LyCORIS / diffusers modules of ``where`` whose factors do not form one product:
    a factor missing, a LoKr half given both ways, an empty factor (FORMAT §10.1)."""
    return Finding(
        "orphan-lora",
        f"{where}: {len(modules)} module(s) lack a factor their kind needs, hold one twice or hold an empty one; they cannot be merged or loaded",
        list(modules[:_MAX_KEYS]),
    )


def foreign_unsupported_finding(where: str, what: str, modules: Sequence[str]) -> Finding:
    """``unsupported-feature``: ``what`` (LyCORIS ``dora_scale``, diffusers DoRA / ``lora_B`` biases) in a foreign file."""
    return Finding("unsupported-feature", f"{where}: {what} is not supported: merge, load and convert refuse it", list(modules[:_MAX_KEYS]))


def foreign_dora_finding(where: str, modules: Sequence[str]) -> Finding:
    """``unsupported-feature``: LyCORIS ``dora_scale`` in its output-axis form, which only merge applies."""
    return Finding("unsupported-feature", f"{where}: LyCORIS weight decomposition (dora_scale, output-axis form) is merged exactly, "
                   "as PEFT's use_dora at multiplier 1; load and convert refuse it", list(modules[:_MAX_KEYS]))


def wrapper_leftover_finding(key: str) -> Finding:
    """``wrapper-leftover``: a saved ``modules_to_save`` / ``original_module`` wrapper key, ignored."""
    return Finding(
        "wrapper-leftover", f"'{key}' is a modules_to_save wrapper leftover (PEFT's bias=\"all\" writes these); it is ignored", [key]
    )


def lora_rank_mismatch_finding(where: str, m: "LoraModule", a_rank: int, b_rank: int) -> Finding:
    """``rank-mismatch`` between the two LoRA factors of one module."""
    return Finding(
        "rank-mismatch",
        f"{where}: module '{m.path}' lora_A has rank {a_rank} but lora_B has rank {b_rank}",
        [m.keys["lora_A"], m.keys["lora_B"]],
    )


def full_copy_unchanged_finding(adapter: str, modules: Sequence[str]) -> Finding:
    """``full-copy-unchanged``: the trained copies of ``modules`` equal their frozen originals byte for byte."""
    return Finding(
        "full-copy-unchanged",
        f"adapter '{adapter}': the trained copy of {', '.join(repr(m) for m in modules)} equals its frozen "
        "original_module byte for byte; it never trained (PEFT's frozen modules_to_save bug #2494 with "
        "inject_adapter_in_model on peft <= 0.15, or a save before training), so it changes nothing",
        list(modules),
    )


def unresolved_module_finding(base: str, count: int, first: str, looked_for: str, names: Sequence[str]) -> Finding:
    """``unresolved-module``: ``count`` adapter names bind to no tensor of ``base`` (``first`` looked up as ``looked_for``)."""
    return Finding(
        "unresolved-module",
        f"{count} adapter name(s) have no tensor in the base {base}, e.g. '{first}' (looked for '{looked_for}')",
        list(names),
    )


def shape_mismatch_finding(message: str) -> Finding:
    """``shape-mismatch``: one of :attr:`~adapterfmt.base.resolution.Resolution.shape_errors`, as a warning."""
    return Finding("shape-mismatch", message, [])


def non_finite_finding(where: str, key: str, nan: int, inf: int, numel: int) -> Finding:
    """``non-finite``: tensor ``key`` of ``where`` holds ``nan`` NaN and ``inf`` Inf values (a value scan)."""
    return Finding(
        "non-finite",
        f"{where}: '{key}' holds {nan} NaN and {inf} Inf value(s) of {numel}; the adapter is broken, retrain or re-export it",
        [key],
    )


def full_copy_incomplete_finding(path: str, missing: Sequence[str]) -> Finding:
    """``full-copy-incomplete``: the full copy ``path`` lacks parameters the base module has."""
    return Finding(
        "full-copy-incomplete",
        f"full copy '{path}' lacks {', '.join(missing)} that the base module has; PEFT's loader raises KeyError on it",
        [param_key(path, p) for p in missing],
    )


# ---------------------------------------------------------------------------------------------
# RULES
# ---------------------------------------------------------------------------------------------


def adapter_findings(ckpt: "AdapterCheckpoint") -> list[Finding]:
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
            out.append(lora_rank_mismatch_finding(where, m, a_rank, b_rank))
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
        out.append(unknown_keys_finding(where, ckpt.unknown_keys, "the format (not LoRA, not under a modules_to_save entry)"))

    # A module that is both a LoRA target and a full copy (by tensors or by config).
    entries = cfg.modules_to_save or []
    both = sorted(
        p for p in ckpt.lora if any(is_within(p, c) for c in ckpt.full_copies) or (entries and entry_index(entries).matches(p))
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

    # Config vs tensors: the whole selection (targets, exclusions, layer filter), by index lookups.
    if cfg.target_modules is not None and not (isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear"):
        from .param_targets import param_target
        from .weight_tying import tied_lora_twins

        twins = tied_lora_twins(ckpt)  # ensure_weight_tying: the tied head's LoRA is not in target_modules
        not_selected = [
            p
            for p in unselected_modules(
                ckpt.lora,
                cfg.target_modules,
                exclude_modules=cfg.exclude_modules,
                layers_to_transform=cfg.layers_to_transform,
                layers_pattern=cfg.layers_pattern,
            )
            if p not in twins and param_target(cfg, p) is None
        ]
        if not_selected and len(not_selected) == len(ckpt.lora):
            out.append(
                Finding(
                    "config-tensor-mismatch",
                    f"the config's selection (target_modules, exclude_modules, layers_to_transform, layers_pattern) "
                    f"matches none of the {len(ckpt.lora)} LoRA module(s) in the file, e.g. '{not_selected[0]}'; "
                    "PEFT refuses to load such an adapter",
                    not_selected[:_MAX_KEYS],
                )
            )
        elif not_selected:
            out.append(
                Finding(
                    "config-tensor-mismatch",
                    f"{len(not_selected)} LoRA module(s) in the file are not matched by target_modules"
                    f"{'' if cfg.exclude_modules is None and cfg.layers_to_transform is None else ' (after exclude_modules and the layer filter)'}"
                    f", e.g. '{not_selected[0]}'",
                    not_selected[:_MAX_KEYS],
                )
            )
        if isinstance(cfg.target_modules, list):
            unused = unused_entries(cfg.target_modules, ckpt.lora)
            if unused:
                out.append(
                    Finding(
                        "config-tensor-mismatch",
                        f"target_modules entr{'y' if len(unused) == 1 else 'ies'} {', '.join(repr(u) for u in unused[:_MAX_KEYS])} "
                        "match no LoRA tensors in the file",
                        unused[:_MAX_KEYS],
                    )
                )
    out.extend(full_copy_entry_findings(entries, cfg.task_type, list(ckpt.full_copies), list(ckpt.lora)))

    for fieldname, why in cfg.unsupported.items():
        out.append(Finding("unsupported-feature", f"config field '{fieldname}' is set: {why}; merge and load refuse it", [fieldname]))

    for name, patterns in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        hits = overlapping_pattern_keys(patterns, list(ckpt.lora))
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


def full_copy_entry_findings(
    entries: Sequence[str], task_type: Optional[str], copies: Sequence[str], adapted: Sequence[str]
) -> list[Finding]:
    """The ``modules_to_save`` entries against the full copies a file holds (every PEFT type):
    ``config-tensor-mismatch`` for entries with no tensors, ``full-copy-suffix`` where PEFT's
    plain ``endswith`` binds other modules of the file (``copies`` and the ``adapted`` ones) than
    the exact rule."""
    out: list[Finding] = []
    # PEFT adds every head name of the task type (SEQ_CLS: classifier *and* score); the model has one.
    auto = _TASK_HEADS.get(str(task_type or "").upper(), ())
    has_auto = any(matches_entry(c, e) for e in auto for c in copies)
    missing_copies = [e for e in entries if not any(matches_entry(c, e) for c in copies) and not (has_auto and e in auto)]
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
    module_names = set(copies) | set(adapted)
    for e in entries:
        peft_binds = sorted(peft_full_copy_matches(module_names, e))
        exact = sorted(n for n in module_names if matches_entry(n, e))
        loose = sorted(set(peft_binds) - set(exact))
        if loose:
            out.append(full_copy_suffix_finding(e, peft_binds, exact, loose))
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



def endswith_findings(adapter: "AdapterCheckpoint", base_keys: Sequence[str]) -> list[Finding]:
    """``full-copy-suffix`` against a base: PEFT's plain ``endswith`` on modules_to_save binds a
    different module, or several, among the base's modules."""
    names, _ = module_names_from_keys(base_keys)
    out = []
    for entry in adapter.config.modules_to_save or []:
        loose = peft_full_copy_matches(names, entry)
        exact = [n for n in names if matches_entry(n, entry)]
        if len(loose) > 1 or set(loose) != set(exact):
            out.append(full_copy_suffix_finding(entry, loose, exact, loose))
    return out


def targets_findings(sel: "TargetSelection", exclude_modules: "str | Sequence[str] | None") -> list[Finding]:
    """What ``adapterfmt targets`` warns about a selection: entries that select nothing, and
    ``modules_to_save`` entries PEFT's plain ``endswith`` would bind more widely."""
    out = []
    if sel.unused_targets:
        out.append(
            Finding("unused-target", f"target_modules entries {', '.join(map(repr, sel.unused_targets))} match no module", list(sel.unused_targets))
        )
    if exclude_modules is not None and not sel.excluded:
        spec = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
        out.append(Finding("unused-exclude", f"exclude_modules {', '.join(map(repr, spec))} excludes no target", spec))
    missing = [e for e, ms in sel.full_copies.items() if not ms]
    if missing:
        out.append(Finding("full-copy-missing", f"modules_to_save entries {', '.join(map(repr, missing))} match no module", missing))
    for entry, differing in sel.peft_divergence.items():
        exact = sel.full_copies.get(entry, [])
        out.append(full_copy_suffix_finding(entry, sorted(set(differing) ^ set(exact)), exact, differing))
    return out
