"""Output files whose layout is known in advance, written at their offsets by several threads at once.

A merged safetensors shard's header fixes where every tensor's bytes go, so there is no need to
write in order: each worker thread computes a tensor and writes its blocks straight to their place
(``pwrite``), or copies a run of untouched tensors file to file (``copy_file_range``). Nothing is
held back to keep the order, so a worker's memory is its reused buffers, never a whole tensor.

After each job its byte range is handed to the kernel for writeback (``sync_file_range`` on Linux,
:func:`adapterfmt.storage.os_calls.start_writeback`), so the disk works while the next tensors are
computed and the final sync of each file finds little left. A file is synced (on its own thread,
in parallel with the others) as soon as its last job is done.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Optional

from . import os_calls

Progress = Callable[[int], None]


class PlacedFile:
    """A file of ``size`` bytes whose parts are written at known offsets, from any thread.

    ``header``: the first bytes, written at once (and not reported as progress).

    :meth:`write` and :meth:`copy` put bytes at an offset; :meth:`finish` checks that exactly
    ``size`` bytes were written, makes them durable and closes; :meth:`abort` just closes.
    Overlapping or missing writes are a bug of the caller: :meth:`finish` raises ``RuntimeError``
    when the byte count is off.
    """

    def __init__(self, path: str, size: int, *, header: bytes = b"", progress: Optional[Progress] = None) -> None:
        self.path = path
        self.size = size
        self.seconds = 0.0  #: time spent in writes and copies, summed over threads
        self._fd = os_calls.open_new(path)
        self._written = 0
        self._lock = threading.Lock()
        self._progress = None
        if header:  # written now, not counted as progress
            try:
                self.write(0, header)
            except BaseException:
                self.abort()
                raise
        self._progress = progress

    def _count(self, n: int, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds
            self._written += n
            if self._written > self.size:
                raise RuntimeError(f"{self.path}: {self._written} bytes written into a file of {self.size}")
        if self._progress is not None:
            self._progress(n)

    def write(self, offset: int, data: "bytes | bytearray | memoryview") -> None:
        """Write ``data`` at ``offset``."""
        view = memoryview(data).cast("B")
        if offset + view.nbytes > self.size:
            raise RuntimeError(f"{self.path}: bytes {offset}..{offset + view.nbytes} lie past its end ({self.size})")
        mark = time.perf_counter()
        os_calls.write_at(self._fd, view, offset)
        self._count(view.nbytes, time.perf_counter() - mark)

    def copy(self, src_fd: int, src_offset: int, length: int, offset: int) -> None:
        """Copy ``length`` bytes of ``src_fd`` at ``src_offset`` to ``offset``."""
        if offset + length > self.size:
            raise RuntimeError(f"{self.path}: bytes {offset}..{offset + length} lie past its end ({self.size})")
        mark = time.perf_counter()
        os_calls.copy_range(src_fd, self._fd, src_offset, length, dst_offset=offset)
        self._count(length, time.perf_counter() - mark)

    def written(self, offset: int, length: int) -> None:
        """A job finished these bytes: start writing them back to disk now."""
        os_calls.start_writeback(self._fd, offset, length)

    def finish(self) -> None:
        """Check every byte is written, make the file durable, close it."""
        try:
            if self._written != self.size:
                raise RuntimeError(f"{self.path}: closed with {self._written} of {self.size} bytes written")
            os_calls.sync_data(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without checks (the staging directory is about to be removed); idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


#: A job writes one part of one file; ``(file index, job)``.
Job = tuple[int, Callable[[PlacedFile], None]]


def write_files(
    files: "list[PlacedFile]",
    jobs: Iterable[Job],
    *,
    workers: int,
    sync_threads: int = 4,
    after_first: Optional[Callable[[int], None]] = None,
    timings: Optional[dict[str, float]] = None,
    first: Iterable[Job] = (),
) -> None:
    """Run ``jobs`` on ``workers`` threads, roughly in order; finish (sync, close) each file once
    its last job is done, ``sync_threads`` files at a time. On the first error, jobs not started
    are cancelled, the ones running are waited for, and the error is raised (files are left open
    for the caller's :meth:`PlacedFile.abort`).

    ``first``: jobs run one after another on the calling thread before any worker starts (a merge's
    whole-tensor products, which must run with the caller's intra-op threads while no worker
    computes beside them).

    ``after_first(i)`` runs (on the worker) right after the first job of file ``i`` (a test hook:
    crash tests pause there). ``timings`` gets ``jobs`` (seconds in jobs, summed over workers),
    ``wait`` (this thread waiting for the jobs) and ``sync`` (waiting for the last syncs).
    """
    jobs, first = list(jobs), list(first)
    pending = [0] * len(files)
    for index, _ in first + jobs:
        pending[index] += 1
    lock = threading.Lock()
    started: set[int] = set()
    busy = [0.0]
    syncs: list[Future[None]] = []
    with ThreadPoolExecutor(max_workers=max(1, sync_threads), thread_name_prefix="adapterfmt-sync") as syncer:
        for i, count in enumerate(pending):
            if count == 0:
                syncs.append(syncer.submit(files[i].finish))

        failed = threading.Event()

        def run(index: int, job: Callable[[PlacedFile], None]) -> None:
            if failed.is_set():
                return  # an earlier job failed: the run is over
            mark = time.perf_counter()
            try:
                job(files[index])
            except BaseException:
                failed.set()
                raise
            with lock:
                busy[0] += time.perf_counter() - mark
                first = index not in started
                started.add(index)
                pending[index] -= 1
                last = pending[index] == 0
            if first and after_first is not None:
                after_first(index)
            if last:
                syncs.append(syncer.submit(files[index].finish))

        for index, job in first:
            run(index, job)
        mark = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="adapterfmt-merge") as pool:
            futures = [pool.submit(run, index, job) for index, job in jobs]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # interrupted (Ctrl-C): no job starts any more
                failed.set()
                raise
            finally:
                for f in futures:
                    f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
        waited = time.perf_counter() - mark
        mark = time.perf_counter()
        for s in syncs:
            s.result()
        if timings is not None:
            timings["jobs"] = timings.get("jobs", 0.0) + busy[0]
            timings["wait"] = timings.get("wait", 0.0) + waited
            timings["sync"] = timings.get("sync", 0.0) + time.perf_counter() - mark
