"""The one write rule: every output directory (merge, convert, ``--base-out``, ``save``) is written
all or nothing.

A writer fills a staging directory ``.OUT.adapterfmt-tmp-<pid>`` beside ``OUT``; on
:meth:`StagedDirectory.commit` every file and directory in it is fsynced, then it is renamed into
place once. A run killed half-way leaves only that clearly named directory; the next run into the
same ``OUT`` removes it (:func:`clean_stale`: a stale one is found by its lock — each live run
holds a lock on its staging directory, which the system drops when the process dies:
:func:`adapterfmt.storage.os_calls.lock_directory`, ``flock`` on the directory where there is one, else a
lock file ``.OUT.adapterfmt-tmp-<pid>.lock`` beside it held with ``msvcrt.locking`` or ``O_EXCL``).
Replacing a non-empty ``OUT`` renames the old one aside as ``.OUT.adapterfmt-old-<pid>``, moves
the new one in, then deletes the old one. ``keep_existing`` (``save`` into a directory that holds
other files, as ``save_pretrained`` allows) first links the old directory's files into the stage,
so they survive the swap unchanged.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Iterator, Optional, Sequence

from ..errors import AdapterFormatError, DiskSpaceError, OutputPathError
from . import os_calls
from .pause import pause_point

TMP_TAG = "adapterfmt-tmp"
OLD_TAG = "adapterfmt-old"
#: Free space asked for beyond the output's bytes (directory entries, filesystem metadata).
_SPACE_MARGIN = 1 << 20
_BLOCK = 4096


#: longest file name most filesystems take (ext4, xfs, btrfs, tmpfs, APFS, NTFS in UTF-16 units)
_NAME_MAX = 255


def _prefix(name: str) -> str:
    """``.OUT.`` — the start of the staging names beside ``OUT``; for a long ``OUT`` name, a digest
    of it instead, so that ``.<prefix>adapterfmt-tmp-<pid>`` still fits in a file name."""
    prefix = f".{name}."
    if len(os.fsencode(prefix)) + len(TMP_TAG) + 12 > _NAME_MAX:
        import hashlib

        prefix = f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:24]}."
    return prefix


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


#: errnos that mean the filesystem has no room for the output (space, inodes, quota, size limit)
_NO_ROOM = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}  # no EDQUOT on Windows


def output_error(e: OSError, out: str, stage: Optional[str] = None) -> AdapterFormatError:
    """One line for a failing filesystem step: the path, what the errno means, and its name.

    A path inside the staging directory ``stage`` is named as the ``OUT`` path it was for.
    ``ENOSPC`` on a filesystem with free blocks but no free inodes says so.
    """
    path = e.filename if isinstance(e.filename, str) else out
    if stage and _inside(path, stage):
        path = out + path[len(stage) :]
    code = errno.errorcode.get(e.errno or 0, "")
    meaning = os.strerror(e.errno) if e.errno else (e.strerror or str(e) or type(e).__name__)
    if e.errno == errno.ENOSPC and no_free_inodes(path):
        meaning = f"no free inodes left ({meaning})"
    text = f"{meaning}{f' [{code}]' if code else ''}; the output was not written"
    cls = DiskSpaceError if e.errno in _NO_ROOM else OutputPathError
    return cls(text, path=path, hint="nothing was left behind")


def no_free_inodes(path: str) -> bool:
    """Whether the filesystem of ``path`` (or of its nearest existing folder) has no free inode."""
    if not hasattr(os, "statvfs"):  # Windows: no inode counts to look at
        return False
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe or os.sep)
    except OSError:
        return False
    return st.f_files > 0 and st.f_favail == 0


def check_free_space(out: str, file_sizes: Sequence[int]) -> None:
    """Raise before anything is written when the filesystem of ``out`` cannot hold the output files.

    Asks for each file rounded up to 4 KiB blocks, plus 1 MiB.

    Raises:
        DiskSpaceError: with the bytes needed and free.
    """
    needed = sum(-(-size // _BLOCK) * _BLOCK for size in file_sizes) + _SPACE_MARGIN
    probe = out if os.path.ismount(out) else os.path.dirname(out)  # a mount point is written in place
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

    Use as a context manager; leaving it without :meth:`commit` removes the staging directory,
    and the folders above ``OUT`` that it created. Every ``OSError`` inside the block (making the
    stage, writing, fsync, rename) leaves as one line naming the path and the errno's meaning
    (:func:`output_error`). Call :func:`clean_stale` first. Writers create new files in
    :attr:`path` (with ``keep_existing``, :meth:`file` gives a path for one, never writing
    through a kept link). Pause points: ``start`` once the stage exists, ``rename`` in
    :meth:`commit` after the fsyncs.

    **A mount point as ``OUT``** (a container volume) cannot be renamed over, and a stage beside
    it would be on another filesystem. Then the stage is made inside ``OUT``
    (``OUT/.adapterfmt-tmp-<pid>``) and :meth:`commit` moves its entries into ``OUT`` one by one,
    JSON files (config, index) last; a failed move puts back what was moved. Each move is atomic;
    the set of them is not: a crash during those renames can leave part of the files in ``OUT``
    (:attr:`note` says so).
    """

    def __init__(self, out: str, *, overwrite: bool = False, keep_existing: bool = False) -> None:
        self.out = os.path.abspath(out)
        self.parent, self.name = os.path.split(self.out)
        self.overwrite = overwrite
        self.keep_existing = keep_existing
        self.in_place = os.path.isdir(self.out) and os.path.ismount(self.out)
        self.path = (
            os.path.join(self.out, f".{TMP_TAG}-{os.getpid()}")
            if self.in_place
            else os.path.join(self.parent, f"{_prefix(self.name)}{TMP_TAG}-{os.getpid()}")
        )
        #: what the user should know about how the output was written (``None``: nothing special)
        self.note: Optional[str] = None
        if self.in_place:
            self.note = (
                f"{self.out} is a mount point: the output was staged inside it and moved in file by file "
                "(each move atomic, the whole not: an interruption during the moves can leave part of it)"
            )
        self._created: list[str] = []  #: folders above OUT this run created, outermost first
        self._lock: Optional[os_calls.Lock] = None
        self._committed = False

    def __enter__(self) -> "StagedDirectory":
        try:
            self._make_parents()
            if not os_calls.directory_locks_follow_renames():  # a lock file: taken before the directory exists
                self._lock = _try_lock(self.path)
            os.mkdir(self.path, 0o755)
            if self._lock is None:
                self._lock = _try_lock(self.path)
            if self.keep_existing and os.path.isdir(self.out) and not self.in_place:
                _link_tree(self.out, self.path)
            pause_point("start")
        except BaseException as e:  # a signal at the start point included: the with block never ran
            self.__exit__(type(e), e, None)
            raise
        return self

    def _make_parents(self) -> None:
        if len(os.fsencode(self.name)) > _NAME_MAX:  # refuse before writing anything, not at the rename
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), self.out)
        missing = []
        folder = self.parent
        while folder and not os.path.isdir(folder):
            if os.path.lexists(folder):  # a file where a folder is needed
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
            missing.append(folder)
            up = os.path.dirname(folder)
            if up == folder:
                break
            folder = up
        for folder in reversed(missing):
            try:
                os.mkdir(folder, 0o755)
            except FileExistsError:
                if not os.path.isdir(folder):
                    raise
                continue
            self._created.append(folder)

    def __exit__(self, exc_type: object = None, exc: Optional[BaseException] = None, tb: object = None) -> None:
        converted = None
        if isinstance(exc, OSError) and not isinstance(exc, AdapterFormatError):
            converted = output_error(exc, self.out, stage=self.path)  # before clean-up frees inodes
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
            for folder in reversed(self._created):  # only folders this run made, and only if empty
                try:
                    os.rmdir(folder)
                except OSError:
                    break
        _release(self._lock)
        self._lock = None
        if converted is not None:
            raise converted from None

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
        if self.in_place:
            self._commit_in_place()
            return
        old = None
        if os.path.isdir(self.out) and os.listdir(self.out):
            if not self.overwrite:
                raise OutputPathError("was created while the merge ran", path=self.out, hint="pass --overwrite or choose another path")
            old = os.path.join(self.parent, f"{_prefix(self.name)}{OLD_TAG}-{os.getpid()}")
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

    def _commit_in_place(self) -> None:
        stage = os.path.basename(self.path)
        existing = [e for e in os.listdir(self.out) if e != stage]
        if existing and not (self.overwrite or self.keep_existing):
            raise OutputPathError("was written to while the merge ran", path=self.out, hint="pass --overwrite or choose another path")
        old = os.path.join(self.out, f".{OLD_TAG}-{os.getpid()}")
        moved: list[tuple[str, str]] = []
        try:
            if existing and not self.keep_existing:
                os.mkdir(old)
                for e in existing:
                    os.rename(os.path.join(self.out, e), os.path.join(old, e))
                    moved.append((os.path.join(self.out, e), os.path.join(old, e)))
            for e in sorted(os.listdir(self.path), key=lambda n: (n.endswith(".json"), n)):
                target = os.path.join(self.out, e)
                if self.keep_existing and os.path.lexists(target) and not os.path.isdir(target):
                    os.unlink(target)
                os.rename(os.path.join(self.path, e), target)
                moved.append((os.path.join(self.path, e), target))
        except OSError:
            for src, dst in reversed(moved):  # put everything back where it was
                try:
                    os.rename(dst, src)
                except OSError:
                    pass
            try:
                os.rmdir(old)  # empty again once everything is back
            except OSError:
                pass
            raise
        os.rmdir(self.path)
        self._committed = True
        fsync_dir(self.out)
        _release(self._lock)
        self._lock = None
        if os.path.isdir(old):
            shutil.rmtree(old, ignore_errors=True)


