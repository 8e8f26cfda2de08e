"""Merge PEFT LoRA adapters of diffusers components into a single-file checkpoint (BEHAVIOUR §7.6).

Each adapter is bound by :func:`adapterfmt.single_file.peft.resolve_single_file` (its component
decided, every module on the file's tensor and rows) and all are merged by the one merge engine
into the same file back (:func:`~adapterfmt.merging.engine.merge_to_file`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

from ..base.resolution import Resolution
from ..checkpoint.records import AdapterCheckpoint
from ..errors import UnresolvedModulesError, UnsupportedFeatureError
from ..formats.peft.reading import read_adapter
from ..single_file.checkpoint import SingleFileBase
from ..single_file.peft import resolve_single_file
from .engine import MergeSummary, merge_to_file


def bind_peft_adapters(model: SingleFileBase, adapters: Sequence[AdapterCheckpoint], component: Optional[str] = None) -> dict[int, tuple[str, Resolution]]:
    """``id(adapter)`` -> (its component, its binding); every module must be placed.

    Raises:
        UnresolvedModulesError: a module the component's diffusers names do not hold (the first named).
        see :func:`~adapterfmt.single_file.peft.resolve_single_file`.
    """
    out = {}
    for adapter in adapters:
        c, res = resolve_single_file(adapter, model, component)
        if res.unresolved:
            raise UnresolvedModulesError(
                f"{len(res.unresolved)} of {res.lora_total + res.full_total} module names fit no tensor of the {c} of {model.file} "
                f"that diffusers' converter knows ({model.description})",
                path=adapter.directory, key=res.unresolved[0],
                hint="`adapterfmt check --adapter ADAPTER --base CHECKPOINT` lists them; is this adapter for this model?",
            )
        out[id(adapter)] = (c, res)
    return out


def merge_peft_into_single_file(
    model: SingleFileBase,
    adapters: Sequence["str | os.PathLike[str] | AdapterCheckpoint"],
    out: "str | os.PathLike[str]",
    *,
    component: Optional[str] = None,
    weights: Optional[Sequence[float]] = None,
    overwrite: bool = False,
    progress: Any = None,
    allow_pickle: bool = False,
    **ignored: Any,
) -> MergeSummary:
    """Merge PEFT LoRA adapters (each of one diffusers component of ``model``) into the single file
    ``model`` and write ``out``, the same file back; each adapter's component is decided by its
    module names, or ``component`` for all of them.

    Raises:
        UnsupportedFeatureError: ``dtype``, ``max_shard_size``, ``allow_unused``, ``verify`` or
            ``prefix_map`` given (they do not apply to a single file); see :func:`bind_peft_adapters`.
    """
    given = [name for name, value in ignored.items() if value]
    if given:
        raise UnsupportedFeatureError(
            f"{given[0]} does not apply to a single-file checkpoint, which is written back as it is (its keys, dtypes and metadata)",
            path=model.file, key=given[0], hint="drop the option",
        )
    checkpoints = [a if isinstance(a, AdapterCheckpoint) else read_adapter(a, allow_pickle=allow_pickle) for a in adapters]
    bound = bind_peft_adapters(model, checkpoints, component)

    def resolver(adapter: AdapterCheckpoint, _base: Any) -> Resolution:
        return bound[id(adapter)][1]

    return merge_to_file(model, checkpoints, out, resolver=resolver, weights=weights, overwrite=overwrite, progress=progress)


__all__ = ["bind_peft_adapters", "merge_peft_into_single_file"]
