"""Modules computed side by side: one torch thread per module, several modules at once.

The per-module work of ``resize`` and of ``combine``'s factor methods is a few small products and
an r×r eigendecomposition / SVD. torch's intra-op threads make those slower, not faster (a 64×64
``eigh`` takes 1 ms on one thread and 40 ms on two threads of a busy machine), so the work is
spread over modules instead: torch set to one thread, a pool of workers (torch releases the GIL in
its kernels), results in input order. The previous thread count is restored afterwards, and the
per-thread work buffers (:func:`~.svd.thread_workspace`) are dropped.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

from .svd import release_workspace

T = TypeVar("T")
R = TypeVar("R")

#: Most worker threads (each holds one module's float64 factors: tens of MB for 8B-sized modules).
MAX_WORKERS = 16


def map_modules(fn: Callable[[T], R], items: Iterable[T], *, workers: "int | None" = None) -> list[R]:
    """``[fn(x) for x in items]``, computed by a pool of threads with torch on one thread each."""
    items = list(items)
    n = workers or min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if n <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="adapterfmt-algebra") as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(previous)
        release_workspace()  # the workers' buffers go with their threads; the caller's (one worker) here
