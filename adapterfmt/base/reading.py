"""A base model read from headers only, in any layout users have (docs/FORMAT.md §1.2).

``read_base(path_or_id)`` -> :class:`BaseModel` with every tensor's file, dtype, shape and byte
range, the layout (which files, which library's names, for the merge to reproduce) and the
tied-weight facts. Which files hold the weights is decided in :mod:`adapterfmt.base.layouts`;
Hub bases are read by range request (:mod:`adapterfmt.sources.hub_base`); quantized bases are refused
(:mod:`adapterfmt.base.quantized`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..checkpoint.finding import Finding
from ..checkpoint.keys import weight_key, weight_module
from ..constants import MODEL_CONFIG_FILE, SAFETENSORS_WEIGHTS_FILE
from ..errors import CheckpointNotFoundError, InvalidConfigError, ShardIndexError
from ..sources.file_tree import Tree
from ..sources.paths import looks_like_hub_id, safe_join
from ..storage.gc_pause import with_gc_paused
from ..storage.header import SafetensorsHeader, TensorInfo, read_header
from .layouts import BaseLayout, decide_layout, loose_file_layout
from .quantized import refuse_quantized

#: Tied heads of model classes transformers does not know (remote code): the output head, the
#: last name segment of input embeddings, and the architecture-name suffixes that have such a head.
_OUTPUT_EMBEDDING = "lm_head"
_INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
_LM_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass
class BaseModel:
    """A base model's layout, from headers.

    Attributes:
        directory: local folder of the weights (for a pipeline, the component's folder); for a
            Hub base read from headers, its ``hf://repo@commit/folder`` location.
        config: decoded ``config.json`` (``{}`` if absent).
        tensors: key -> :class:`TensorInfo` over all shards.
        shards: weight file names relative to ``directory``, in index order (one for a single file).
        shard_keys: shard file name -> keys in header order.
        index_metadata: the index's ``metadata`` (``{}`` for a single file).
        tied: module -> module it shares its weight with (e.g. ``lm_head`` -> ``model.embed_tokens``).
        layout: which kind of directory this is and which files hold the weights
            (:class:`~adapterfmt.base.layouts.BaseLayout`).
        findings: warnings about the base (``shadowed-weights``).
        remote: ``repo@commit`` for a Hub base read from headers only (its bytes are not local).
        tensors_in_memory: key -> tensor, only for pickle weights (``allow_pickle``).
    """

    directory: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    shards: list[str]
    shard_keys: dict[str, list[str]]
    index_metadata: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    layout: Optional[BaseLayout] = None
    findings: list[Finding] = field(default_factory=list)
    remote: Optional[str] = None
    tensors_in_memory: dict[str, Any] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """Written with an index (several files, or one file the index names)."""
        if self.layout is not None:
            return self.layout.index is not None
        return len(self.shards) > 1 or os.path.basename(self.shards[0]) != SAFETENSORS_WEIGHTS_FILE

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@with_gc_paused
def read_base(
    path: "str | os.PathLike[str]",
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    allow_pickle: bool = False,
    download: bool = False,
) -> BaseModel:
    """Read a base model (folder, loose weights file or Hub id) from its headers.

    The weight files are the ones the owning library would load (docs/FORMAT.md §1.2,
    :func:`~adapterfmt.base.layouts.decide_layout`): transformers, diffusers, a diffusers pipeline
    component (``subfolder``), sentence-transformers, or a loose ``.safetensors`` file.

    Args:
        path: a local folder or weights file, or a Hub repo id.
        revision: Hub revision (branch, tag or commit).
        subfolder: a component of a diffusers pipeline, or a folder inside the repo.
        allow_pickle: permit ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin`` weights
            (read with ``torch.load(weights_only=True)``; imports torch).
        download: for a Hub id, download the files a merge needs through the cache instead of
            reading headers by range request.

    Raises:
        CheckpointNotFoundError: no model weights there.
        UnsafeFileError: only pickle weights and ``allow_pickle`` is false.
        UnsupportedFeatureError: a quantized base, or sharded pickles.
        ShardIndexError: the index is not valid JSON, names a shard outside the directory or a
            missing shard, or maps a key its shard does not hold.
        HeaderError: a shard's header is damaged.
    """
    spec = os.fspath(path)
    if os.path.isfile(spec):
        layout = loose_file_layout(spec, allow_pickle=allow_pickle)
        base = _read_local(layout)
    elif os.path.exists(spec):
        if not os.path.isdir(spec):
            raise CheckpointNotFoundError("is not a directory or a weights file", path=spec)
        base = _read_local(decide_layout(Tree(spec), subfolder=subfolder, allow_pickle=allow_pickle))
    elif not looks_like_hub_id(spec):
        raise CheckpointNotFoundError("no such model directory or file", path=spec)
    else:
        base = _read_hub(spec, revision=revision, subfolder=subfolder, allow_pickle=allow_pickle, download=download)
    refuse_quantized(base.config, base.tensors, path=base.directory)
    base.tied = _tied_modules(base)
    return base


def _read_local(layout: BaseLayout) -> BaseModel:
    directory = layout.directory
    config = _read_model_config(directory)
    headers: dict[str, SafetensorsHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    shard_keys: dict[str, list[str]] = {}
    metadata: dict[str, Any] = {}
    in_memory: dict[str, Any] = {}
    if layout.pickle:
        from ..storage.torch_io import read_pickle_weights  # the one reading path that imports torch

        name = layout.weights[0]
        file = layout.loose_file or safe_join(directory, name, what="weights file")
        headers[name], in_memory = read_pickle_weights(file)
        shard_keys[name] = list(headers[name].tensors)
        tensors.update(headers[name].tensors)
    elif layout.index is not None:
        index_path = os.path.join(directory, layout.index)
        weight_map, metadata = _read_index(index_path)
        for shard in layout.weights:
            headers[shard] = read_header(safe_join(directory, shard, what="shard"))
        _check_index(index_path, weight_map, headers)
        for shard in layout.weights:
            shard_keys[shard] = list(headers[shard].tensors)
            tensors.update(headers[shard].tensors)
    else:
        name = layout.weights[0]
        file = layout.loose_file or safe_join(directory, name, what="weights file")
        headers[name] = read_header(file)
        shard_keys[name] = list(headers[name].tensors)
        tensors.update(headers[name].tensors)
    return BaseModel(
        directory, config, tensors, list(layout.weights), shard_keys, metadata, headers,
        layout=layout, findings=list(layout.findings), tensors_in_memory=in_memory,
    )


def _read_hub(spec: str, *, revision: Optional[str], subfolder: Optional[str], allow_pickle: bool, download: bool) -> BaseModel:
    from ..sources import hub_base

    if hub_base.is_offline():
        root = hub_base.cached_snapshot(spec, revision=revision)
        return _read_local(decide_layout(Tree(root), subfolder=subfolder, allow_pickle=allow_pickle))
    tree, sha = hub_base.remote_tree(spec, revision=revision)
    layout = decide_layout(tree, subfolder=subfolder, allow_pickle=allow_pickle)
    prefix = layout.component + "/" if layout.component else ""
    if download or layout.pickle:
        wanted = [prefix + w for w in layout.weights] + ([prefix + layout.index] if layout.index else [])
        root = hub_base.download(spec, revision, wanted + layout.files_to_copy(tree))
        return _read_local(decide_layout(Tree(root), subfolder=subfolder, allow_pickle=allow_pickle))
    config = tree.json(prefix + MODEL_CONFIG_FILE) or {}
    metadata: dict[str, Any] = {}
    if layout.index is not None:
        metadata = (tree.json(prefix + layout.index) or {}).get("metadata") or {}
    remote = hub_base.remote_headers(spec, sha, [prefix + w for w in layout.weights])
    headers = {w: remote[prefix + w] for w in layout.weights}
    tensors: dict[str, TensorInfo] = {}
    for h in headers.values():
        tensors.update(h.tensors)
    return BaseModel(
        layout.directory, config if isinstance(config, dict) else {}, tensors, list(layout.weights),
        {w: list(h.tensors) for w, h in headers.items()}, metadata if isinstance(metadata, dict) else {}, headers,
        layout=layout, findings=list(layout.findings), remote=f"{spec}@{sha}",
    )


def _check_index(index_path: str, weight_map: dict[str, str], headers: dict[str, SafetensorsHeader]) -> None:
    """Every index entry is in its shard, and every shard key is indexed to that shard."""
    for key, shard in weight_map.items():
        if key not in headers[shard].tensors:
            raise ShardIndexError(
                f"the index maps it to {shard}, which does not hold it", path=index_path, key=key, hint="the index and shards disagree; re-download the model"
            )
    for shard, header in headers.items():
        extra = [k for k in header.tensors if weight_map.get(k) != shard]
        if extra:
            raise ShardIndexError(
                f"shard {shard} holds it but the index does not map it there", path=index_path, key=extra[0], hint="the index and shards disagree"
            )


def _read_model_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidConfigError("is not valid JSON", path=path, hint="fix or re-download the model config") from None
    if not isinstance(doc, dict):
        raise InvalidConfigError("is not a JSON object", path=path)
    return doc


def _read_index(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ShardIndexError("is not valid JSON", path=path, hint="re-download the model") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ShardIndexError("has no 'weight_map' of key -> shard file", path=path, key="weight_map")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ShardIndexError("'metadata' is not an object", path=path, key="metadata")
    for shard in set(weight_map.values()):
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise ShardIndexError(f"names shard {shard!r} outside the model directory", path=path, key=shard, hint="refusing to read it")
        if not os.path.isfile(os.path.join(os.path.dirname(path), shard)):
            raise ShardIndexError(f"names shard {shard!r}, which does not exist", path=path, key=shard, hint="the download is incomplete")
    return weight_map, metadata


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def _tied_modules(base: BaseModel) -> dict[str, str]:
    """Tied module -> module whose weight it uses (e.g. ``{"lm_head": "model.embed_tokens"}``), on-disk names.

    From the model class's tied-weight declarations and ``tie_word_embeddings``
    (:func:`adapterfmt.tables.architectures.tied_modules`, generated from transformers). Only for a class
    transformers does not know (remote code) the old rule applies: an architecture with a
    language-model head, no ``lm_head.weight`` stored and exactly one input embedding tensor.
    """
    from ..tables.architectures import architecture_of, tied_modules

    arch = architecture_of(base.config)
    if arch is not None and (arch.tied_params or arch.class_name and _known_class(arch.class_name)):
        return tied_modules(base.config, base.tensors)
    cfg = base.config
    text = _text_config(cfg)
    if not cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True)):
        return {}
    architectures = cfg.get("architectures") or []
    if not any(str(a).endswith(_LM_HEAD_ARCHITECTURES) for a in architectures):
        return {}
    if weight_key(_OUTPUT_EMBEDDING) in base.tensors:
        return {}
    modules = [weight_module(k) for k in base.tensors]
    embeddings = [m for m in modules if m is not None and m.rsplit(".", 1)[-1] in _INPUT_EMBEDDING_NAMES]
    return {_OUTPUT_EMBEDDING: embeddings[0]} if len(embeddings) == 1 else {}


def _known_class(name: str) -> bool:
    from ..tables.architectures import tables

    return name in tables()["classes"]
