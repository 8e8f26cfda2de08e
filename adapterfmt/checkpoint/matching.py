"""Which modules a config targets: exact semantics, written down in docs/FORMAT.md §5.

* ``target_modules`` / ``exclude_modules`` as a **list**: an entry matches a module whose full
  name equals it or ends with ``"." + entry`` (dot boundary: ``q`` never matches ``xq``).
* as a **string**: ``re.fullmatch(pattern, name)``.
* ``exclude_modules`` always wins; a module to save is never a LoRA target.
* ``modules_to_save``: adapterfmt matches exactly (equal or dotted suffix). PEFT wraps with a
  plain ``name.endswith(entry)`` — :func:`peft_full_copy_matches` reproduces that so tools can
  report where the two differ (``classifier`` also catching ``pre_classifier``).

Cost is linear in the number of names (BEHAVIOUR §1): a list is matched through a set of its
entries, looking up each dotted suffix of the name; a regex is compiled once and matched at a
bounded price (:mod:`adapterfmt.checkpoint.patterns`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from ..errors import AmbiguousMatchError, InvalidConfigError
from .patterns import FULL, LAYERS, MODULES_TO_SAVE, PATTERN_KEY, bounded, literal_tail

TargetSpec = Union[Sequence[str], str, None]


def dotted_tail(name: str, segments: int) -> Optional[str]:
    """The last ``segments`` dotted segments of ``name`` when a dot precedes them, else ``None``."""
    parts = name.rsplit(".", segments)
    return name[len(parts[0]) + 1 :] if len(parts) > segments else None


class EntryIndex:
    """A list of entries matched by set lookups: ``name == entry`` or ``name.endswith("." + entry)``.

    Only the tails with as many segments as some entry are looked up: one or two per name.
    """

    __slots__ = ("entries", "_segments")

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = frozenset(entries)
        self._segments = sorted({e.count(".") + 1 for e in self.entries})

    def matches(self, name: str) -> bool:
        if name in self.entries:
            return True
        return any(dotted_tail(name, k) in self.entries for k in self._segments)

    def hits(self, name: str) -> list[str]:
        """The entries ``name`` matches."""
        out = [name] if name in self.entries else []
        for k in self._segments:
            tail = dotted_tail(name, k)
            if tail is not None and tail in self.entries:
                out.append(tail)
        return out


_INDEXES: dict[int, tuple[Any, int, EntryIndex]] = {}


def entry_index(entries: Sequence[str]) -> EntryIndex:
    """The :class:`EntryIndex` of ``entries``, built once per list object (a few are kept)."""
    hit = _INDEXES.get(id(entries))
    if hit is not None and hit[0] is entries and hit[1] == len(entries):
        return hit[2]
    if len(_INDEXES) >= 64:
        _INDEXES.clear()
    index = EntryIndex(entries)
    _INDEXES[id(entries)] = (entries, len(entries), index)  # keeps ``entries`` alive, so its id stays unique
    return index


def matches_entry(name: str, entry: str) -> bool:
    """``name == entry`` or ``name`` ends with ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def is_within(name: str, module: str) -> bool:
    """``name`` is ``module`` itself or lies inside it (``module.`` + more segments)."""
    return name == module or name.startswith(module + ".")


def apply_prefix_map(path: str, prefix_map: Optional[Mapping[str, str]]) -> str:
    """``path`` as the model names it: the first ``prefix_map`` entry ``old -> new`` whose ``old``
    starts the path is applied (``{"model.": "language_model.model."}``)."""
    for old, new in (prefix_map or {}).items():
        if path.startswith(old):
            return new + path[len(old) :]
    return path


def undo_prefix_map(path: str, prefix_map: Optional[Mapping[str, str]]) -> str:
    """The inverse of :func:`apply_prefix_map`: a model path as the checkpoint names it."""
    for old, new in (prefix_map or {}).items():
        if path.startswith(new):
            return old + path[len(new) :]
    return path


def matches_spec(name: str, spec: TargetSpec, field: str = "target_modules") -> bool:
    """PEFT's ``target_modules`` rule: list -> exact or dotted suffix; string -> full regex match."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return bounded(spec, FULL, field).fullmatch(name) is not None
    return entry_index(spec).matches(name)


def layer_index(name: str, layers_pattern: Union[str, Sequence[str], None] = None) -> Optional[int]:
    """The layer index PEFT's ``layers_to_transform`` filter reads from ``name`` (first ``.<seg>.<n>.``)."""
    if not layers_pattern:
        m = _NO_LAYERS_PATTERN.match(name)
    else:
        m = None
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = bounded(p, LAYERS, "layers_pattern").match(name)
            if m:
                break
    return int(m.group("idx")) if m else None


_NO_LAYERS_PATTERN = bounded(r".*?\.[^.]*\.(?P<idx>\d+)\.", FULL, "layers_pattern").regex


