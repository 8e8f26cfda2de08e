"""Which files of a base model hold its weights: one decision for every layout (docs/FORMAT.md §1.2).

A base comes as a transformers model directory, a diffusers model directory, a component of a
diffusers pipeline (``model_index.json`` + ``subfolder``), a sentence-transformers directory
(``modules.json``), or a loose weights file. :func:`decide_layout` picks the weight files exactly
as the library that owns the layout would load them, mirroring

- transformers ``modeling_utils._get_resolved_checkpoint_files`` (local folder): the config's
  ``transformers_weights``, then ``model.safetensors``, then ``model.safetensors.index.json``,
  then ``pytorch_model.bin``, then ``pytorch_model.bin.index.json``;
- diffusers ``ModelMixin.from_pretrained`` (``use_safetensors=None``):
  ``diffusion_pytorch_model.safetensors.index.json`` first (``_fetch_index_file``), then
  ``diffusion_pytorch_model.safetensors``, then ``diffusion_pytorch_model.bin``; shard names with
  a folder are refused (``_get_checkpoint_shard_files``);
- sentence-transformers: the ``models.Transformer`` entry of ``modules.json`` names the folder
  (``""`` for the top level) that transformers loads.

Every other candidate weight set in the folder (a stale index and its shards beside a single
file, ``.bin`` beside ``.safetensors``, the other library's names) is reported as
``shadowed-weights``, never read. The decision
works on a :class:`Tree` (a local folder or a Hub listing) and reads only small JSON files.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..checkpoint.finding import Finding
from ..checkpoint.findings import shadowed_weights_finding
from ..errors import CheckpointNotFoundError, InvalidConfigError, ShardIndexError, UnsafeFileError, UnsupportedFeatureError
from ..sources.file_tree import SubTree, Tree
from ..sources.file_tree import join_path as _join
from ..sources.file_tree import rel_path as _rel

TRANSFORMERS = "transformers"
DIFFUSERS = "diffusers"

#: (single file, index, pickle file, pickle index) per library, in the libraries' own names.
WEIGHT_NAMES = {
    TRANSFORMERS: ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    DIFFUSERS: (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.bin.index.json",
    ),
}
PIPELINE_INDEX = "model_index.json"
SENTENCE_MODULES = "modules.json"
CONFIG = "config.json"
#: Files that belong to the model of a loose weights file (copied beside the merged file).
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
#: Weight-file endings: such files of the component folder are never copied into a merge output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".ot", ".npz")
#: Folders of exported copies of the same weights (ONNX, OpenVINO) in a model folder: a merge
#: would leave them unmerged, so they are not copied.
EXPORT_DIRS = ("onnx", "openvino")
#: Adapter files: never copied from a base.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class BaseLayout:
    """Where a base model's weights are, and what kind of directory holds them.

    Attributes:
        kind: ``transformers``, ``diffusers``, ``sentence-transformers``, ``diffusers-pipeline``
            (a component of a pipeline) or ``file`` (a loose weights file).
        library: whose loader and file names apply: ``transformers`` or ``diffusers``.
        root: the folder the merge output mirrors (the model, the whole pipeline, or the loose
            file's folder).
        component: the folder of the weights relative to ``root`` (``""`` at the top level).
        weights: the weight files relative to the component folder, in index order.
        index: the index file relative to the component folder; None for a single file.
        pickle: the weights are ``torch.save`` pickles (read only with ``allow_pickle``).
        loose_file: the weights file as given, for a loose file.
        shadowed: other weight files of the component folder that the library ignores.
        findings: ``shadowed-weights`` warnings.
    """

    kind: str
    library: str
    root: str
    component: str
    weights: tuple[str, ...]
    index: Optional[str] = None
    pickle: bool = False
    loose_file: Optional[str] = None
    shadowed: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def directory(self) -> str:
        """The component folder (where ``weights`` are)."""
        return _join(self.root, self.component)

    @property
    def single_name(self) -> str:
        """This library's single-file name (a merged loose file gets it)."""
        return WEIGHT_NAMES[self.library][0]

    @property
    def index_name(self) -> str:
        """This library's safetensors index name."""
        return WEIGHT_NAMES[self.library][1]

    def files_to_copy(self, tree: Tree) -> list[str]:
        """Files under ``root`` (relative to it) that a merge output copies unchanged.

        Everything except: the component's weights, index and shadowed weight sets, any other
        weight file directly in the component folder, its exported copies (``onnx/``,
        ``openvino/``: they would stay unmerged), adapter files and adapter sub-folders of the
        component, version-control and cache folders. For a loose file only that model's own
        side files (:data:`MODEL_SIDE_FILES`).
        """
        if self.kind == "file":
            return [n for n in MODEL_SIDE_FILES if tree.is_file(n)]
        prefix = self.component + "/" if self.component else ""
        dropped = {prefix + w for w in self.weights} | {prefix + s for s in self.shadowed}
        if self.index:
            dropped.add(prefix + self.index)
        skipped_dirs = {posixpath.dirname(f) for f in tree.walk(self.component) if posixpath.basename(f) == ADAPTER_FILES[0]}
        skipped_dirs |= {prefix + d for d in EXPORT_DIRS}
        out = []
        for rel in tree.walk():
            if rel in dropped:
                continue
            folder, name = posixpath.split(rel)
            in_component = folder == self.component
            if in_component and (name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") or name in ADAPTER_FILES):
                continue
            if any(folder == d or folder.startswith(d + "/") for d in skipped_dirs if d != self.component):
                continue
            out.append(rel)
        return out


def decide_layout(tree: Tree, *, subfolder: Optional[str] = None, allow_pickle: bool = False) -> BaseLayout:
    """The layout of the model folder ``tree`` (component ``subfolder`` of a pipeline or repo).

    Raises:
        CheckpointNotFoundError: no weights the owning library would load; a pipeline without a
            component chosen.
        UnsafeFileError: the weights are a pickle and ``allow_pickle`` is false.
        ShardIndexError: an index names shards outside the folder, or (diffusers) in a sub-folder.
        UnsupportedFeatureError: sharded pickles.
    """
    component = _clean_subfolder(subfolder, tree.root)
    kind = None
    if tree.is_file(PIPELINE_INDEX):
        if not component:
            raise CheckpointNotFoundError(
                "is a diffusers pipeline (model_index.json)",
                path=tree.root,
                hint=f"choose a component with --base-subfolder (merge: --subfolder; Python: subfolder=): "
                f"{', '.join(pipeline_components(tree)) or 'none has weights'}",
            )
        kind = "diffusers-pipeline"
    elif not component and tree.is_file(SENTENCE_MODULES):
        component = _sentence_transformer_folder(tree)
        kind = "sentence-transformers"
    if component and not tree.is_dir(component):
        raise CheckpointNotFoundError("has no such sub-folder", path=_join(tree.root, component))
    root, folder = tree.root, component
    if kind is None and component:  # a model in a sub-folder of a plain repo: that folder is the model
        tree, folder = SubTree(tree, component), ""
        root = tree.root
    config = tree.json(_rel(folder, CONFIG)) or {}
    library = _library(tree, folder, config, pipeline=kind == "diffusers-pipeline")
    kind = kind or library
    chosen, candidates = _candidates(tree, folder, library, config)
    if chosen is None:
        raise _no_weights(tree, folder, library)
    name, is_index, is_pickle = chosen
    if is_pickle and is_index:
        raise UnsupportedFeatureError(
            f"holds sharded pickle weights ({name})", path=_where(tree, folder), hint="convert the model to safetensors first"
        )
    if is_pickle and not allow_pickle:
        raise UnsafeFileError(
            f"holds only pickle weights ({name}), which can run code when loaded",
            path=_where(tree, folder),
            hint="pass --allow-pickle (allow_pickle=True; read with torch.load(weights_only=True)) or convert it to safetensors",
        )
    weights = tuple(_index_shards(tree, folder, name, library)) if is_index else (name,)
    shadowed = tuple(c for c in candidates if c != name and c not in weights)
    findings = _shadowed_findings(_where(tree, folder), library, name, shadowed)
    return BaseLayout(kind, library, root, component if kind in ("diffusers-pipeline", "sentence-transformers") else "",
                      weights, name if is_index else None, is_pickle, None, shadowed, findings)


def loose_file_layout(path: str, *, allow_pickle: bool = False) -> BaseLayout:
    """The layout of a loose weights file given by path (any name); its folder's ``config.json``
    tells transformers from diffusers (``_class_name``).

    Raises:
        UnsafeFileError: a pickle file without ``allow_pickle``.
        CheckpointNotFoundError: not a ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file.
    """
    folder, name = os.path.split(path)
    folder = folder or "."
    is_pickle = name.endswith((".bin", ".pt", ".pth"))
    if not name.endswith(".safetensors") and not is_pickle:
        raise CheckpointNotFoundError("is not a weights file; give a model directory or a .safetensors file", path=path)
    if is_pickle and not allow_pickle:
        raise UnsafeFileError(
            "is a pickle file, which can run code when loaded",
            path=path,
            hint="pass --allow-pickle (read with torch.load(weights_only=True)) or convert it to safetensors",
        )
    config = Tree(folder).json(CONFIG) or {}
    library = DIFFUSERS if _is_diffusers_config(config) else TRANSFORMERS
    return BaseLayout("file", library, folder, "", (name,), None, is_pickle, path)


def pipeline_components(tree: Tree) -> list[str]:
    """The components of a diffusers pipeline (``model_index.json`` entries whose folder holds weights)."""
    doc = tree.json(PIPELINE_INDEX) or {}
    out = []
    for name, value in sorted(doc.items()):
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        names = tree.names(name)
        if any(n in names for lib in WEIGHT_NAMES.values() for n in lib):
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# THE PRECEDENCE RULES
# ---------------------------------------------------------------------------------------------


def _candidates(tree: Tree, folder: str, library: str, config: dict[str, Any]) -> tuple[Optional[tuple[str, bool, bool]], list[str]]:
    """The file the library loads as ``(name, is_index, is_pickle)``, and every candidate present."""
    single, index, pickle, pickle_index = WEIGHT_NAMES[library]
    if library == TRANSFORMERS:
        order = [(single, False, False), (index, True, False), (pickle, False, True), (pickle_index, True, True)]
        explicit = config.get("transformers_weights")
        if isinstance(explicit, str) and explicit:
            if os.path.isabs(explicit) or ".." in explicit.replace("\\", "/").split("/"):
                raise UnsafeFileError(f"transformers_weights {explicit!r} points outside the model folder", path=_where(tree, folder))
            order.insert(0, (explicit, explicit.endswith(".index.json"), explicit.endswith(".bin")))
    else:  # diffusers looks for the index first
        order = [(index, True, False), (single, False, False), (pickle, False, True)]
    present = [o for o in order if tree.is_file(_rel(folder, o[0]))]
    other_library = [n for lib, files in WEIGHT_NAMES.items() if lib != library for n in files if tree.is_file(_rel(folder, n))]
    candidates = [p[0] for p in present] + other_library
    for name in list(candidates):
        if name.endswith(".index.json") and (not present or name != present[0][0]):
            candidates += _stale_shards(tree, folder, name)
    return (present[0] if present else None), list(dict.fromkeys(candidates))


def _stale_shards(tree: Tree, folder: str, index: str) -> list[str]:
    """The shards an index that is not read names (best effort: a broken one names none)."""
    try:
        weight_map = (tree.json(_rel(folder, index)) or {}).get("weight_map")
    except InvalidConfigError:
        return []
    if not isinstance(weight_map, dict):
        return []
    return [v for v in dict.fromkeys(weight_map.values()) if isinstance(v, str) and tree.is_file(_rel(folder, v))]


def _library(tree: Tree, folder: str, config: dict[str, Any], *, pipeline: bool) -> str:
    """diffusers for a pipeline component or a diffusers config (``_class_name``), or when only
    diffusers weight names are present; transformers otherwise."""
    if _is_diffusers_config(config):
        return DIFFUSERS
    names = set(tree.names(folder))
    has = {lib: bool(names & set(files)) for lib, files in WEIGHT_NAMES.items()}
    if has[DIFFUSERS] and not has[TRANSFORMERS]:
        return DIFFUSERS
    if pipeline and not has[TRANSFORMERS]:
        return DIFFUSERS
    return TRANSFORMERS


def _is_diffusers_config(config: dict[str, Any]) -> bool:
    return "_class_name" in config or "_diffusers_version" in config


def _index_shards(tree: Tree, folder: str, index: str, library: str) -> list[str]:
    """The shard names an index maps to, in first-seen order, checked to stay inside the folder."""
    path = _rel(folder, index)
    try:
        doc = tree.json(path)
    except InvalidConfigError:
        raise ShardIndexError("is not valid JSON", path=_join(tree.root, path), hint="re-download the model") from None
    weight_map = (doc or {}).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ShardIndexError("has no 'weight_map' of key -> shard file", path=_join(tree.root, path), key="weight_map")
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        parts = shard.replace("\\", "/").split("/")
        if os.path.isabs(shard) or shard.startswith("/") or ".." in parts:
            raise ShardIndexError(f"names shard {shard!r} outside the model directory", path=_join(tree.root, path),
                                  key=shard, hint="refusing to read it")
        if library == DIFFUSERS and len(parts) > 1:
            raise ShardIndexError(f"names shard {shard!r} in a sub-folder, which diffusers refuses to load",
                                  path=_join(tree.root, path), key=shard, hint="move the shards next to the index")
    return shards


def _sentence_transformer_folder(tree: Tree) -> str:
    """The folder of the ``models.Transformer`` module in ``modules.json`` (``""``: the top level)."""
    doc = tree.load_json(SENTENCE_MODULES)
    entries = [e for e in doc if isinstance(e, dict)] if isinstance(doc, list) else []
    paths = [str(e.get("path") or "") for e in entries if str(e.get("type", "")).endswith("models.Transformer")]
    if len(paths) != 1:
        raise InvalidConfigError(
            f"has {len(paths)} models.Transformer modules; expected one", path=_join(tree.root, SENTENCE_MODULES),
            hint="give the folder of the transformer module as the base",
        )
    return _clean_subfolder(paths[0], tree.root)


def _shadowed_findings(where: str, library: str, chosen: str, shadowed: Sequence[str]) -> tuple[Finding, ...]:
    return (shadowed_weights_finding(where, library, chosen, shadowed),) if shadowed else ()


def _no_weights(tree: Tree, folder: str, library: str) -> CheckpointNotFoundError:
    single, index = WEIGHT_NAMES[library][:2]
    found = [n for n in tree.names(folder) if n.endswith(WEIGHT_SUFFIXES)]
    if found:
        hint = f"found {found[0]}: give that file as the base (a loose file), or convert it to safetensors"
    elif tree.is_file(_rel(folder, "adapter_config.json")):
        hint = "this is an adapter directory, not a base model"
    else:
        hint = "is this a model directory?"
    return CheckpointNotFoundError(f"has no {single} or {index}", path=_where(tree, folder), hint=hint)


# ---------------------------------------------------------------------------------------------
# SMALL HELPERS
# ---------------------------------------------------------------------------------------------


def _where(tree: Tree, folder: str) -> str:
    return _join(tree.root, folder)


def _clean_subfolder(subfolder: Optional[str], root: str) -> str:
    if not subfolder:
        return ""
    parts = [p for p in subfolder.replace("\\", "/").split("/") if p not in ("", ".")]
    if os.path.isabs(subfolder) or ".." in parts:
        raise UnsafeFileError(f"subfolder {subfolder!r} points outside the model", path=root)
    return "/".join(parts)


__all__ = [
    "BaseLayout",
    "DIFFUSERS",
    "MODEL_SIDE_FILES",
    "TRANSFORMERS",
    "WEIGHT_NAMES",
    "decide_layout",
    "loose_file_layout",
    "pipeline_components",
]
