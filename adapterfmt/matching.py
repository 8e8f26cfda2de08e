"""Which modules a config targets: exact semantics, written down in docs/FORMAT.md §5.

* ``target_modules`` / ``exclude_modules`` as a **list**: an entry matches a module whose full
  name equals it or ends with ``"." + entry`` (dot boundary: ``q`` never matches ``xq``).
* as a **string**: ``re.fullmatch(pattern, name)``.
* ``exclude_modules`` always wins; a module to save is never a LoRA target.
* ``modules_to_save``: adapterfmt matches exactly (equal or dotted suffix). PEFT wraps with a
  plain ``name.endswith(entry)`` — :func:`peft_full_copy_matches` reproduces that so tools can
  report where the two differ (``classifier`` also catching ``pre_classifier``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

from .errors import AmbiguousMatchError, InvalidConfigError

TargetSpec = Union[Sequence[str], str, None]


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


def matches_spec(name: str, spec: TargetSpec) -> bool:
    """PEFT's ``target_modules`` rule: list -> exact or dotted suffix; string -> full regex match."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(matches_entry(name, e) for e in spec)


def layer_index(name: str, layers_pattern: Union[str, Sequence[str], None] = None) -> Optional[int]:
    """The layer index PEFT's ``layers_to_transform`` filter reads from ``name`` (first ``.<seg>.<n>.``)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


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
    if matches_spec(name, exclude_modules):
        return False
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save):
        return False
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True  # an exact full name skips the layer filter
    if not any(name.endswith("." + e) for e in target_modules):
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
            if matches_spec(name, exclude_modules):
                sel.excluded.append(name)
            else:
                sel.lora_targets.append(name)
    if isinstance(target_modules, (list, tuple)):
        sel.unused_targets = [e for e in target_modules if not any(matches_entry(n, e) for n in module_names)]
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
