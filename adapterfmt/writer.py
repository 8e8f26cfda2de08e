"""Writing a merged model: a streaming safetensors writer and an all-or-nothing output directory.

Why a hand-written writer: safetensors' ``save_file`` serialises a whole dict of tensors, so a
shard would sit in memory at once. Here the header is computed in advance (the plan knows every
dtype and shape), then tensor bytes are appended one tensor — or one block of rows — at a time,
and untouched tensors are copied file to file by the kernel (``os.copy_file_range``), never
decoded. The bytes are what safetensors writes: an 8-byte little-endian header length, the JSON
header padded with spaces to a multiple of 8, then the tensor data in header order.
:class:`BackgroundIO` runs those writes on a thread of their own, in order, while the next
tensors are computed.

The output directory is staged as ``.OUT.adapterfmt-tmp-<pid>`` beside ``OUT``, every file is
fsynced, and it is renamed into place only when complete. A run killed half-way leaves only that
clearly named directory; the next run into the same ``OUT`` removes it (a stale one is found by
its lock: each live run holds ``flock`` on its staging directory, which the kernel drops when the
process dies). ``--overwrite`` renames the old ``OUT`` aside as ``.OUT.adapterfmt-old-<pid>``,
moves the new one in, then deletes the old one.

Test hook: ``ADAPTERFMT_TEST_PAUSE_AT=<point>`` makes the merge sleep at that point (for
``ADAPTERFMT_TEST_PAUSE_SECONDS``, default 300) so a test can kill it there; when
``ADAPTERFMT_TEST_PAUSE_MARKER`` names a file, the point's name is written to it first. Points:
``start`` (staging directory created, nothing written), ``write:<N>`` (the first tensor, or run
of copied tensors, of shard N, 1-based, is in the file), ``files`` (all shards written),
``rename`` (output complete, before the rename).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from math import prod
from typing import Any, Callable, Mapping, Optional, Sequence

from .constants import DTYPE_BITS
from .errors import DiskSpaceError, OutputPathError

TMP_TAG = "adapterfmt-tmp"
OLD_TAG = "adapterfmt-old"
#: Bytes per kernel copy call (so progress moves during long copies).
_COPY_STEP = 64 << 20
#: Free space asked for beyond the output's bytes (directory entries, filesystem metadata).
_SPACE_MARGIN = 1 << 20
_BLOCK = 4096

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TensorSpec:
    """A header entry: key, safetensors dtype, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BITS[self.dtype] // 8