def is_lora_target(
    name: str,
    target_modules: TargetSpec,
    *,
    exclude_modules: TargetSpec = None,
    modules_to_save: Optional[Sequence[str]] = None,
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
) -> bool:
    """Whether PEFT would put a LoRA layer on ``name`` (order: exclude, modules_to_save, target, layer filter)."""
    if exclude_modules and matches_spec(name, exclude_modules, "exclude_modules"):
        return False
    if modules_to_save and any(bounded(m, MODULES_TO_SAVE, "modules_to_save").match(name) for m in modules_to_save):
        return False
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return bounded(target_modules, FULL, "target_modules").fullmatch(name) is not None
    index = entry_index(target_modules)
    if name in index.entries:
        return True  # an exact full name skips the layer filter
    if not index.matches(name):
        return False
    if layers_to_transform is None or (not isinstance(layers_to_transform, int) and len(layers_to_transform) == 0):
        return True
    idx = layer_index(name, layers_pattern)
    if idx is None:
        return False
    return idx == layers_to_transform if isinstance(layers_to_transform, int) else idx in layers_to_transform


def full_copy_matches(names: Iterable[str], entry: str) -> list[str]:
    """Modules adapterfmt treats as the full copy ``entry``: exact name or dotted suffix."""
    return [n for n in names if matches_entry(n, entry)]


def peft_full_copy_matches(names: Iterable[str], entry: str) -> list[str]:
    """Modules PEFT's ``_set_trainable`` would wrap for ``entry``: plain ``endswith``, no dot boundary."""
    return [n for n in names if n.endswith(entry)]


@dataclass
class TargetSelection:
    """What a config selects among a model's modules."""

    lora_targets: list[str] = field(default_factory=list)
    full_copies: dict[str, list[str]] = field(default_factory=dict)  #: entry -> matched modules
    excluded: list[str] = field(default_factory=list)  #: would be targets but for exclude_modules
    #: entry -> modules PEFT's plain-endswith rule binds that the exact rule does not (or vice versa)
    peft_divergence: dict[str, list[str]] = field(default_factory=dict)
    unused_targets: list[str] = field(default_factory=list)  #: list entries that matched nothing


def select_targets(
    module_names: Sequence[str],
    *,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec = None,
    modules_to_save: Optional[Sequence[str]] = None,
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
    lora_capable: Optional[Iterable[str]] = None,
) -> TargetSelection:
    """Apply the matching rules to ``module_names``.

    Args:
        module_names: every module name of the model (containers included).
        lora_capable: modules that can carry LoRA (leaf layers with a weight); default all names.

    Raises:
        InvalidConfigError: ``target_modules`` is ``"all-linear"`` (needs module types, not names).
        AmbiguousMatchError: a ``modules_to_save`` entry matches several modules, or a module
            is both a LoRA target and a module to save.
    """
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        raise InvalidConfigError(
            "'all-linear' needs the module types, which a checkpoint header does not give",
            key="target_modules",
            hint="list the module names instead (PEFT saves the expanded list in adapter_config.json)",
        )
    capable = set(module_names if lora_capable is None else lora_capable)
    sel = TargetSelection()
    for name in module_names:
        if name not in capable:
            continue
        if is_lora_target(
            name,
            target_modules,
            modules_to_save=None,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
        ):
            if matches_spec(name, exclude_modules, "exclude_modules"):
                sel.excluded.append(name)
            else:
                sel.lora_targets.append(name)
    if isinstance(target_modules, (list, tuple)):
        used = {e for n in module_names for e in entry_index(target_modules).hits(n)}
        sel.unused_targets = [e for e in target_modules if e not in used]
    for entry in modules_to_save or ():
        exact = full_copy_matches(module_names, entry)
        peft = peft_full_copy_matches(module_names, entry)
        sel.full_copies[entry] = exact
        if set(peft) != set(exact):
            sel.peft_divergence[entry] = sorted(set(peft) ^ set(exact))
        if len(exact) > 1:
            raise AmbiguousMatchError(
                f"modules_to_save entry matches {len(exact)} modules: {', '.join(exact[:5])}",
                key=entry,
                hint="give the full module path of the one you mean",
            )
    both = sorted({m for ms in sel.full_copies.values() for m in ms} & set(sel.lora_targets))
    # PEFT also keeps everything *inside* a module to save out of LoRA targeting.
    inside = sorted(
        t for t in sel.lora_targets for ms in sel.full_copies.values() for m in ms if t.startswith(m + ".")
    )
    if both or inside:
        name = (both or inside)[0]
        raise AmbiguousMatchError(
            "is both a LoRA target and a module to save (full copy); PEFT would silently drop its LoRA",
            key=name,
            hint="remove it from target_modules or from modules_to_save",
        )
    return sel


