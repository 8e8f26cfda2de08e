"""Check a model or adapter directory from its headers, without reading tensor bytes.

``verify_directory(path)`` returns what is wrong as :class:`~adapterfmt.checkpoint.findings.Finding` records
instead of stopping at the first defect, so a user (``adapterfmt verify``) or the merge engine
(``merge --verify``, on its output before the rename) sees every problem at once. It raises only
when there is nothing it can check: no such directory, or no weights in it.

Codes: ``bad-header``, ``bad-index``, ``missing-shard``, ``path-escape``, ``key-not-in-shard``,
``key-not-indexed``, ``duplicate-key``, ``total-size``, ``unindexed-file``, ``bad-config``,
``missing-config``, ``pickle-weights``, ``bad-adapter``, ``orphan-lora``, ``rank-mismatch``,
``unknown-key``. Any symlink among the directory's files that leads out of it is a ``path-escape``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ..base.layouts import PIPELINE_INDEX, SENTENCE_MODULES, WEIGHT_NAMES
from ..checkpoint.config import read_config
from ..checkpoint.findings import Finding, lora_rank_mismatch_finding
from ..constants import (
    ADAPTER_BIN_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_SAFETENSORS_FILE,
    MODEL_CONFIG_FILE,
    SAFETENSORS_INDEX_FILE,
    SAFETENSORS_WEIGHTS_FILE,
)
from ..errors import AdapterFormatError, CheckpointNotFoundError
from ..sources.paths import safe_join
from ..storage.header import SafetensorsHeader, read_header

_ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, ADAPTER_BIN_FILE)
#: Every safetensors index name a model folder can have (transformers, diffusers).
_INDEX_NAMES = tuple(names[1] for names in WEIGHT_NAMES.values())
#: The single-file names (a single file beside an index is a candidate, not a leftover).
_SINGLE_NAMES = tuple(names[0] for names in WEIGHT_NAMES.values())


def verify_directory(path: "str | os.PathLike[str]") -> list[Finding]:
    """Check every file of a model or adapter directory from headers; tensors are never loaded.

    A model directory: the index (if any) is valid JSON, names only shards inside the directory
    that exist, maps every key to the one shard that holds it and every shard key back, no key is
    in two shards, ``metadata.total_size`` equals the tensor bytes, no ``.safetensors`` file is
    left out of the index, every shard's header is sound (:func:`~adapterfmt.storage.header.read_header`:
    offsets tile the file exactly), and ``config.json`` is a JSON object. An adapter directory
    (and each sub-adapter): the config is valid, the weights header is sound, every tensor fits
    the key grammar, and every LoRA module has ``lora_A`` and ``lora_B`` of one rank.

    Args:
        path (`str` or `os.PathLike`): a local model or adapter directory.

    Returns:
        `list[Finding]`: one per problem, empty when the directory is sound.

    Raises:
        CheckpointNotFoundError: ``path`` is not a directory, or holds no weights to check.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError("is not a directory; give a model or adapter directory", path=directory)
    if any(os.path.lexists(os.path.join(directory, f)) for f in _ADAPTER_FILES):
        found = _verify_adapter(directory)
        if _has_weights(directory):  # a base and its adapter saved into one folder: check both
            found += _verify_model(directory)
    else:
        found = _verify_model(directory)
    found += _escaping_links(directory)
    return list({(f.code, f.message): f for f in found}.values())


def _escaping_links(directory: str) -> list[Finding]:
    """Symlinks among the directory's files that lead out of it (a merge copies non-weight files)."""
    out = []
    for name in sorted(os.listdir(directory)):
        if os.path.islink(os.path.join(directory, name)):
            try:
                safe_join(directory, name)
            except AdapterFormatError as e:
                out.append(Finding("path-escape", str(e), [name]))
    return out


# ---------------------------------------------------------------------------------------------
# MODEL DIRECTORIES
# ---------------------------------------------------------------------------------------------


def _verify_model(directory: str) -> list[Finding]:
    """Every folder that holds weights: the top level, each pipeline component, each
    sentence-transformers module; plus the ``shadowed-weights`` warning of the chosen layout."""
    folders = [f for f in _weight_folders(directory) if _has_weights(os.path.join(directory, f))]
    if not folders:
        raise CheckpointNotFoundError(
            f"has no {SAFETENSORS_WEIGHTS_FILE}, {SAFETENSORS_INDEX_FILE}, diffusers weights or adapter files; nothing to verify",
            path=directory,
        )
    out: list[Finding] = []
    for folder in folders:
        path = os.path.join(directory, folder) if folder else directory
        out += _verify_weights_folder(path)
        out += _layout_findings(directory, folder)
    return out


