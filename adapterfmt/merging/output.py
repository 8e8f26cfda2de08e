"""What the merged output directory looks like, and writing it (besides the streamed shard bytes).

The output is the same kind of directory as the base (docs/FORMAT.md §1.3): for the base's
layout (:class:`~adapterfmt.base.layouts.BaseLayout`) the same weight file names, shard layout and
index name (a loose or pickle file becomes that library's single-file name), the weights in the
same folder (a pipeline component's), and every other file and folder of the base copied
(:func:`output_names`, :func:`side_files`).

Decided from headers (called by :func:`~adapterfmt.merging.plan.plan_merge`): the shard layout
(:func:`layout_shards`), the index (:func:`index_document`), config.json when it must change
(:func:`changed_config`) and the base's side files copied as they are (:func:`side_files`).
Written and checked (called by :mod:`adapterfmt.merging.engine`): each shard's header
(:func:`shard_specs`), every file's size for the free-space check, the side files, config.json
and index (:func:`write_side_files`), and the staged output against the plan (:func:`verify_output`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Protocol, Sequence

from ..base.layouts import WEIGHT_SUFFIXES
from ..base.reading import BaseModel
from ..constants import DTYPE_BITS, MODEL_CONFIG_FILE, SAFETENSORS_INDEX_FILE, SAFETENSORS_WEIGHTS_FILE, SAFETENSORS_WEIGHTS_FILE_PATTERN
from ..errors import AdapterFormatError, MergeError
from ..sources.file_tree import Tree
from ..sources.paths import safe_join
from ..storage.header import read_header
from ..storage.safetensors_stream import TensorSpec, file_size
from ..storage.staging import copy_file, write_text

#: safetensors metadata of every merged shard (what ``save_pretrained`` writes).
METADATA = {"format": "pt"}
#: safetensors dtype -> the ``dtype`` value transformers writes in config.json.
CONFIG_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class OutputTensor(Protocol):
    """What the layout needs of a planned tensor (:class:`~adapterfmt.merging.plan.PlannedTensor`)."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class OutputNames:
    """Where the merged weights go inside OUT and what they are called.

    Attributes:
        root: the base folder the output mirrors; side files are copied from it.
        component: the folder of the weights inside OUT (``""``: the top level; ``unet`` for a
            pipeline component).
        single: the one-file name (``model.safetensors``, ``diffusion_pytorch_model.safetensors``).
        index: the index file name, in the component folder.
        pattern: the re-sharding name pattern (``model{suffix}.safetensors``).
    """

    root: str
    component: str = ""
    single: str = SAFETENSORS_WEIGHTS_FILE
    index: str = SAFETENSORS_INDEX_FILE
    pattern: str = SAFETENSORS_WEIGHTS_FILE_PATTERN

    def path(self, name: str) -> str:
        """``name`` (relative to the component folder) relative to OUT, with ``/``."""
        return f"{self.component}/{name}" if self.component else name


def output_names(base: BaseModel) -> OutputNames:
    """The output naming for ``base``'s layout (transformers names for a state dict in memory)."""
    layout = base.layout
    if layout is None:
        return OutputNames(base.directory)
    single = layout.single_name
    index = layout.index or layout.index_name
    return OutputNames(layout.root, layout.component, single, index, single.replace(".safetensors", "{suffix}.safetensors"))


