"""Portable file-system calls: the fast Linux call where the system has it, a portable fallback otherwise.

Every call here is chosen by feature detection when this module is imported (:func:`detect`),
never by catching ``AttributeError`` at run time:

=========================  =================================  ==========================================
job                        where available                    fallback
=========================  =================================  ==========================================
copy a byte range          ``os.copy_file_range`` (Linux)     ``os.sendfile`` (Linux), then read/write
positional read / write    ``os.preadv`` / ``os.pwrite``      ``os.pread``; else seek + read/write under a lock (Windows)
read-ahead advice          ``os.posix_fadvise``               nothing (advice only)
start writeback early      ``sync_file_range`` (Linux libc)   nothing (the final sync does the work)
make data durable          ``os.fdatasync``                   ``os.fsync``; macOS ``F_FULLFSYNC``
sync a directory entry     fsync of the directory             nothing where directories cannot be opened (Windows)
exclusive lock             ``fcntl.flock``                    ``msvcrt.locking`` on a lock file (Windows); an ``O_EXCL`` file naming its pid
=========================  =================================  ==========================================

Files are opened in binary mode (``O_BINARY`` on Windows) and not inherited by child processes.
A directory is locked itself with ``flock`` where there is one (the lock follows it through a
rename); elsewhere a *lock file* named after it stands for it (:func:`lock_directory`). The kernel
(or, for ``O_EXCL``, the pid check) frees a dead process's lock.

Tests remove the fast calls (``monkeypatch.delattr(os, "copy_file_range")``, a ``None`` entry for
``fcntl`` in ``sys.modules``, :data:`find_sync_file_range` replaced) and call :func:`detect` again,
so every fallback runs on Linux too.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import threading
from typing import Any, Callable, Optional

#: Open flags every descriptor gets (binary on Windows, not inherited).
O_BINARY = getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0)
#: Bytes per fallback read/write step.
_CHUNK = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2
#: errnos with which copy_file_range / sendfile refuse a pair of files (another filesystem, old kernel).
_REFUSED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

#: The calls found by :func:`detect` (name -> True/False), for reports and tests.
available: dict[str, bool] = {}
_seek_lock = threading.Lock()  # serialises seek + read/write where there is no positional call
_fcntl: Any = None
_msvcrt: Any = None
_sync_file_range: Optional[Callable[[int, int, int, int], int]] = None
_sync_file_range_looked_up = False


def find_sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's ``sync_file_range`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here, not at the top: header-only commands never pay for it

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range  # the C library python runs on
    except (OSError, AttributeError):  # no libc to load, or a libc without the call
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _optional_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def detect(*, now: bool = True) -> dict[str, bool]:
    """Look up which calls this system has; returns :data:`available`.

    ``now=False`` (on import) leaves libc's ``sync_file_range`` to the first writeback, so that
    commands that write nothing never load ``ctypes``.
    """
    global _fcntl, _msvcrt, _sync_file_range, _sync_file_range_looked_up
    _fcntl = _optional_module("fcntl")
    _msvcrt = _optional_module("msvcrt")
    _sync_file_range, _sync_file_range_looked_up = None, False
    if now:
        _look_up_sync_file_range()
    available.clear()
    for name in ("copy_file_range", "sendfile", "preadv", "pread", "pwrite", "posix_fadvise", "fdatasync"):
        available[name] = hasattr(os, name)
    available["sendfile"] = available["sendfile"] and sys.platform.startswith("linux")  # elsewhere it wants a socket
    available["sync_file_range"] = _sync_file_range is not None if now else False
    available["flock"] = _fcntl is not None and hasattr(_fcntl, "flock")
    available["full_fsync"] = _fcntl is not None and hasattr(_fcntl, "F_FULLFSYNC")
    available["msvcrt_locking"] = _msvcrt is not None and hasattr(_msvcrt, "locking")
    available["open_directory"] = hasattr(os, "O_DIRECTORY")
    return available


# ---------------------------------------------------------------------------------------------
# OPEN, READ, WRITE
# ---------------------------------------------------------------------------------------------


def open_read(path: str, *, sequential: bool = True) -> int:
    """A read-only descriptor of ``path`` (hinted for sequential reads where the system takes hints)."""
    fd = os.open(path, os.O_RDONLY | O_BINARY)
    if sequential:
        advise_sequential(fd)
    return fd


def open_new(path: str, mode: int = 0o644) -> int:
    """A write-only descriptor of a file created here (``FileExistsError`` if ``path`` exists)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY, mode)


