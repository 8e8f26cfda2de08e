"""The one write rule: every output directory (merge, convert, ``--base-out``, ``save``) is written
all or nothing.

A writer fills a staging directory ``.OUT.adapterfmt-tmp-<pid>`` beside ``OUT``; on
:meth:`StagedDirectory.commit` every file and directory in it is fsynced, then it is renamed into
place once. A run killed half-way leaves only that clearly named directory; the next run into the
same ``OUT`` removes it (:func:`clean_stale`: a stale one is found by its lock — each live run
holds a lock on its staging directory, which the system drops when the process dies:
:func:`adapterfmt.os_calls.lock_directory`, ``flock`` on the directory where there is one, else a
lock file ``.OUT.adapterfmt-tmp-<pid>.lock`` beside it held with ``msvcrt.locking`` or ``O_EXCL``).
Replacing a non-empty ``OUT`` renames the old one aside as ``.OUT.adapterfmt-old-<pid>``, moves
the new one in, then deletes the old one. ``keep_existing`` (``save`` into a directory that holds
other files, as ``save_pretrained`` allows) first links the old directory's files into the stage,
so they survive the swap unchanged.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Sequence

from . import os_calls
from .errors import DiskSpaceError, OutputPathError
from .pause import pause_point

TMP_TAG = "adapterfmt-tmp"
OLD_TAG = "adapterfmt-old"
#: Free space asked for beyond the output's bytes (directory entries, filesystem metadata).
_SPACE_MARGIN = 1 << 20
_BLOCK = 4096


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output_path(out: "str | os.PathLike[str]", inputs: Sequence[str], *, overwrite: bool) -> str:
    """Refuse an output that is an input, lies inside one, contains one, or is not empty.

    Paths are compared resolved (symlinks, ``..``, relative spellings). Returns ``out`` absolute.

    Raises:
        OutputPathError: any of the above, or ``out`` is a file or a symlink.
    """
    absolute = os.path.abspath(os.fspath(out))
    real = os.path.realpath(absolute)
    for source in inputs:
        src = os.path.realpath(source)
        if _inside(real, src):
            raise OutputPathError(f"is inside the input {source}", path=absolute, hint="write the merged model somewhere else; inputs are never modified")
        if _inside(src, real):
            raise OutputPathError(f"contains the input {source}", path=absolute, hint="write the merged model somewhere else; inputs are never modified")
    if os.path.islink(absolute):
        raise OutputPathError("is a symlink", path=absolute, hint="give the directory itself")
    if os.path.exists(absolute):
        if not os.path.isdir(absolute):
            raise OutputPathError("exists and is not a directory", path=absolute, hint="choose another output path")
        if os.listdir(absolute) and not overwrite:
            raise OutputPathError("exists and is not empty", path=absolute, hint="pass --overwrite to replace it, or choose another path")
    return absolute


def check_free_space(out: str, file_sizes: Sequence[int]) -> None:
    """Raise before anything is written when the filesystem of ``out`` cannot hold the output files.

    Asks for each file rounded up to 4 KiB blocks, plus 1 MiB.

    Raises:
        DiskSpaceError: with the bytes needed and free.
    """
    needed = sum(-(-size // _BLOCK) * _BLOCK for size in file_sizes) + _SPACE_MARGIN
    probe = os.path.dirname(out)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe or os.sep).free
    if free < needed:
        raise DiskSpaceError(
            f"the merged model needs {format_bytes(needed)} but only {format_bytes(free)} is free there",
            path=probe,
            hint="free some space or write to another disk (-o)",
        )


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _try_lock(path: str) -> Optional[os_calls.Lock]:
    """The lock standing for directory ``path``, or None if a live process holds it."""
    return os_calls.lock_directory(path)


def _release(lock: Optional[os_calls.Lock]) -> None:
    """Free a directory's lock, its lock file too (if any): the directory is gone or renamed."""
    if lock is not None:
        lock.release(remove=True)


