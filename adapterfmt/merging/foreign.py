"""Merge a kohya / LyCORIS or diffusers LoRA file into a component directory or a whole pipeline.

Each component the file adapts becomes an :class:`~adapterfmt.formats.peft.reading.AdapterCheckpoint`
(:mod:`.peft_view`) and is merged by the one merge engine (:func:`adapterfmt.merging.engine.merge_to_directory`):
same streaming, same atomic output. For a pipeline directory (``model_index.json``) OUT is the
whole pipeline: each adapted component merged into ``OUT/<component>``, every other file and
folder copied, all staged beside OUT and renamed into place at the end (docs/BEHAVIOUR.md §7.3).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

from ..base.reading import BaseModel
from ..base.resolution import FACTORS, Resolution, ResolvedLora
from ..checkpoint.records import AdapterCheckpoint
from ..checkpoint.keys import bias_key, split_param
from ..errors import OutputPathError, ShapeMismatchError, UnresolvedModulesError, UnsupportedFeatureError
from ..formats.detect import read_foreign
from ..formats.diffusion.components import check_component, component_bases, is_pipeline
from ..formats.diffusion.names import base_module_paths
from ..formats.diffusion.peft_view import component_adapter
from ..formats.diffusion.records import ForeignCheckpoint
from ..formats.peft.lycoris import peft_lycoris_checkpoint
from ..single_file.checkpoint import SingleFileBase
from ..storage.staging import StagedDirectory, check_output_path, clean_stale
from .engine import MergeSummary, merge_to_directory, merge_to_file

#: Never copied into a merged pipeline.
_SKIP = {".git", ".cache", "__pycache__"}


@dataclass
class ForeignMergeSummary:
    """What :func:`merge_foreign` wrote: ``components`` -> the merge engine's summary of that part."""

    output: str
    adapter: str
    format: str
    components: dict[str, MergeSummary] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": self.output, "adapter": self.adapter, "format": self.format, "copied": self.copied,
            "components": {c: s.as_dict() for c, s in self.components.items()},
        }


def merge_foreign(
    base: "str | os.PathLike[str]",
    adapter: "str | os.PathLike[str]",
    out: "str | os.PathLike[str]",
    *,
    component: Optional[str] = None,
    overwrite: bool = False,
    **options: Any,
) -> ForeignMergeSummary:
    """Merge the foreign adapter file ``adapter`` into ``base`` and write ``out``.

    Args:
        base: a pipeline directory (every component the file adapts is merged, or only ``component``)
            or one component directory (``component`` picks that part of the file; optional when
            the file adapts one component).
        options: passed to :func:`~adapterfmt.merging.engine.merge_to_directory` (``dtype``, ``max_shard_size``,
            ``verify``, ``progress``, ...); ``single_file_kind`` names the kind of a single-file
            checkpoint as ``base`` where its keys cannot decide.

    A single-file checkpoint (Flux.1, SD 1.x, SD 2.x, SDXL: :mod:`adapterfmt.single_file`) as ``base``:
    ``out`` is one ``.safetensors`` file, the same file back with every LoRA added where diffusers'
    converter puts that module's weight (rows of a fused tensor included), every other tensor,
    dtype and the file's metadata as they are.

    Raises:
        AmbiguousMatchError: several components in the file and no ``component`` for a component directory;
            a flattened name that fits two modules.
        UnresolvedModulesError, UnknownKeyError, UnsupportedFeatureError, InconsistentAdapterError:
            see :func:`~adapterfmt.formats.diffusion.peft_view.refuse_unusable`; nothing is written.
    """
    base_dir, src = os.fspath(base), os.fspath(adapter)
    ckpt = read_foreign(src)
    bases = component_bases(ckpt, base_dir, component, single_file_kind_override=options.pop("single_file_kind", None))
    if any(isinstance(m, SingleFileBase) for m in bases.values()):
        ignored = [name for name in ("dtype", "max_shard_size", "allow_unused", "verify") if options.get(name)]
        if ignored:
            raise UnsupportedFeatureError(
                f"{ignored[0]} does not apply to a single-file checkpoint, which is written back as it is (its keys, dtypes and metadata)",
                path=base_dir, key=ignored[0], hint="drop the option",
            )
        return _merge_single_file(ckpt, bases, src, out, overwrite=overwrite, progress=options.get("progress"))
    adapters = {}
    for c, model in bases.items():
        check_component(ckpt, c, model)
        adapters[c] = component_adapter(ckpt, c, base_modules=base_module_paths(model.tensors), factors=True)
    summary = ForeignMergeSummary(output=os.path.abspath(os.fspath(out)), adapter=src, format=ckpt.format)
    if not is_pipeline(base_dir):
        (c, model), = bases.items()
        summary.components[c] = merge_to_directory(model, [adapters[c]], out, overwrite=overwrite, **options)
        summary.output = summary.components[c].output
        return summary
    clean_stale(out)
    target = check_output_path(out, [base_dir, src], overwrite=overwrite)
    summary.output = target
    with StagedDirectory(target, overwrite=overwrite) as staged:
        for entry in sorted(os.listdir(base_dir)):
            if entry in bases or entry in _SKIP:
                continue
            source, dest = os.path.join(base_dir, entry), os.path.join(staged.path, entry)
            if os.path.islink(source):
                raise OutputPathError("is a symbolic link; adapterfmt copies only plain files and folders", path=source)
            (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, dest)
            summary.copied.append(entry)
        for c, model in bases.items():
            summary.components[c] = merge_to_directory(model, [adapters[c]], os.path.join(staged.path, c), **options)
        staged.commit()
    for s in summary.components.values():
        s.output = os.path.join(target, os.path.basename(s.output))
    return summary


