"""Base models on the Hugging Face Hub: headers by range request, weights only for a merge.

Header-only commands (check, targets, inspect --base) list the repo once (``model_info``: the
commit and the file names), fetch the small JSON files the layout decision needs through the
cache (``hf_hub_download``), and read each weight file's header with huggingface_hub's
``parse_safetensors_file_metadata`` (an HTTP range request of ~100 kB): a 140 GB model costs
a few hundred kB. Only ``merge`` downloads weights (``snapshot_download`` of exactly the files
the output needs, through the cache). Header reads are pinned to the commit the listing returned,
so a branch moving mid-read cannot mix two versions. With ``HF_HUB_OFFLINE`` set, the cached
snapshot is read like a local folder. huggingface_hub is imported only here, only for Hub ids.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from ..errors import CheckpointNotFoundError, HeaderError
from ..storage.header import SafetensorsHeader, TensorInfo
from .file_tree import Tree

#: Parallel header requests for a sharded model.
_HEADER_WORKERS = 8


def is_offline() -> bool:
    """huggingface_hub's own offline switch (``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def remote_tree(repo_id: str, *, revision: Optional[str] = None, what: str = "model directory") -> tuple[Tree, str]:
    """A :class:`Tree` over the repo's file listing at ``revision``, and the commit it resolved to.

    Small files are read through the cache (``hf_hub_download`` at that commit). ``what`` names
    what was looked for in errors (``model directory``, ``adapter path``).

    Raises:
        CheckpointNotFoundError: the repo or revision does not exist, or the Hub cannot be reached.
    """
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except Exception as e:  # huggingface_hub raises many types (404, gated, network, validation)
        raise fetch_error(repo_id, e, what) from None
    sha = info.sha or revision or "main"
    files = [s.rfilename for s in info.siblings or []]

    def read(rel: str) -> bytes:
        try:
            path = hf_hub_download(repo_id, rel, revision=sha)
        except Exception as e:
            raise fetch_error(f"{repo_id}/{rel}", e, what) from None
        with open(path, "rb") as f:
            return f.read()

    return Tree(f"hf://{repo_id}@{sha}", files, read), sha


def remote_headers(repo_id: str, sha: str, paths: Sequence[str]) -> dict[str, SafetensorsHeader]:
    """Header of each safetensors file ``paths`` (repo-relative) by range request, keyed by path.

    The tensors' ``start``/``end`` are offsets into the data section (the header length is not
    known from the metadata), and ``file`` is an ``hf://repo@commit/path`` location: enough to
    check and plan, never to read bytes.

    Raises:
        HeaderError: a header cannot be parsed.
        CheckpointNotFoundError: a file cannot be fetched.
    """
    from huggingface_hub import HfApi

    api = HfApi()

    def one(path: str) -> SafetensorsHeader:
        where = f"hf://{repo_id}@{sha}/{path}"
        try:
            meta = api.parse_safetensors_file_metadata(repo_id, path, revision=sha)
        except Exception as e:
            if type(e).__name__ == "SafetensorsParsingError":
                raise HeaderError(f"header cannot be parsed ({e})", path=where) from None
            raise fetch_error(where, e) from None
        tensors = {}
        for key, t in meta.tensors.items():
            begin, end = t.data_offsets
            tensors[key] = TensorInfo(key, where, t.dtype, tuple(t.shape), begin, end)
        return SafetensorsHeader(path=where, tensors=tensors, metadata=dict(meta.metadata or {}), data_start=0)

    with ThreadPoolExecutor(max_workers=min(_HEADER_WORKERS, max(1, len(paths)))) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def download(repo_id: str, revision: Optional[str], files: Sequence[str]) -> str:
    """Download ``files`` (repo-relative) at ``revision`` through the cache; the snapshot folder.

    The revision as the user gave it (not the commit) goes to huggingface_hub, so the cache
    records the branch or tag and a later offline run finds the snapshot. The caller decides the
    layout again on the downloaded folder, so a branch that moved in between is read as it is.

    Raises:
        CheckpointNotFoundError: the download failed.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(files))
    except Exception as e:
        raise fetch_error(repo_id, e) from None


def cached_snapshot(repo_id: str, *, revision: Optional[str] = None, what: str = "model directory") -> str:
    """The cached snapshot folder of ``repo_id`` (offline mode).

    A merge downloads only the files its output needs, so huggingface_hub may call the cached
    snapshot incomplete; its folder is still what a base reader wants, and the layout decision
    then names any file that is really missing.

    Raises:
        CheckpointNotFoundError: not in the cache.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision)
    except Exception as e:
        partial = getattr(e, "snapshot_path", None)
        if type(e).__name__ == "IncompleteSnapshotError" and partial and os.path.isdir(partial):
            return str(partial)
        raise fetch_error(repo_id, e, what) from None


def fetch_error(where: str, e: Exception, what: str = "model directory") -> CheckpointNotFoundError:
    """One error for any failed Hub call (huggingface_hub raises many types), naming ``where``
    (a repo id or a file's ``hf://`` location) and what to check; ``what`` is what was looked
    for (``model directory``, ``adapter path``)."""
    name = type(e).__name__
    if name == "HFValidationError":
        return CheckpointNotFoundError(f"no such {what}, and not a valid Hub id", path=where)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    hint = (
        "HF_HUB_OFFLINE is set and the repo is not in the local cache; download it once online or unset HF_HUB_OFFLINE"
        if offline
        else "check the repo id, the revision, your network and HF_TOKEN"
    )
    reason = {"RepositoryNotFoundError": "no such Hub repo", "RevisionNotFoundError": "no such revision",
            "GatedRepoError": "the repo is gated", "EntryNotFoundError": "no such file in the repo"}.get(name)
    return CheckpointNotFoundError(
        f"no such local {what}, and the Hub fetch failed ({reason or name})", path=where, hint=hint
    )


__all__ = ["cached_snapshot", "download", "fetch_error", "is_offline", "remote_headers", "remote_tree"]