def _weight_folders(directory: str) -> list[str]:
    """Folders (relative) that may hold weights: ``""``, pipeline components, module folders."""
    pipeline = os.path.join(directory, PIPELINE_INDEX)
    if os.path.isfile(pipeline):
        doc, _ = _load_json(pipeline)
        names = [k for k, v in doc.items() if not k.startswith("_") and isinstance(v, list)] if isinstance(doc, dict) else []
        return sorted(n for n in names if os.path.isdir(os.path.join(directory, n)))
    modules = os.path.join(directory, SENTENCE_MODULES)
    if os.path.isfile(modules):
        doc, _ = _load_json(modules)
        paths = [str(m.get("path") or "") for m in doc if isinstance(m, dict)] if isinstance(doc, list) else []
        return list(dict.fromkeys([""] + [p for p in paths if p and os.path.isdir(os.path.join(directory, p))]))
    return [""]


def _has_weights(folder: str) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(n.endswith((".safetensors", ".safetensors.index.json", ".bin")) for n in names if n not in _ADAPTER_FILES)


def _layout_findings(directory: str, folder: str) -> list[Finding]:
    """The reader's own warnings for this folder (two candidate weight sets)."""
    from ..base.layouts import decide_layout
    from ..sources.file_tree import Tree

    try:
        tree = Tree(directory)
        if folder and not tree.is_file(PIPELINE_INDEX):
            tree = Tree(os.path.join(directory, folder))
            folder = ""
        return list(decide_layout(tree, subfolder=folder or None, allow_pickle=True).findings)
    except AdapterFormatError:  # what is wrong is reported by the checks of the files themselves
        return []


def _verify_weights_folder(directory: str) -> list[Finding]:
    """One folder's config, indexes (every safetensors index present, whoever's names it uses)
    and, without an index, the header of every ``.safetensors`` file."""
    out: list[Finding] = _config_json_findings(os.path.join(directory, MODEL_CONFIG_FILE))
    names = sorted(os.listdir(directory))
    files = [f for f in names if f.endswith(".safetensors") and f not in _ADAPTER_FILES]
    indexes = [n for n in _INDEX_NAMES if os.path.lexists(os.path.join(directory, n))]
    if indexes:
        indexed: set[str] = set()
        for index in indexes:
            found, shards = _verify_index(directory, os.path.join(directory, index))
            out += found
            indexed |= shards
        for name in sorted(set(files) - indexed):
            if name in _SINGLE_NAMES:  # a second candidate weight set: its header is checked, shadowed-weights says which one loads
                out += _header_findings(directory, name)[1]
                continue
            out.append(Finding("unindexed-file", f"{os.path.join(directory, name)}: is not named by {' or '.join(indexes)} (a leftover?)", [name]))
        return out
    for name in files:
        out += _header_findings(directory, name)[1]
    if not files:
        pickles = [n for n in names if n.endswith(".bin")]
        out += [Finding("pickle-weights", f"{os.path.join(directory, n)}: is a pickle file; verify never unpickles, convert it to safetensors", [n]) for n in pickles]
    return out


def _verify_index(directory: str, index_path: str) -> tuple[list[Finding], set[str]]:
    """Findings of one index and its shards, and the shard names it maps to."""
    out: list[Finding] = []
    doc, problem = _load_json(index_path)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if problem or not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        why = problem or "has no 'weight_map' of key -> shard file"
        return [Finding("bad-index", f"{index_path}: {why}", [os.path.basename(index_path)])], set()

    headers: dict[str, SafetensorsHeader] = {}
    unreadable: set[str] = set()
    for shard in dict.fromkeys(weight_map.values()):
        header, found = _header_findings(directory, shard, index_path=index_path)
        out += found
        if header is None:
            unreadable.add(shard)
        else:
            headers[shard] = header
    holders: dict[str, list[str]] = {}
    for shard, header in headers.items():
        for key in header.tensors:
            holders.setdefault(key, []).append(shard)
            if weight_map.get(key) != shard:
                out.append(_f("key-not-indexed", header.path, key, f"is in this shard but the index maps it to {weight_map.get(key)!r}"))
    for key, shard in weight_map.items():
        if shard in unreadable or shard in holders.get(key, []):
            continue
        out.append(_f("key-not-in-shard", index_path, key, f"the index maps it to {shard}, which does not hold it"))
    for key, shards in holders.items():
        if len(shards) > 1:
            out.append(_f("duplicate-key", index_path, key, f"is held by {len(shards)} shards: {', '.join(shards)}"))

    metadata = doc.get("metadata")
    size = metadata.get("total_size") if isinstance(metadata, dict) else None
    if size is not None and not unreadable:
        total = sum(h.nbytes for h in headers.values())
        if isinstance(size, bool) or not isinstance(size, int) or size != total:
            out.append(_f("total-size", index_path, "metadata.total_size", f"is {size!r} but the shards hold {total} tensor bytes"))
    return out, set(weight_map.values())