def advise_sequential(fd: int) -> None:
    """Tell the kernel ``fd`` is read front to back (more read-ahead); nothing where unsupported."""
    if available["posix_fadvise"]:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into ``view`` from ``offset`` without moving the file position; bytes read (0 at the end)."""
    if available["preadv"]:
        return os.preadv(fd, [view], offset)
    if available["pread"]:
        chunk = os.pread(fd, len(view), offset)
    else:
        with _seek_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, len(view))
    view[: len(chunk)] = chunk
    return len(chunk)


def read_exact(fd: int, view: memoryview, offset: int) -> bool:
    """Fill ``view`` from ``offset``; False if the file ends first."""
    got = 0
    while got < len(view):
        n = read_into(fd, view[got:], offset + got)
        if n == 0:
            return False
        got += n
    return True


def write_all(fd: int, data: "bytes | bytearray | memoryview") -> None:
    """Write all of ``data`` at the current position."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def write_at(fd: int, data: "bytes | bytearray | memoryview", offset: int) -> None:
    """Write all of ``data`` at ``offset`` (the file position is not used)."""
    view = memoryview(data).cast("B")
    while view:
        if available["pwrite"]:
            n = os.pwrite(fd, view, offset)
        else:
            with _seek_lock:
                os.lseek(fd, offset, os.SEEK_SET)
                n = os.write(fd, view)
        view, offset = view[n:], offset + n


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: Optional[int] = None) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src_fd`` to ``dst_fd`` (at ``dst_offset``, or its position).

    ``copy_file_range`` keeps the bytes in the kernel (and may share extents on reflink file
    systems); where it is missing or refuses this pair of files, ``sendfile`` (Linux) and then a
    read/write loop take over.

    Raises:
        OSError: EIO when the source ends early (it changed during the merge); any other error.
    """
    if available["copy_file_range"]:
        while length:
            try:
                n = os.copy_file_range(src_fd, dst_fd, length, offset, dst_offset)
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                break
            if n == 0:
                raise OSError(errno.EIO, "source file ended early (was it changed during the merge?)")
            offset, length = offset + n, length - n
            dst_offset = None if dst_offset is None else dst_offset + n
    if length and available["sendfile"] and dst_offset is None:
        while length:
            try:
                n = os.sendfile(dst_fd, src_fd, offset, length)
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                break
            if n == 0:
                raise OSError(errno.EIO, "source file ended early (was it changed during the merge?)")
            offset, length = offset + n, length - n
    if length:
        _copy_by_reading(src_fd, dst_fd, offset, length, dst_offset)


def _copy_by_reading(src_fd: int, dst_fd: int, offset: int, length: int, dst_offset: Optional[int]) -> None:
    buffer = bytearray(min(length, _CHUNK))
    while length:
        view = memoryview(buffer)[: min(length, len(buffer))]
        n = read_into(src_fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "source file ended early (was it changed during the merge?)")
        if dst_offset is None:
            write_all(dst_fd, view[:n])
        else:
            write_at(dst_fd, view[:n], dst_offset)
            dst_offset += n
        offset, length = offset + n, length - n


# ---------------------------------------------------------------------------------------------
# DURABILITY
# ---------------------------------------------------------------------------------------------


def _look_up_sync_file_range() -> None:
    global _sync_file_range, _sync_file_range_looked_up
    _sync_file_range, _sync_file_range_looked_up = find_sync_file_range(), True
    available["sync_file_range"] = _sync_file_range is not None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting (Linux
    ``sync_file_range``), so that the final sync has little left to do; nothing elsewhere."""
    if not _sync_file_range_looked_up:
        _look_up_sync_file_range()
    if _sync_file_range is not None and length > 0:
        if _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
            import ctypes

            code = ctypes.get_errno()
            if code not in _REFUSED:  # a file system that does not take it: the final sync still runs
                raise OSError(code, os.strerror(code))