def module_names_from_keys(keys: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(all_module_names, leaf_modules_with_weight)`` derived from a state dict's tensor keys."""
    names: dict[str, None] = {}
    leaves: dict[str, None] = {}
    for key in keys:
        segs = key.split(".")
        for i in range(1, len(segs)):
            names.setdefault(".".join(segs[:i]), None)
        if len(segs) >= 2 and segs[-1] == "weight":
            leaves.setdefault(".".join(segs[:-1]), None)
    return list(names), list(leaves)


_LITERAL_KEY_CHARS = r"(?:[^.^$*+?{}\[\]\\|()]|\\[^A-Za-z0-9])*"


class PatternKeyIndex:
    """``rank_pattern`` / ``alpha_pattern`` keys, looked up as PEFT's ``get_pattern_key`` does.

    The answer for a name is the first key, in dict order, with
    ``re.match(r"(.*\\.)?(KEY)$", name)``. Keys that are plain (escaped) text are answered by
    dict lookups: ``^text`` matches the name ``text`` only, ``text`` also every name ending in
    ``"." + text``. Other keys are regexes, compiled once and tried only when the name ends with
    their literal tail. Names holding a newline take the slow, exact path through ``re``.
    """

    def __init__(self, keys: Sequence[str], field: str = "rank_pattern", path: Optional[str] = None) -> None:
        self.keys = list(keys)
        self.field, self.path = field, path
        self._exact: dict[str, int] = {}
        self._suffix: dict[str, int] = {}
        self._suffix_segments: list[int] = []
        self._regex_keys: list[int] = []  #: key positions that are real regexes
        self._by_tail: dict[int, dict[str, list[int]]] = {}  #: tail length -> tail -> key positions
        literal = _literal_key()
        for i, key in enumerate(self.keys):
            m = literal.fullmatch(key)
            if m is not None:
                text = _unescape(m.group(2))
                (self._exact if m.group(1) else self._suffix).setdefault(text, i)
                continue
            bounded(key, PATTERN_KEY, f"{field}.{key}", path)  # vet it now: refused keys fail at read time
            self._regex_keys.append(i)
            tail = literal_tail(key)
            self._by_tail.setdefault(len(tail), {}).setdefault(tail, []).append(i)
        self._suffix_segments = sorted({k.count(".") + 1 for k in self._suffix})

    def _regex(self, i: int) -> Any:
        key = self.keys[i]
        return bounded(key, PATTERN_KEY, f"{self.field}.{key}", self.path)

    def matching(self, name: str) -> list[str]:
        """Every key that matches ``name``, in dict order."""
        return [self.keys[i] for i in self._positions(name, first_only=False)]

    def first(self, name: str) -> Optional[str]:
        """The first key (dict order) matching ``name``, or ``None``."""
        hits = self._positions(name, first_only=True)
        return self.keys[hits[0]] if hits else None

    def _positions(self, name: str, *, first_only: bool) -> list[int]:
        if "\n" in name:  # '.' and '$' treat newlines specially: ask re about every key
            return [i for i in range(len(self.keys)) if self._regex(i).match(name)][: 1 if first_only else None]
        hits = set()
        if name in self._exact:
            hits.add(self._exact[name])
        if name in self._suffix:
            hits.add(self._suffix[name])
        for k in self._suffix_segments:
            tail = dotted_tail(name, k)
            if tail is not None and tail in self._suffix:
                hits.add(self._suffix[tail])
        candidates: set[int] = set()
        for length, tails in self._by_tail.items():
            if length <= len(name):
                candidates.update(tails.get(name[len(name) - length :], ()))
        best = min(hits) if hits else len(self.keys)
        for i in sorted(candidates):
            if first_only and i > best:
                break
            if self._regex(i).match(name):
                hits.add(i)
                if first_only:
                    break
        ordered = sorted(hits)
        return ordered[:1] if first_only else ordered


def _literal_key() -> "re.Pattern[str]":
    return re.compile(r"(\^?)(" + _LITERAL_KEY_CHARS + ")")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def unused_entries(entries: Sequence[str], names: Iterable[str]) -> list[str]:
    """The list entries (in order) that no name matches: one pass of set lookups over the names."""
    index = entry_index(entries)
    used = {e for n in names for e in index.hits(n)}
    return [e for e in entries if e not in used]


def unselected_modules(
    modules: Iterable[str],
    target_modules: TargetSpec,
    *,
    exclude_modules: TargetSpec = None,
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
) -> list[str]:
    """The modules PEFT would not put LoRA on under this selection (FORMAT.md §5.1, §5.2).

    ``modules_to_save`` is left out on purpose: a LoRA module under a module to save is its own
    warning (``target-and-full-copy``).
    """
    return [
        m
        for m in modules
        if not is_lora_target(
            m,
            target_modules,
            exclude_modules=exclude_modules,
            layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern,
        )
    ]
