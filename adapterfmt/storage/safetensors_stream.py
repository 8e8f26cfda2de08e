"""A streaming safetensors encoder: the header computed in advance, tensor bytes appended in order.

Why hand-written: safetensors' ``save_file`` serialises a whole dict of tensors, so a shard would
sit in memory at once. Here the header is computed from dtypes and shapes known in advance, then
tensor bytes are appended one tensor — or one block of rows — at a time, and untouched tensors
are copied file to file by the kernel (:func:`adapterfmt.storage.os_calls.copy_range`), never decoded.
The bytes are what safetensors writes: an 8-byte little-endian header length, the JSON header padded with spaces to
a multiple of 8, then the tensor data in header order. No torch here.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from typing import Callable, Mapping, Optional, Sequence

from ..constants import DTYPE_BITS
from . import os_calls

#: Bytes per kernel copy call (so progress moves during long copies).
_COPY_STEP = 64 << 20

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
        self._fd = os_calls.open_new(path)
        try:
            self._write_all(encode_header(self._specs, metadata))
        except BaseException:
            os.close(self._fd)
            raise

    def _write_all(self, data: "bytes | memoryview") -> None:
        os_calls.write_all(self._fd, data)

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
                os_calls.copy_range(src_fd, self._fd, offset, step)
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
            os_calls.sync_data(self._fd)
        finally:
            self.abort()