class StagedDirectory:
    """``OUT`` written all or nothing: a locked staging directory beside it, renamed in on commit.

    Use as a context manager; leaving it without :meth:`commit` removes the staging directory.
    Call :func:`clean_stale` first. Writers create new files in :attr:`path` (with
    ``keep_existing``, :meth:`file` gives a path for one, never writing through a kept link).
    Pause points: ``start`` once the stage exists, ``rename`` in :meth:`commit` after the fsyncs.
    """

    def __init__(self, out: str, *, overwrite: bool = False, keep_existing: bool = False) -> None:
        self.out = os.path.abspath(out)
        self.parent, self.name = os.path.split(self.out)
        self.overwrite = overwrite
        self.keep_existing = keep_existing
        self.path = os.path.join(self.parent, f".{self.name}.{TMP_TAG}-{os.getpid()}")
        self._lock: Optional[os_calls.Lock] = None
        self._committed = False

    def __enter__(self) -> "StagedDirectory":
        os.makedirs(self.parent, exist_ok=True)
        if not os_calls.directory_locks_follow_renames():  # a lock file: taken before the directory exists
            self._lock = _try_lock(self.path)
        os.mkdir(self.path, 0o755)
        if self._lock is None:
            self._lock = _try_lock(self.path)
        try:
            if self.keep_existing and os.path.isdir(self.out):
                _link_tree(self.out, self.path)
        except BaseException:
            self.__exit__()
            raise
        pause_point("start")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
        _release(self._lock)
        self._lock = None

    def file(self, relative: str) -> str:
        """The staged path of ``relative`` (its folder created), free to be created anew."""
        path = os.path.join(self.path, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)  # a link to the old output's file: never write through it
        return path

    def commit(self) -> None:
        """fsync everything staged and rename it to ``OUT`` (the old ``OUT`` aside first)."""
        fsync_tree(self.path)
        pause_point("rename")
        old = None
        if os.path.isdir(self.out) and os.listdir(self.out):
            if not self.overwrite:
                raise OutputPathError("was created while the merge ran", path=self.out, hint="pass --overwrite or choose another path")
            old = os.path.join(self.parent, f".{self.name}.{OLD_TAG}-{os.getpid()}")
            # held until the old output is gone, so that it is never taken for a stale leftover
            old_lock = _try_lock(self.out) if os_calls.directory_locks_follow_renames() else _try_lock(old)
            try:
                os.rename(self.out, old)
                try:
                    os.rename(self.path, self.out)
                except OSError:
                    os.rename(old, self.out)
                    raise
                self._committed = True
                os_calls.sync_directory(self.parent)
                shutil.rmtree(old, ignore_errors=True)
            finally:
                _release(old_lock)
        else:
            os_calls.replace_directory(self.path, self.out)  # an empty OUT is replaced
            self._committed = True
            os_calls.sync_directory(self.parent)
        _release(self._lock)
        self._lock = None


def _link_tree(src: str, dst: str) -> None:
    """Hard-link (or, where the filesystem refuses, copy) every file of ``src`` into ``dst``."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, symlinks=True, copy_function=link, dirs_exist_ok=True)


def clean_stale(out: "str | os.PathLike[str]") -> list[str]:
    """Remove what killed runs into ``out`` left beside it; returns the paths cleaned up.

    A staging directory whose lock nobody holds is deleted. A renamed-aside old output of a run
    that died between its two renames is put back as ``out`` if ``out`` is missing (nothing is
    lost), else deleted.

    Raises:
        OutputPathError: a live merge is writing ``out`` now.
    """
    out = os.path.abspath(os.fspath(out))
    parent, name = os.path.split(out)
    prefix = f".{name}."
    removed: list[str] = []
    if not os.path.isdir(parent):
        return removed
    for entry in sorted(os.listdir(parent)):
        tag, _, pid = entry[len(prefix) :].rpartition("-")
        if not entry.startswith(prefix) or tag not in (TMP_TAG, OLD_TAG) or not pid.isdigit():
            continue
        path = os.path.join(parent, entry)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        lock = _try_lock(path)
        if lock is None:
            raise OutputPathError(
                f"another adapterfmt merge (pid {pid}) is writing this output now ({entry})",
                path=out,
                hint="wait for it to finish or choose another output path",
            )
        try:
            if tag == OLD_TAG and not os.path.lexists(out):
                os.rename(path, out)  # a run died between its two renames: put the old output back
            else:
                shutil.rmtree(path)
        finally:
            _release(lock)
        removed.append(path)
    for entry in sorted(os.listdir(parent)):  # lock files whose directory is gone (a run died after its rename)
        stem = entry[: -len(".lock")]
        tag, _, pid = stem[len(prefix) :].rpartition("-")
        if entry.endswith(".lock") and stem.startswith(prefix) and tag in (TMP_TAG, OLD_TAG) and pid.isdigit() and not os.path.lexists(os.path.join(parent, stem)):
            lock = os_calls.try_lock(os.path.join(parent, entry))
            if lock is not None:
                lock.release(remove=True)
    return removed


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: the names of what was created or renamed in it)."""
    os_calls.sync_directory(path)


def fsync_file(path: str) -> None:
    os_calls.sync_path(path)


def fsync_tree(root: str) -> None:
    """fsync every regular file under ``root``, then every directory, deepest first."""
    for folder, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(folder)


def write_text(path: str, text: str) -> None:
    """Create ``path`` with ``text`` (UTF-8) and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os_calls.sync_data(f.fileno())


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` and fsync the copy."""
    shutil.copyfile(src, dst)
    fsync_file(dst)