def _merge_single_file(ckpt: ForeignCheckpoint, bases: dict[str, BaseModel], src: str, out: "str | os.PathLike[str]", *,
                       overwrite: bool, progress: Any) -> ForeignMergeSummary:
    """Every component of ``ckpt`` into the one single-file checkpoint they share: the same file
    back (:func:`~adapterfmt.merging.engine.merge_to_file`), LoRAs on parts of fused tensors added
    to those rows only."""
    model = next(iter(bases.values()))
    assert isinstance(model, SingleFileBase)
    adapters, placed = [], {}
    for c, view in bases.items():
        check = check_component(ckpt, c, view)
        modules = ckpt.component_modules(c)
        if check.problems and not check.resolved:
            raise UnresolvedModulesError(f"{check.problems[0]} ({model.file})", path=ckpt.file, key=modules[0].name if modules else None,
                                         hint="give the base the LoRA was trained for")
        if check.unresolved:
            raise UnresolvedModulesError(
                f"{len(check.unresolved)} of {check.total} module names fit no tensor of {model.file} that diffusers' converter knows ({model.description})",
                path=ckpt.file, key=check.unresolved[0], hint="`adapterfmt inspect FILE --base CHECKPOINT` lists them",
            )
        misfit = next((m for m in modules if m.path is not None and m.weight_shape is not None and m.complete and not m.fits(m.weight_shape)), None)
        if misfit is not None:
            raise ShapeMismatchError(f"the {misfit.kind} product {list(misfit.product_shape() or ())} does not fit {misfit.path!r}, "
                                     f"whose weight is {list(misfit.weight_shape or ())} in {model.file}",
                                     path=ckpt.file, key=misfit.keys.get("diff", next(iter(misfit.keys.values()), misfit.name)), hint="the adapter is for another model")
        dora = [p for p in check.problems if "DoRA" in p]
        if dora:
            raise UnsupportedFeatureError(dora[0], path=ckpt.file)
        adapter = component_adapter(ckpt, c, base_modules=view.module_paths(), factors=True)
        adapters.append(adapter)
        placed[id(adapter)] = {}
        for m in modules:
            if m.path is None:
                continue
            if m.split is not None:  # one adapter module per part, each at its own place
                placed[id(adapter)].update({part: place for (part, _a, _b), place in zip(m.split, m.placement)})
            else:
                placed[id(adapter)][m.path] = m.placement
    summary = ForeignMergeSummary(output=os.path.abspath(os.fspath(out)), adapter=src, format=ckpt.format)

    def resolver(adapter: AdapterCheckpoint, _base: BaseModel) -> Resolution:
        return _single_file_resolution(adapter, placed[id(adapter)], model.tensors)

    merged = merge_to_file(model, adapters, out, resolver=resolver, overwrite=overwrite, progress=progress)
    merged.findings = list(merged.findings)
    summary.output = merged.output
    summary.copied = untouched_groups(model, adapters, placed)
    summary.components[", ".join(bases)] = merged  # one file: one merge for every component
    return summary


