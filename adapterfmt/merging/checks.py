"""Why a merge is refused, checked from headers before anything is written: config features
adapterfmt cannot merge, unresolved or unknown adapter keys, shape errors, non-float tensors, bad
trainable-token indices. Each refusal names the file, the key and what to do."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from ..base.resolution import Resolution
from ..constants import FLOAT_DTYPES
from ..errors import InvalidConfigError, MergeError, ShapeMismatchError, UnknownKeyError, UnresolvedModulesError, UnsupportedFeatureError
from ..formats.peft.reading import AdapterCheckpoint
from ..storage.header import TensorInfo

_LISTED = 5


def refuse_unsupported(adapter: AdapterCheckpoint) -> None:
    unsupported = adapter.config.unsupported
    if unsupported:
        name, why = next(iter(unsupported.items()))
        raise UnsupportedFeatureError(
            f"is set ({why}); adapterfmt cannot merge it", path=adapter.config.path or adapter.directory, key=name, hint="merge it with PEFT instead"
        )


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def refuse_bad_resolution(adapter: AdapterCheckpoint, res: Resolution, allow_unused: bool) -> None:
    if res.shape_errors:
        more = f" (and {len(res.shape_errors) - 1} more)" if len(res.shape_errors) > 1 else ""
        raise ShapeMismatchError(
            res.shape_errors[0] + more, path=adapter.weights_file, hint="is this adapter for this base model? `adapterfmt check` lists them all"
        )
    if allow_unused:
        return
    if res.unresolved:
        total = len(adapter.lora) + sum(len(c.tensors) for c in adapter.full_copies.values()) + len(adapter.base_overrides)
        if res.suggestion:
            old, new = res.suggestion
            hint = f"renaming the prefix '{old}' to '{new}' would match some: pass --prefix-map '{old}={new}' (see `adapterfmt check`); or pass --allow-unused to merge the rest"
        else:
            hint = "is this adapter for this base model? pass --allow-unused to merge the rest"
        raise UnresolvedModulesError(
            f"{len(res.unresolved)} of {total} adapter modules and full-copy tensors match no tensor of the base model: {_listed(res.unresolved)}",
            unresolved=res.unresolved,
            suggestion=res.suggestion,
            path=adapter.weights_file,
            hint=hint,
        )
    if adapter.unknown_keys:
        raise UnknownKeyError(
            f"fits no rule of the key grammar ({len(adapter.unknown_keys)} such keys: {_listed(adapter.unknown_keys)})",
            path=adapter.weights_file,
            key=adapter.unknown_keys[0],
            hint="merging without them would drop trained values silently; pass --allow-unused to do so",
        )


def refuse_non_float(info: TensorInfo, key: str, where: str) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise UnsupportedFeatureError(
            f"is stored as {info.dtype}; LoRA tensors are merged and loaded from {', '.join(FLOAT_DTYPES)} only",
            path=where,
            key=key,
            hint="convert the adapter to a float dtype first",
        )


def token_indices(td: Any, base_info: TensorInfo, where: str) -> tuple[int, ...]:
    if td.indices is None:
        raise InvalidConfigError(
            f"trainable_token_indices names no indices for '{td.path}'", path=where, key="trainable_token_indices", hint="fix adapter_config.json"
        )
    vocab, dim = (base_info.shape + (0, 0))[:2]
    shape = tuple(td.tensor.shape)
    if len(base_info.shape) != 2 or shape != (len(td.indices), dim):
        raise ShapeMismatchError(
            f"holds {list(shape)} but {len(td.indices)} indices of the base embedding {list(base_info.shape)} need [{len(td.indices)}, {dim}]",
            path=where,
            key=td.key,
        )
    bad = [i for i in td.indices if not 0 <= i < vocab]
    if bad or len(set(td.indices)) != len(td.indices):
        why = f"index {bad[0]} is outside the vocabulary of {vocab}" if bad else "an index appears twice"
        raise InvalidConfigError(f"trainable_token_indices: {why}", path=where, key="trainable_token_indices")
    return tuple(td.indices)


def refuse_unplaced(expected: Iterable[tuple[int, str, object]], planned: Iterable[Any], accounted: "set[int]") -> None:
    """Every LoRA term, full copy, saved base tensor and token-row tensor of every adapter
    (``expected``: ``(adapter, name, term or replacing tensor)``) lands in an output tensor.

    A part that resolved but that no output tensor carries would be a silent skip (the merge
    would report success with the adapter partly applied): that is an error, never a warning.
    ``accounted`` holds the ids of parts applied through another (a tied twin, a duplicate saved
    copy of one tied tensor).
    """
    placed = set(accounted)
    for t in planned:
        placed.update(id(term) for term in t.terms)
        if t.action in ("replace", "merge"):
            placed.add(id(t.source))
    lost = [(adapter, name) for adapter, name, obj in expected if id(obj) not in placed]
    if lost:
        adapter, name = lost[0]
        raise MergeError(
            f"adapter #{adapter + 1}: '{name}' resolved but no output tensor carries it "
            f"({len(lost)} such part{'s' if len(lost) > 1 else ''}); merging would drop it silently",
            key=name,
            hint="report this with the base's config.json; `adapterfmt check` shows how each module resolves",
        )
