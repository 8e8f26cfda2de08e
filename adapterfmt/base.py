"""A base model read from headers only: ``config.json`` plus single-file or sharded safetensors.

``read_base(path_or_id)`` -> :class:`BaseModel` with every tensor's file, dtype, shape and byte
range, the shard layout (for the merge to reproduce) and the tied-weight facts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .constants import MODEL_CONFIG_FILE, SAFETENSORS_INDEX_FILE, SAFETENSORS_WEIGHTS_FILE
from .errors import CheckpointNotFoundError, InvalidConfigError, ShardIndexError
from .header import SafetensorsHeader, TensorInfo, read_header
from .keys import weight_key, weight_module
from .sources import MODEL_PATTERNS, resolve_dir, safe_join

#: Tied heads (transformers conventions): the output head, the last name segment of input
#: embeddings, and the architecture-name suffixes that have such a head.
_OUTPUT_EMBEDDING = "lm_head"
_INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")
_LM_HEAD_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass
class BaseModel:
    """A base model's layout, from headers.

    Attributes:
        directory: local directory.
        config: decoded ``config.json`` (``{}`` if absent).
        tensors: key -> :class:`TensorInfo` over all shards.
        shards: shard file names in index order (one entry for a single file).
        shard_keys: shard file name -> keys in header order.
        index_metadata: the index's ``metadata`` (``{}`` for a single file).
        tied: module -> module it shares its weight with (e.g. ``lm_head`` -> ``model.embed_tokens``).
    """

    directory: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    shards: list[str]
    shard_keys: dict[str, list[str]]
    index_metadata: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1 or os.path.basename(self.shards[0]) != SAFETENSORS_WEIGHTS_FILE

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_base(path: "str | os.PathLike[str]", *, revision: Optional[str] = None, subfolder: Optional[str] = None) -> BaseModel:
    """Read a model directory (or Hub id) from its headers.

    Accepts a directory with ``model.safetensors``, or ``model.safetensors.index.json`` plus its
    shards, or a single ``.safetensors`` file.

    Raises:
        CheckpointNotFoundError: no model weights there.
        ShardIndexError: the index is not valid JSON, names a shard outside the directory or a
            missing shard, or maps a key its shard does not hold.
        HeaderError: a shard's header is damaged.
    """
    spec = os.fspath(path)
    if os.path.isfile(spec) and spec.endswith(".safetensors"):
        directory, single = os.path.dirname(spec) or ".", os.path.basename(spec)
    else:
        directory = resolve_dir(spec, patterns=MODEL_PATTERNS, subfolder=subfolder, revision=revision, what="model")
        single = None
    config = _read_model_config(directory)
    index_path = os.path.join(directory, SAFETENSORS_INDEX_FILE)
    headers: dict[str, SafetensorsHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    shard_keys: dict[str, list[str]] = {}
    metadata: dict[str, Any] = {}
    if single is None and os.path.isfile(index_path):
        weight_map, metadata = _read_index(index_path)
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            headers[shard] = read_header(safe_join(directory, shard, what="shard"))
        for key, shard in weight_map.items():
            if key not in headers[shard].tensors:
                raise ShardIndexError(
                    f"the index maps it to {shard}, which does not hold it", path=index_path, key=key, hint="the index and shards disagree; re-download the model"
                )
        for shard in shards:
            keys = list(headers[shard].tensors)
            extra = [k for k in keys if weight_map.get(k) != shard]
            if extra:
                raise ShardIndexError(
                    f"shard {shard} holds it but the index does not map it there", path=index_path, key=extra[0], hint="the index and shards disagree"
                )
            shard_keys[shard] = keys
            tensors.update(headers[shard].tensors)
    else:
        name = single or SAFETENSORS_WEIGHTS_FILE
        file = os.path.join(directory, name) if single else safe_join(directory, name, what="weights file")
        if not os.path.isfile(file):
            found = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
            hint = f"found {found[0]}: convert it to safetensors first" if found else "is this a model directory?"
            raise CheckpointNotFoundError(f"has no {SAFETENSORS_WEIGHTS_FILE} or {SAFETENSORS_INDEX_FILE}", path=directory, hint=hint)
        headers[name] = read_header(file)
        shards = [name]
        shard_keys[name] = list(headers[name].tensors)
        tensors.update(headers[name].tensors)
    base = BaseModel(directory, config, tensors, shards, shard_keys, metadata, headers)
    base.tied = _tied_modules(base)
    return base


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
    """``{"lm_head": <input embedding>}`` when the base's head exists only by weight tying.

    That is: config.json ties word embeddings (transformers' default is to tie), an architecture
    with a language-model head is named, ``lm_head.weight`` is not stored, and exactly one input
    embedding tensor is. Anything less certain reports no tie.
    """
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