def _single_file_resolution(adapter: AdapterCheckpoint, placements: dict[str, Any], base_tensors: "dict[str, Any]") -> Resolution:
    """Each module of ``adapter`` bound to its placement in the single file (set by
    :func:`~adapterfmt.formats.diffusion.components.check_component`): the whole tensor, or rows of a fused one."""
    res = Resolution(adapter)
    for path, m in adapter.lora.items():
        place = placements.get(path)
        if place is None:
            res.unresolved.append(path)
            continue
        if m.factors is not None:
            layout = FACTORS
        else:
            a = m.tensors["lora_A"]
            layout = "linear" if len(a.shape) == 2 else "conv"
        bias = None
        if m.lora_bias:  # a ComfyUI .diff_b: the module's bias, whole
            bias = bias_key(split_param(place.key)[0])
            if place.rows is not None:
                raise UnsupportedFeatureError(
                    f"a .diff_b on {path!r}, part of the fused tensor {place.key}: adapterfmt adds a bias delta only to a whole bias",
                    path=adapter.weights_file, key=m.keys["lora_B.bias"], hint="give the delta under the fused tensor's own name, or merge into the diffusers folder",
                )
            if bias not in base_tensors:
                raise ShapeMismatchError(f"is a bias delta for {path!r}, whose weight {place.key} has no bias {bias!r} in the file",
                                         path=adapter.weights_file, key=m.keys["lora_B.bias"], hint="the delta is for another model")
        res.lora[path] = ResolvedLora(m, place.key, layout, bias, rows=place.rows, shape=place.shape if place.rows is not None else None)
    return res


def untouched_groups(model: SingleFileBase, adapters: list[AdapterCheckpoint], placed: dict[int, dict[str, Any]]) -> list[str]:
    """The parts of the single file no adapter changes, copied byte for byte: one line per top-level
    name group (``model_ema.*: 1130 tensors``, ``vae.*``, ``text_encoders.*``, the rest of the model)."""
    changed = {p.key for a in adapters for p in placed[id(a)].values() if p is not None}
    groups: dict[str, int] = {}
    for key in model.tensors:
        if key in changed:
            continue
        head = model.prefix.rstrip(".") if model.prefix and key.startswith(model.prefix) else key.split(".", 1)[0]
        groups[head] = groups.get(head, 0) + 1
    return [f"{g}.*: {n} tensors copied unchanged" for g, n in sorted(groups.items())]


def merge_peft_lycoris(base: "str | os.PathLike[str]", adapter: "str | os.PathLike[str]", out: "str | os.PathLike[str]", **options: Any) -> MergeSummary:
    """Merge a PEFT LOHA / LOKR adapter into a base as :func:`~adapterfmt.merging.engine.merge_to_directory`
    merges any adapter (``subfolder``: one component of a pipeline, the whole pipeline written);
    the result equals PEFT's ``merge_and_unload``."""
    return merge_to_directory(os.fspath(base), [peft_lycoris_checkpoint(adapter)], out, **options)
