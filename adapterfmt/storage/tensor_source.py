"""The one reader of tensors by byte offset: merge, load, scan, convert and the wrapped-checkpoint
comparison all read tensor bytes here.

File tensors are read with positional reads (:func:`adapterfmt.storage.os_calls.read_into`) at the header's byte offsets (validated by
:func:`~adapterfmt.storage.header.read_header`) into fresh buffers, whole or a block of rows at a time;
this is what lets a merge stream rows, which ``safe_open`` would serve through mmap page faults.
Tensors held in memory (``.bin`` adapters, a state dict) are looked up by file and key. Raw bytes
(:meth:`TensorSource.read_bytes`, :meth:`TensorSource.fd`) need no torch; only
:meth:`TensorSource.read` imports it, so header-only paths stay torch-free.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Mapping, Optional

from ..errors import HeaderError, ShapeMismatchError, UnsupportedFeatureError
from . import os_calls
from .header import TensorInfo

#: Bytes compared at a time by :meth:`TensorSource.same_bytes`.
_CHUNK = 8 << 20


class TensorSource:
    """Reads tensors by :class:`TensorInfo`, keeping one read-only descriptor per file (thread-safe).

    ``memory`` maps a file name to the tensors held in memory for it (key -> tensor).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, memory: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        self._memory = dict(memory or {})
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.seconds = 0.0  #: time spent reading files, summed over threads

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def fd(self, file: str) -> int:
        """A read-only descriptor of ``file`` (opened once, hinted for sequential reads)."""
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = os_calls.open_read(file)
                self._fds[file] = fd
            return fd

    def read_bytes(self, file: str, start: int, length: int, *, key: Optional[str] = None) -> bytearray:
        """``length`` bytes of ``file`` at ``start``, in a fresh buffer.

        Raises:
            HeaderError: the file ends first (it changed after its header was read).
        """
        raw = bytearray(length)
        self.read_into(file, start, memoryview(raw), key=key)
        return raw

    def read_into(self, file: str, start: int, view: memoryview, *, key: Optional[str] = None) -> None:
        """Fill ``view`` (a reused buffer) with the bytes of ``file`` at ``start``.

        Raises:
            HeaderError: the file ends first (it changed after its header was read).
        """
        mark = time.perf_counter()
        if not os_calls.read_exact(self.fd(file), view, start):
            raise HeaderError("ended before the tensor's bytes (was it changed during the merge?)", path=file, key=key)
        with self._lock:
            self.seconds += time.perf_counter() - mark

    def held(self, info: TensorInfo) -> Any:
        """The in-memory tensor of ``info`` (``info.start < 0``)."""
        return self._memory[info.file][info.key]

    def read(self, info: TensorInfo, rows: Optional[tuple[int, int]] = None, *, into: Optional[bytearray] = None) -> Any:
        """The tensor ``info`` (rows ``rows[0]:rows[1]`` of it) as a torch tensor in its stored dtype.

        ``into``: a reused buffer of at least the tensor's size to read into (the tensor is a view
        of it, valid until the buffer is reused) instead of a fresh one.

        Raises:
            UnsupportedFeatureError: a dtype torch cannot compute with.
            HeaderError: the file is shorter than its header says.
            ShapeMismatchError: ``rows`` outside the tensor.
        """
        import torch

        from .torch_io import TORCH_DTYPES

        if rows is not None and not (info.shape and 0 <= rows[0] <= rows[1] <= info.shape[0]):
            # a caller's bug or a factor of another size than its placement: never read a neighbour's bytes
            raise ShapeMismatchError(
                f"rows {rows[0]}:{rows[1]} asked of a tensor of shape {list(info.shape)}", path=info.file, key=info.key,
                hint="the module's factor does not have the rows its place in the base needs",
            )
        if info.start < 0:
            t = self.held(info)
            return t if rows is None else t[rows[0] : rows[1]]
        if info.dtype not in TORCH_DTYPES:
            raise UnsupportedFeatureError(
                f"has dtype {info.dtype}, which adapterfmt cannot compute with", path=info.file, key=info.key, hint="convert it to F32, F16 or BF16"
            )
        start, length, shape = info.start, info.nbytes, info.shape
        if rows is not None:
            row = info.nbytes // info.shape[0]
            start, length, shape = info.start + rows[0] * row, (rows[1] - rows[0]) * row, (rows[1] - rows[0], *info.shape[1:])
        if into is not None and len(into) >= length:
            raw = into
            self.read_into(info.file, start, memoryview(into)[:length], key=info.key)
        else:
            raw = self.read_bytes(info.file, start, length, key=info.key)
        # frombuffer shares the bytearray's memory: no copy, and the tensor is writable
        buf = torch.frombuffer(raw, dtype=torch.uint8, count=length) if length else torch.empty(0, dtype=torch.uint8)
        return buf.view(TORCH_DTYPES[info.dtype]).reshape(shape)

    def same_bytes(self, a: TensorInfo, b: TensorInfo) -> bool:
        """Whether two tensors have the same dtype, shape and bytes (compared a chunk at a time)."""
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            return False
        if a.start < 0 or b.start < 0:
            import torch

            x, y = self.read(a).contiguous().reshape(-1), self.read(b).contiguous().reshape(-1)
            return bool(torch.equal(x.view(torch.uint8), y.view(torch.uint8)))
        if a.nbytes != b.nbytes:
            return False
        local = self._local
        if not hasattr(local, "chunks"):  # two chunk buffers per thread, reused: no allocation (and page faults) per chunk
            local.chunks = bytearray(_CHUNK), bytearray(_CHUNK)
        x, y = local.chunks
        done = 0
        while done < a.nbytes:
            n = min(_CHUNK, a.nbytes - done)
            vx, vy = memoryview(x)[:n], memoryview(y)[:n]
            self.read_into(a.file, a.start + done, vx, key=a.key)
            self.read_into(b.file, b.start + done, vy, key=b.key)
            if (x if n == _CHUNK else vx.tobytes()) != (y if n == _CHUNK else vy.tobytes()):
                return False
            done += n
        return True


class TensorReader(TensorSource):
    """A :class:`TensorSource` for one checkpoint whose in-memory tensors (a ``.bin`` adapter) are
    looked up by key alone; :meth:`get` reads one tensor."""

    def __init__(self, in_memory: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        self._in_memory = dict(in_memory or {})

    def held(self, info: TensorInfo) -> Any:
        return self._in_memory[info.key]

    def get(self, info: TensorInfo) -> Any:
        """The tensor ``info`` as a torch tensor (see :meth:`TensorSource.read`)."""
        return self.read(info)