def _link_tree(src: str, dst: str) -> None:
    """Hard-link (or, where the filesystem refuses, copy) every file of ``src`` into ``dst``."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, symlinks=True, copy_function=link, dirs_exist_ok=True)


def check_output_file(out: "str | os.PathLike[str]", inputs: Sequence[str], *, overwrite: bool) -> str:
    """Refuse a one-file output that is an input, lies inside one, is a folder or a symlink, or
    exists (without ``overwrite``). Returns ``out`` absolute.

    Raises:
        OutputPathError: any of the above.
    """
    absolute = os.path.abspath(os.fspath(out))
    real = os.path.realpath(absolute)
    for source in inputs:
        if _inside(real, os.path.realpath(source)):
            raise OutputPathError(f"is the input {source} or inside it", path=absolute, hint="write the merged file somewhere else; inputs are never modified")
    if os.path.islink(absolute):
        raise OutputPathError("is a symlink", path=absolute, hint="give a new file path")
    if os.path.isdir(absolute):
        raise OutputPathError("is a directory", path=absolute, hint="give a .safetensors file path")
    if os.path.exists(absolute) and not overwrite:
        raise OutputPathError("exists", path=absolute, hint="pass --overwrite to replace it, or choose another path")
    return absolute


class StagedFile(StagedDirectory):
    """``OUT`` as one file, written all or nothing: the file is written in a locked staging directory
    beside ``OUT`` (the naming, lock and clean-up of :class:`StagedDirectory`), fsynced, and renamed
    onto ``OUT`` on :meth:`commit` (replacing an old file only with ``overwrite``)."""

    def __init__(self, out: str, *, overwrite: bool = False) -> None:
        super().__init__(out, overwrite=overwrite)
        self.in_place, self.note = False, None
        self.path = os.path.join(self.parent, f"{_prefix(self.name)}{TMP_TAG}-{os.getpid()}")

    @property
    def staged(self) -> str:
        """The path the writer creates (``OUT``'s name inside the stage)."""
        return os.path.join(self.path, self.name)

    def commit(self) -> None:
        fsync_tree(self.path)
        pause_point("rename")
        if os.path.isdir(self.out) or (os.path.lexists(self.out) and not self.overwrite):
            raise OutputPathError("was created while the merge ran", path=self.out, hint="pass --overwrite or choose another path")
        os.replace(self.staged, self.out)
        self._committed = True
        os_calls.sync_directory(self.parent)
        shutil.rmtree(self.path, ignore_errors=True)
        _release(self._lock)
        self._lock = None


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
    prefix = _prefix(name)
    removed: list[str] = []
    if os.path.isdir(out) and os.path.ismount(out):
        removed += _clean_stale_in_place(out)
    if not os.path.isdir(parent):
        return removed
    for entry, tag, path in _dead_stages(parent, prefix, out, "merge"):
        if tag == OLD_TAG and not os.path.lexists(out):
            os.rename(path, out)  # a run died between its two renames: put the old output back
        else:
            shutil.rmtree(path)
        removed.append(path)
    for entry in sorted(os.listdir(parent)):  # lock files whose directory is gone (a run died after its rename)
        stem = entry[: -len(".lock")]
        tag, _, pid = stem[len(prefix) :].rpartition("-")
        if entry.endswith(".lock") and stem.startswith(prefix) and tag in (TMP_TAG, OLD_TAG) and pid.isdigit() and not os.path.lexists(os.path.join(parent, stem)):
            lock = os_calls.try_lock(os.path.join(parent, entry))
            if lock is not None:
                lock.release(remove=True)
    return removed


def _dead_stages(directory: str, prefix: str, out: str, what: str) -> Iterator[tuple[str, str, str]]:
    """``(entry, tag, path)`` of each stage directory ``<prefix><tag>-<pid>`` in ``directory`` left by
    a dead run, held under its lock while the caller cleans it up.

    Raises:
        OutputPathError: a live run (its lock is held) is writing ``out`` now.
    """
    for entry in sorted(os.listdir(directory)):
        tag, _, pid = entry[len(prefix) :].rpartition("-")
        if not entry.startswith(prefix) or tag not in (TMP_TAG, OLD_TAG) or not pid.isdigit():
            continue
        path = os.path.join(directory, entry)
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        lock = _try_lock(path)
        if lock is None:
            raise OutputPathError(
                f"another adapterfmt {what} (pid {pid}) is writing this output now ({entry})",
                path=out,
                hint="wait for it to finish or choose another output path",
            )
        try:
            yield entry, tag, path
        finally:
            _release(lock)


def _clean_stale_in_place(out: str) -> list[str]:
    """:func:`clean_stale` inside a mount-point ``OUT`` (where such a run stages)."""
    removed = []
    for entry, tag, path in _dead_stages(out, ".", out, "run"):
        others = [e for e in os.listdir(out) if e != entry and not e.startswith((f".{TMP_TAG}-", f".{OLD_TAG}-"))]
        if tag == OLD_TAG and not others:
            for e in os.listdir(path):  # a run died between moving the old output aside and the new one in
                os.rename(os.path.join(path, e), os.path.join(out, e))
            os.rmdir(path)
        else:
            shutil.rmtree(path)
        removed.append(path)
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