@dataclass
class ShardPlan:
    """One output safetensors file: its name and tensors in write order."""

    name: str
    tensors: "list[OutputTensor]"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def index_document(shards: Sequence[ShardPlan], base_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model.safetensors.index.json`` document (keys sorted, as transformers writes them)."""
    metadata = {k: v for k, v in base_metadata.items() if k not in ("total_size", "total_parameters")}
    if "total_parameters" in base_metadata:
        metadata["total_parameters"] = sum(math.prod(t.shape) for s in shards for t in s.tensors)
    metadata["total_size"] = sum(s.nbytes for s in shards)
    weight_map = {t.key: s.name for s in shards for t in s.tensors}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def shard_specs(tensors: "Sequence[OutputTensor]") -> list[TensorSpec]:
    return [TensorSpec(t.key, t.dtype, t.shape) for t in tensors]


def output_sizes(shards: Sequence[ShardPlan], base_directory: str, files: Sequence[str], index: Optional[dict[str, Any]]) -> list[int]:
    """Bytes of every output file (the index and a rewritten config.json are counted as copied)."""
    sizes = [file_size(shard_specs(s.tensors), METADATA) for s in shards]
    sizes += [os.path.getsize(os.path.join(base_directory, *f.split("/"))) for f in files]
    return sizes + ([len(json.dumps(index, indent=2)) + 1] if index is not None else [])


def write_side_files(
    directory: str,
    base_directory: str,
    files: Sequence[str],
    config: Optional[dict[str, Any]],
    index: Optional[dict[str, Any]],
    names: Optional[OutputNames] = None,
) -> list[str]:
    """Copy the base's non-weight ``files`` (paths relative to ``base_directory``, sub-folders
    made as needed), write the component's config.json (if changed) and the index; fsync all.

    Returns the paths written, relative to ``directory``."""
    names = names or OutputNames(base_directory)
    config_path = names.path(MODEL_CONFIG_FILE)
    written = []
    for name in files:
        target = os.path.join(directory, *name.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if name == config_path and config is not None:
            write_text(target, json.dumps(config, indent=2) + "\n")
        else:
            copy_file(os.path.join(base_directory, *name.split("/")), target)
        written.append(name)
    if index is not None:
        target = os.path.join(directory, *names.path(names.index).split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        write_text(target, json.dumps(index, indent=2) + "\n")
        written.append(names.path(names.index))
    return written


def shard_path(directory: str, names: OutputNames, shard: str) -> str:
    """Where shard ``shard`` of the plan is written under ``directory`` (its folder is made)."""
    path = os.path.join(directory, *names.path(shard).split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def verify_output(directory: str, shards: Sequence[ShardPlan], target: str, names: Optional[OutputNames] = None) -> None:
    """:func:`adapterfmt.reports.verify.verify_directory` on the staged output, then each shard's header
    against the plan (keys in order, dtypes, shapes, metadata).

    Raises:
        MergeError: the first problem (the staged output is then removed, ``out`` never appears).
    """
    from ..reports.verify import verify_directory

    problems = [f.message for f in verify_directory(directory)]
    for shard in shards:
        try:
            header = read_header(os.path.join(directory, *(names.path(shard.name) if names else shard.name).split("/")))
        except AdapterFormatError as e:
            problems.append(str(e))
            continue
        got = [(k, i.dtype, i.shape) for k, i in header.tensors.items()]
        want = [(t.key, t.dtype, t.shape) for t in shard.tensors]
        if got != want or dict(header.metadata) != METADATA:
            problems.append(f"{shard.name}: its header does not match the merge plan")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MergeError(f"the merged output failed verification: {problems[0]}{more}", path=target, hint="nothing was written; please report this")


def layout_shards(
    base: BaseModel, planned: Mapping[str, "OutputTensor"], extra: dict[str, str], max_shard_size: "int | str | None"
) -> tuple[list[ShardPlan], bool]:
    """Shards in write order, and whether an index is written.

    Default: the base's shard files (relative to its weights folder) and key order, a new head
    key placed after its embedding; a loose or pickle file becomes the layout's single-file name.
    Within a file, tensors keep the base's byte order (so untouched runs copy in one call), moved
    only to keep wider dtypes first as safetensors does for alignment.
    """
    follows: dict[str, list[str]] = {}
    for new, after in extra.items():
        follows.setdefault(after, []).append(new)
    shard_order = sorted(base.shards)
    ordered: list[tuple[str, list[str]]] = []
    for shard in shard_order:
        keys: list[str] = []
        for key in sorted(base.shard_keys[shard], key=lambda k: base.tensors[k].start):
            keys.append(key)
            keys += follows.get(key, [])
        ordered.append((shard, keys))
    names = output_names(base)
    if max_shard_size is None:
        layout = base.layout
        if layout is None:  # a state dict in memory, or a base built by hand
            index = os.path.join(base.directory, SAFETENSORS_INDEX_FILE)
            indexed = len(base.shards) > 1 or bool(base.directory) and base.shards[0] != SAFETENSORS_WEIGHTS_FILE and os.path.isfile(index)
        else:
            indexed = layout.index is not None
            if not indexed:  # a loose or pickle file gets the layout's standard name
                ordered = [(names.single, keys) for _, keys in ordered]
        return [ShardPlan(name, aligned([planned[k] for k in keys])) for name, keys in ordered if keys], indexed
    from huggingface_hub import split_state_dict_into_shards_factory

    flat = {k: planned[k] for _, keys in ordered for k in keys}
    try:
        split = split_state_dict_into_shards_factory(
            flat, get_storage_size=lambda t: t.nbytes, filename_pattern=names.pattern, max_shard_size=max_shard_size
        )
    except ValueError as e:
        raise MergeError(f"is not a size ({e})", key=str(max_shard_size), hint="write it like 5GB, 500MB or a number of bytes") from None
    shards = [ShardPlan(name, aligned([flat[k] for k in keys])) for name, keys in split.filename_to_tensors.items()]
    return shards, len(shards) > 1


def aligned(tensors: "list[OutputTensor]") -> "list[OutputTensor]":
    """Wider dtypes first, as safetensors orders a file for alignment (stable: byte order kept otherwise)."""
    return sorted(tensors, key=lambda t: -DTYPE_BITS[t.dtype])


def changed_config(config: dict[str, Any], *, untie: bool, dtype: Optional[str]) -> Optional[dict[str, Any]]:
    """The changed ``config.json``, or None when it is copied as it is."""
    if not config or not (untie or dtype):
        return None
    doc = copy.deepcopy(config)
    inner = doc.get("text_config") if isinstance(doc.get("text_config"), dict) else None
    if untie:
        doc["tie_word_embeddings"] = False
        if inner is not None:
            inner["tie_word_embeddings"] = False
    if dtype:
        name = CONFIG_DTYPES[dtype]
        fields = [f for f in ("dtype", "torch_dtype") if f in doc] or ["dtype"]
        for f in fields:
            doc[f] = name
        for f in ("dtype", "torch_dtype"):
            if inner is not None and f in inner:
                inner[f] = name
    return doc


def side_files(base: BaseModel) -> list[str]:
    """Files of the base that the output copies, relative to the folder it mirrors (``/``-separated).

    Every file and folder of the base except its weights, index, shadowed weight sets, adapter
    files and folders, ``.git`` and caches; for a loose file only that model's own side files
    (:meth:`~adapterfmt.base.layouts.BaseLayout.files_to_copy`).

    Raises:
        UnsafeFileError: one is a symlink that resolves outside the model directory.
    """
    if not base.directory:  # a state dict in memory
        return []
    if base.layout is None:
        return _top_level_side_files(base.directory)
    root = base.layout.root
    out = base.layout.files_to_copy(Tree(root))
    for name in out:
        safe_join(root, name)  # a symlink out of the model directory is not followed
    return out


def _top_level_side_files(directory: str) -> list[str]:
    out: list[str] = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if name == SAFETENSORS_INDEX_FILE or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        safe_join(directory, name)  # a symlink out of the model directory is not followed
        out.append(name)
    return out