def sync_data(fd: int) -> None:
    """Make a file's bytes (and its size) durable: ``fdatasync``, else ``fsync``; on macOS
    ``F_FULLFSYNC``, since its ``fsync`` does not flush the drive's cache."""
    if available["full_fsync"]:
        try:
            _fcntl.fcntl(fd, _fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass  # a file system without it (network shares): fsync below
    if available["fdatasync"]:
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def sync_path(path: str) -> None:
    """:func:`sync_data` on the file at ``path``."""
    fd = os.open(path, (os.O_RDWR if os.name == "nt" else os.O_RDONLY) | O_BINARY)  # Windows flushes writable handles only
    try:
        sync_data(fd)
    finally:
        os.close(fd)


def sync_directory(path: str) -> None:
    """Make the entries of directory ``path`` durable (created and renamed names).

    Where a directory cannot be opened (Windows) this does nothing: NTFS journals its metadata.
    """
    if not available["open_directory"]:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(src: str, dst: str) -> None:
    """Rename directory ``src`` to ``dst``, where ``dst`` is missing or an empty directory.

    POSIX replaces an empty ``dst`` in one step; Windows refuses, so the empty ``dst`` is removed
    first there.
    """
    try:
        os.rename(src, dst)
    except OSError as e:
        if not (os.path.isdir(dst) and not os.listdir(dst) and e.errno in (errno.EEXIST, errno.EACCES, errno.ENOTEMPTY)):
            raise
        os.rmdir(dst)
        os.rename(src, dst)


# ---------------------------------------------------------------------------------------------
# LOCKS
# ---------------------------------------------------------------------------------------------


def lock_name(path: str) -> str:
    """The lock file that stands for directory ``path`` where a directory cannot be locked itself
    (beside it: a directory holding an open file cannot be renamed on Windows)."""
    return f"{path}.lock"


def directory_locks_follow_renames() -> bool:
    """Whether :func:`lock_directory` locks the directory itself (``flock`` on it: the lock moves
    with it through a rename) rather than a lock file named after it."""
    return available["flock"] and available["open_directory"]


def lock_directory(path: str) -> Optional["Lock"]:
    """An exclusive lock standing for directory ``path``, or None if another process holds it.

    With ``flock``: the directory itself is locked (no file is created). Elsewhere: the lock file
    :func:`lock_name` beside it, by :func:`try_lock`; release it with ``remove=True`` once the
    directory is gone or renamed.
    """
    if not directory_locks_follow_renames():
        return try_lock(lock_name(path))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    return Lock(path, fd, "flock-directory") if _flock_or_close(fd) else None


def _flock_or_close(fd: int) -> bool:
    """Take ``flock(LOCK_EX | LOCK_NB)`` on ``fd``; False (``fd`` closed) if another holder has it."""
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class Lock:
    """An exclusive lock held on a lock file; :meth:`release` frees it (idempotent)."""

    def __init__(self, path: str, fd: int, kind: str) -> None:
        self.path, self._fd, self.kind = path, fd, kind

    def release(self, *, remove: bool = False) -> None:
        """Free the lock; ``remove`` also deletes the lock file (done with the thing it stands for)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        remove = (remove and self.kind != "flock-directory") or self.kind == "exclusive-file"
        if remove and self.kind != "msvcrt":
            _remove(self.path)  # before closing: nobody can take a lock on a file about to vanish
        if self.kind == "msvcrt":
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                _msvcrt.locking(fd, _msvcrt.LK_UNLCK, 1)
            except OSError:
                pass
        os.close(fd)
        if remove and self.kind == "msvcrt":
            _remove(self.path)  # Windows deletes no open file: after closing

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass  # gone already, or held open elsewhere: clean_stale removes it later


def try_lock(path: str) -> Optional[Lock]:
    """Take the exclusive lock on the lock file ``path`` without waiting; None if another process
    (or another open of it) holds it. The lock file is created if missing and kept on release."""
    if available["flock"]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        return Lock(path, fd, "flock") if _flock_or_close(fd) else None
    if available["msvcrt_locking"]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        try:
            _msvcrt.locking(fd, _msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            return None
        return Lock(path, fd, "msvcrt")
    return _try_exclusive_file(path)


def _try_exclusive_file(path: str) -> Optional[Lock]:
    """The last resort: the lock is the file's existence, created with ``O_EXCL`` and naming its
    pid. A file whose pid is no longer running (POSIX) is stale and taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_BINARY, 0o644)
        except FileExistsError:
            if not _stale_pid_file(path):
                return None
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        write_all(fd, str(os.getpid()).encode())
        return Lock(path, fd, "exclusive-file")
    return None


def _stale_pid_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except FileNotFoundError:
        return True
    if not text.isdigit():
        return False  # being written, or not ours: never taken over
    pid = int(text)
    if pid == os.getpid() or os.name != "posix":
        return False  # this process holds it; elsewhere there is no safe liveness probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


detect(now=False)