def encode_header(specs: Sequence[TensorSpec], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The 8-byte length plus JSON header for ``specs`` laid out back to back in order."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for s in specs:
        doc[s.key] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_size(specs: Sequence[TensorSpec], metadata: Optional[Mapping[str, str]] = None) -> int:
    return len(encode_header(specs, metadata)) + sum(s.nbytes for s in specs)


class ShardWriter:
    """Writes one safetensors file whose header is known in advance, tensor bytes in header order.

    ``write(key, data)`` appends bytes of ``key`` (in as many calls as wanted); ``copy(keys, fd,
    offset)`` copies the bytes of consecutive tensors from another file; ``close()`` checks that
    every tensor is complete, fsyncs and closes. Writing out of order or too much raises
    ``RuntimeError`` (a bug, not bad input).
    """

    def __init__(self, path: str, specs: Sequence[TensorSpec], *, metadata: Optional[Mapping[str, str]] = None, progress: Optional[Progress] = None) -> None:
        self.path = path
        self._specs = list(specs)
        self._at = 0  # index of the tensor being written
        self._filled = 0  # bytes of it written so far
        self._progress = progress
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._write_all(encode_header(self._specs, metadata))
        except BaseException:
            os.close(self._fd)
            raise

    def _write_all(self, data: "bytes | memoryview") -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _enter(self, key: str) -> None:
        """Move to ``key``: the current tensor must be complete (zero-byte tensors are skipped)."""
        while self._at < len(self._specs):
            spec = self._specs[self._at]
            if spec.key == key:
                return
            if self._filled != spec.nbytes:
                raise RuntimeError(f"{self.path}: '{spec.key}' has {self._filled} of {spec.nbytes} bytes, '{key}' cannot start")
            self._at, self._filled = self._at + 1, 0
        raise RuntimeError(f"{self.path}: '{key}' is not next in the header")

    def _advance(self, n: int) -> None:
        self._filled += n
        if self._filled == self._specs[self._at].nbytes:
            self._at, self._filled = self._at + 1, 0
        if self._progress is not None:
            self._progress(n)

    def write(self, key: str, data: "bytes | memoryview") -> None:
        """Append bytes of tensor ``key``."""
        self._enter(key)
        n = memoryview(data).nbytes
        if self._filled + n > self._specs[self._at].nbytes:
            raise RuntimeError(f"{self.path}: '{key}' would get {self._filled + n} bytes, expected {self._specs[self._at].nbytes}")
        self._write_all(data)
        self._advance(n)

    def copy(self, keys: Sequence[str], src_fd: int, offset: int) -> None:
        """Copy the bytes of the consecutive tensors ``keys`` from ``src_fd`` at ``offset``."""
        for key in keys:
            self._enter(key)
            if self._filled:
                raise RuntimeError(f"{self.path}: '{key}' is partly written, it cannot be copied")
            length = self._specs[self._at].nbytes
            while length:
                step = min(length, _COPY_STEP)
                copy_range(src_fd, self._fd, offset, step)
                offset += step
                length -= step
                self._advance(step)

    def abort(self) -> None:
        """Close without checks (the staging directory is about to be removed); idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        """Check completeness, fsync, close."""
        try:
            if self._at < len(self._specs):
                self._enter(self._specs[-1].key)
                if self._at != len(self._specs) - 1 or self._filled != self._specs[-1].nbytes:
                    raise RuntimeError(f"{self.path}: closed before every tensor was written")
            os.fsync(self._fd)
        finally:
            self.abort()


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src_fd`` to the current position of ``dst_fd``.

    ``os.copy_file_range`` keeps the bytes in the kernel (and may share extents on reflink
    filesystems); where it is refused (another filesystem, old kernel) ``os.sendfile`` and then a
    plain read/write loop take over.
    """
    while length:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            _copy_fallback(src_fd, dst_fd, offset, length)
            return
        if n == 0:
            raise OSError(errno.EIO, "source file ended early (was it changed during the merge?)")
        offset += n
        length -= n


def _copy_fallback(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    while length:
        try:
            n = os.sendfile(dst_fd, src_fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            chunk = os.pread(src_fd, min(length, 8 << 20), offset)
            n = len(chunk)
            if n:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst_fd, view) :]
        if n == 0:
            raise OSError(errno.EIO, "source file ended early (was it changed during the merge?)")
        offset += n
        length -= n


class BackgroundIO:
    """Runs file writes in order on one background thread, so they overlap the computation.

    ``submit(fn, *args, nbytes=n)`` queues a call; it blocks while more than ``limit`` bytes of
    queued buffers wait (one call is always let through), which bounds the memory they hold.
    The first error is raised by the next ``submit``, by ``drain`` or by ``close``; after an error
    the queued calls are skipped. Use as a context manager: leaving it on an exception skips
    what is still queued and waits for the call in progress.
    """

    def __init__(self, limit: int = 16 << 20) -> None:
        self._limit = limit
        self._cv = threading.Condition()
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...], int]] = deque()
        self._inflight = 0  # bytes held by queued and running calls
        self._pending = 0  # queued and running calls
        self._error: Optional[BaseException] = None
        self._closed = False
        self.busy = 0.0  #: seconds spent running calls
        self.waited = 0.0  #: seconds ``submit`` / ``drain`` callers spent blocked
        self._thread = threading.Thread(target=self._run, name="adapterfmt-io", daemon=True)
        self._thread.start()

    def __enter__(self) -> "BackgroundIO":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            with self._cv:
                self._error = self._error or RuntimeError("aborted")
        self.close(raise_error=exc_type is None)

    def submit(self, fn: Callable[..., Any], *args: Any, nbytes: int = 0) -> None:
        with self._cv:
            start = time.perf_counter()
            while self._error is None and self._inflight and self._inflight + nbytes > self._limit:
                self._cv.wait()
            self.waited += time.perf_counter() - start
            if self._error is not None:
                raise self._error
            self._items.append((fn, args, nbytes))
            self._inflight += nbytes
            self._pending += 1
            self._cv.notify_all()

    def drain(self) -> None:
        """Wait until every submitted call has run."""
        with self._cv:
            start = time.perf_counter()
            while self._pending and self._error is None:
                self._cv.wait()
            self.waited += time.perf_counter() - start
            if self._error is not None:
                raise self._error

    def close(self, *, raise_error: bool = True) -> None:
        """Run what is queued (unless an error came first), stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        if raise_error and self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._items and not self._closed:
                    self._cv.wait()
                if not self._items:
                    return
                fn, args, nbytes = self._items.popleft()
                skip = self._error is not None
            error = None
            start = time.perf_counter()
            if not skip:
                try:
                    fn(*args)
                except BaseException as e:  # handed to the submitting thread
                    error = e
            with self._cv:
                self.busy += time.perf_counter() - start
                if error is not None and self._error is None:
                    self._error = error
                self._inflight -= nbytes
                self._pending -= 1
                self._cv.notify_all()


def pause_requested(name: str) -> bool:
    return os.environ.get("ADAPTERFMT_TEST_PAUSE_AT") == name


def pause_point(name: str) -> None:
    """The test hook described in the module docstring: sleep at ``name`` when asked to."""
    if not pause_requested(name):
        return
    marker = os.environ.get("ADAPTERFMT_TEST_PAUSE_MARKER")
    if marker:  # written whole, then renamed: a watcher never reads a half-written marker
        with open(f"{marker}.tmp", "w") as f:
            f.write(name)
        os.replace(f"{marker}.tmp", marker)
    time.sleep(float(os.environ.get("ADAPTERFMT_TEST_PAUSE_SECONDS", "300")))


# ---------------------------------------------------------------------------------------------
# OUTPUT DIRECTORY
# ---------------------------------------------------------------------------------------------


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


def _try_lock(path: str) -> Optional[int]:
    """An fd holding an exclusive flock on directory ``path``, or None if another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class StagedDirectory:
    """``OUT`` written all or nothing: a locked staging directory beside it, renamed in on commit.

    Use as a context manager; leaving it without :meth:`commit` removes the staging directory.
    Call :func:`clean_stale` first.
    """

    def __init__(self, out: str, *, overwrite: bool = False) -> None:
        self.out = os.path.abspath(out)
        self.parent, self.name = os.path.split(self.out)
        self.overwrite = overwrite
        self.path = os.path.join(self.parent, f".{self.name}.{TMP_TAG}-{os.getpid()}")
        self._lock: Optional[int] = None
        self._committed = False

    def __enter__(self) -> "StagedDirectory":
        os.makedirs(self.parent, exist_ok=True)
        os.mkdir(self.path, 0o755)
        self._lock = _try_lock(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def commit(self) -> None:
        """fsync the staging directory and rename it to ``OUT`` (the old ``OUT`` aside first)."""
        _fsync_dir(self.path)
        old = None
        if os.path.isdir(self.out) and os.listdir(self.out):
            if not self.overwrite:
                raise OutputPathError("was created while the merge ran", path=self.out, hint="pass --overwrite or choose another path")
            old = os.path.join(self.parent, f".{self.name}.{OLD_TAG}-{os.getpid()}")
            old_lock = _try_lock(self.out)
            os.rename(self.out, old)
            try:
                os.rename(self.path, self.out)
            except OSError:
                os.rename(old, self.out)
                raise
            finally:
                if old_lock is not None:
                    os.close(old_lock)
        else:
            os.rename(self.path, self.out)  # replaces an empty OUT directory atomically
        self._committed = True
        _fsync_dir(self.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
        fd = _try_lock(path)
        if fd is None:
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
            os.close(fd)
        removed.append(path)
    return removed


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