def _header_findings(
    directory: str, name: str, *, index_path: Optional[str] = None
) -> tuple[Optional[SafetensorsHeader], list[Finding]]:
    """Read one weights file's header: ``(header or None, findings)``."""
    where = index_path or directory
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        return None, [Finding("path-escape", f"{where}: names {name!r}, which is outside the directory", [name])]
    try:
        full = safe_join(directory, name)
    except AdapterFormatError as e:
        return None, [Finding("path-escape", str(e), [name])]
    if not os.path.isfile(full):
        return None, [Finding("missing-shard", f"{where}: names {name!r}, which is not a file in {directory}", [name])]
    try:
        return read_header(full), []
    except AdapterFormatError as e:
        return None, [Finding("bad-header", str(e), [name] + ([e.key] if e.key else []))]


# ---------------------------------------------------------------------------------------------
# ADAPTER DIRECTORIES
# ---------------------------------------------------------------------------------------------


def _verify_adapter(directory: str) -> list[Finding]:
    from ..formats.peft.reading import peft_type_of, read_adapter  # describe imports matching/findings; keep verify's import light

    out: list[Finding] = []
    config_path = os.path.join(directory, ADAPTER_CONFIG_FILE)
    st_path = os.path.join(directory, ADAPTER_SAFETENSORS_FILE)
    bin_path = os.path.join(directory, ADAPTER_BIN_FILE)
    if not os.path.isfile(st_path) and not os.path.isfile(bin_path):
        raise CheckpointNotFoundError(
            f"has no {ADAPTER_SAFETENSORS_FILE} or {ADAPTER_BIN_FILE}; nothing to verify", path=directory
        )
    if not os.path.isfile(config_path):
        out.append(Finding("missing-config", f"{directory}: has no {ADAPTER_CONFIG_FILE}", [ADAPTER_CONFIG_FILE]))
    else:
        try:
            if peft_type_of(config_path) not in ("LOHA", "LOKR"):  # PEFT's LoHa / LoKr: checked by their reader below
                read_config(config_path)
        except AdapterFormatError as e:
            out.append(Finding("bad-config", str(e), [ADAPTER_CONFIG_FILE] + ([e.key] if e.key else [])))
    if os.path.isfile(st_path):
        out += _header_findings(directory, ADAPTER_SAFETENSORS_FILE)[1]
    else:
        out.append(
            Finding("pickle-weights", f"{bin_path}: is a pickle file; verify never unpickles, convert it to safetensors", [ADAPTER_BIN_FILE])
        )
    if not out:
        out += _adapter_tensor_findings(read_adapter, directory)
    for sub in sorted(os.listdir(directory)):
        if os.path.isfile(os.path.join(directory, sub, ADAPTER_CONFIG_FILE)):
            out += _verify_adapter(os.path.join(directory, sub))
    return out


def _adapter_tensor_findings(read_adapter: Any, directory: str) -> list[Finding]:
    """Grammar and A/B agreement of an adapter whose config and header are sound."""
    try:
        ckpt = read_adapter(directory)
    except AdapterFormatError as e:
        return [Finding("bad-adapter", str(e), [e.key] if e.key else [])]
    out = [f for f in ckpt.findings if f.code in ("orphan-lora", "unknown-key")]
    for path, m in ckpt.lora.items():
        a, b = m.tensors.get("lora_A"), m.tensors.get("lora_B")
        if a is None or b is None or not a.shape or len(b.shape) < 2:
            continue
        if a.shape[0] != b.shape[1]:
            out.append(lora_rank_mismatch_finding(ckpt.weights_file, m, a.shape[0], b.shape[1]))
    return out


# ---------------------------------------------------------------------------------------------
# SMALL HELPERS
# ---------------------------------------------------------------------------------------------


def _f(code: str, file: str, key: str, message: str) -> Finding:
    return Finding(code, f"{file}: {key!r}: {message}", [key])


def _load_json(path: str) -> tuple[Any, Optional[str]]:
    """``(document, None)`` or ``(None, why it cannot be read)``."""
    if not os.path.isfile(path):
        return None, "is not a regular file"
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8")), None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return None, f"is not valid JSON ({type(e).__name__})"


def _config_json_findings(path: str) -> list[Finding]:
    """``config.json``, where present, must be a JSON object."""
    if not os.path.lexists(path):
        return []
    doc, problem = _load_json(path)
    if problem is None and not isinstance(doc, dict):
        problem = "is not a JSON object"
    return [Finding("bad-config", f"{path}: {problem}", [os.path.basename(path)])] if problem else []
