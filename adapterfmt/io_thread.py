"""The background I/O thread: file writes run in order on a thread of their own while the next
tensors are computed, with the bytes of queued buffers bounded."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Optional


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
