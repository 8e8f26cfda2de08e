"""Turn a local path or a Hugging Face Hub id into a local directory.

Hub ids go through huggingface_hub only (its cache, ``HF_HUB_OFFLINE``, ``HF_HOME``); adapterfmt
keeps no cache of its own. huggingface_hub is imported only when a Hub id is given.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from ..errors import CheckpointNotFoundError

#: Files fetched for an adapter (top level or one sub-adapter folder).
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def looks_like_hub_id(spec: str) -> bool:
    """``user/name`` or ``name``: what huggingface_hub would take as a repo id (not a path)."""
    parts = spec.split("/")
    return (
        0 < len(parts) <= 2
        and all(p and not p.startswith(".") and p not in ("..", ".") for p in parts)
        and not spec.startswith(("/", "~"))
        and "\\" not in spec
    )


def resolve_dir(
    spec: "str | os.PathLike[str]",
    *,
    patterns: Sequence[str],
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    what: str = "adapter",
) -> str:
    """A local directory for ``spec``: the path itself if it exists, else a Hub snapshot.

    Args:
        spec: a local directory or a Hub repo id (``user/name``).
        patterns: file patterns to fetch from the Hub (``allow_patterns`` of ``snapshot_download``).
        subfolder: a sub-directory inside the repo (e.g. a non-default adapter's name).
        revision: Hub revision (branch, tag or commit).

    Raises:
        CheckpointNotFoundError: no such local path and the Hub id cannot be fetched (offline and
            not cached, not found, or not a valid id).
    """
    spec = os.fspath(spec)
    if os.path.exists(spec):
        path = os.path.join(spec, subfolder) if subfolder else spec
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"is not a directory; give the {what} directory", path=path)
        return path
    if not looks_like_hub_id(spec):
        raise CheckpointNotFoundError(f"no such {what} directory", path=spec)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointNotFoundError("not a local path, and huggingface_hub is not installed", path=spec) from None
    allow = [f"{subfolder}/{p}" for p in patterns] if subfolder else list(patterns)
    try:
        root = snapshot_download(spec, allow_patterns=allow, revision=revision)
    except HFValidationError:
        raise CheckpointNotFoundError(f"no such {what} directory, and not a valid Hub id", path=spec) from None
    except Exception as e:  # huggingface_hub raises many types (offline, 404, gated, network)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        hint = (
            "HF_HUB_OFFLINE is set and the repo is not in the local cache; download it once online or unset HF_HUB_OFFLINE"
            if offline
            else "check the repo id, your network and HF_TOKEN"
        )
        raise CheckpointNotFoundError(
            f"no such local {what} directory, and the Hub fetch failed ({type(e).__name__})", path=spec, hint=hint
        ) from None
    path = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"the Hub repo has no {what} files here", path=f"{spec}/{subfolder or ''}")
    return path


def safe_join(directory: str, name: str, *, what: str = "file") -> str:
    """``directory/name``, refusing names that escape ``directory`` (``..``, absolute, symlinks out).

    Raises:
        UnsafeFileError: the resolved path lies outside ``directory``.
    """
    from ..errors import UnsafeFileError

    if os.path.isabs(name) or name.replace("\\", "/").split("/")[0] == "..":
        raise UnsafeFileError(f"{what} {name!r} points outside its directory", path=directory, key=name)
    full = os.path.realpath(os.path.join(directory, name))
    if not any(os.path.commonpath([root, full]) == root for root in _allowed_roots(directory)):
        raise UnsafeFileError(
            f"{what} {name!r} resolves outside its directory (to {full})",
            path=directory,
            key=name,
            hint="refusing to follow a path or symlink that escapes the checkpoint",
        )
    return os.path.join(directory, name)


def _allowed_roots(directory: str) -> list[str]:
    """Where files of ``directory`` may resolve to: the directory itself and, inside a
    huggingface_hub cache snapshot (``<repo>/snapshots/<rev>/...``), the repo's ``blobs`` folder,
    because every snapshot file there is a symlink to ``../../blobs/<hash>``."""
    roots = [os.path.realpath(directory)]
    path = os.path.abspath(directory)
    while os.path.dirname(path) != path:
        parent = os.path.dirname(path)
        if os.path.basename(parent) == "snapshots":
            blobs = os.path.join(os.path.dirname(parent), "blobs")
            if os.path.isdir(blobs):
                roots.append(os.path.realpath(blobs))
            break
        path = parent
    return roots
