"""Read access to a model's files by relative POSIX path: a local folder or a Hub file listing.

The base-layout decision (:mod:`adapterfmt.base.layouts`) and the merge's list of side files
work on a :class:`Tree`, so a Hub repo is judged from its listing exactly as a local folder is.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Callable, Optional, Sequence

from ..errors import InvalidConfigError

#: Folders never copied from a base and never listed: version control and caches.
SKIPPED_DIRS = (".git", ".cache", "__pycache__", ".ipynb_checkpoints", ".huggingface")


class Tree:
    """Read access to a base's files by relative POSIX path: a local folder or a Hub listing."""

    def __init__(self, root: str, files: Optional[Sequence[str]] = None, read: Optional[Callable[[str], bytes]] = None):
        self.root = root
        self._files = None if files is None else set(files)
        self._read = read

    def is_file(self, rel: str) -> bool:
        if self._files is not None:
            return rel in self._files
        return os.path.isfile(os.path.join(self.root, *rel.split("/")))

    def is_dir(self, rel: str) -> bool:
        if self._files is not None:
            return any(f.startswith(rel.rstrip("/") + "/") for f in self._files) if rel else True
        return os.path.isdir(os.path.join(self.root, *rel.split("/")))

    def names(self, rel: str = "") -> list[str]:
        """Files directly inside folder ``rel`` (names, sorted)."""
        if self._files is not None:
            prefix = rel.rstrip("/") + "/" if rel else ""
            return sorted(f[len(prefix):] for f in self._files if f.startswith(prefix) and "/" not in f[len(prefix):])
        folder = os.path.join(self.root, *rel.split("/")) if rel else self.root
        try:
            return sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
        except OSError:
            return []

    def walk(self, rel: str = "") -> list[str]:
        """Every file under ``rel`` (relative to the root), skipping version-control and cache folders."""
        if self._files is not None:
            prefix = rel.rstrip("/") + "/" if rel else ""
            return sorted(f for f in self._files if f.startswith(prefix) and not set(f.split("/")[:-1]) & set(SKIPPED_DIRS))
        out = []
        start = os.path.join(self.root, *rel.split("/")) if rel else self.root
        for folder, dirs, files in os.walk(start):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
            base = os.path.relpath(folder, self.root).replace(os.sep, "/")
            out += [n if base == "." else f"{base}/{n}" for n in sorted(files)]
        return out

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of the small file ``rel``."""
        if self._read is not None:
            return self._read(rel)
        with open(os.path.join(self.root, *rel.split("/")), "rb") as f:
            return f.read()

    def load_json(self, rel: str) -> Any:
        """The JSON document in ``rel``, None when there is no such file.

        Raises:
            InvalidConfigError: the file is not valid JSON.
        """
        if not self.is_file(rel):
            return None
        try:
            return json.loads(self.read_bytes(rel).decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InvalidConfigError(
                f"is not valid JSON ({type(e).__name__})", path=join_path(self.root, rel), hint="fix or re-download the model"
            ) from None

    def json(self, rel: str) -> Optional[dict[str, Any]]:
        """The JSON object in ``rel``, None when there is no such file.

        Raises:
            InvalidConfigError: the file is not a JSON object.
        """
        doc = self.load_json(rel)
        if doc is not None and not isinstance(doc, dict):
            raise InvalidConfigError("is not a JSON object", path=join_path(self.root, rel), hint="fix or re-download the model")
        return doc


class SubTree(Tree):
    """A view of ``tree`` rooted at its folder ``rel``."""

    def __init__(self, tree: Tree, rel: str):
        self._parent, self._rel = tree, rel
        super().__init__(join_path(tree.root, rel))

    def is_file(self, rel: str) -> bool:
        return self._parent.is_file(rel_path(self._rel, rel))

    def is_dir(self, rel: str) -> bool:
        return self._parent.is_dir(rel_path(self._rel, rel))

    def names(self, rel: str = "") -> list[str]:
        return self._parent.names(rel_path(self._rel, rel))

    def walk(self, rel: str = "") -> list[str]:
        cut = len(self._rel) + 1
        return [f[cut:] for f in self._parent.walk(rel_path(self._rel, rel))]

    def read_bytes(self, rel: str) -> bytes:
        return self._parent.read_bytes(rel_path(self._rel, rel))


def rel_path(folder: str, name: str) -> str:
    """``folder/name`` as a relative POSIX path (``name`` alone at the top level)."""
    return f"{folder}/{name}" if folder else name


def join_path(root: str, rel: str) -> str:
    """``root/rel`` for a local folder (OS separators) or a Hub location (``hf://...``, slashes)."""
    if not rel:
        return root
    return posixpath.join(root, rel) if "://" in root else os.path.join(root, *rel.split("/"))


__all__ = ["SKIPPED_DIRS", "SubTree", "Tree", "join_path", "rel_path"]
