"""Read the value of a 0-d (or one-element) tensor straight from its bytes, without torch.

kohya and LyCORIS store each module's alpha as a scalar tensor; inspect shows it and must not
import torch (docs/FORMAT.md §10.1), so the few bytes are decoded here: read from a local file
(:func:`read_scalar`) or fetched by range request for a file on the Hub (:mod:`adapterfmt.sources.hub_files`).
"""

from __future__ import annotations

import struct
from typing import Callable, Iterable, Sequence

from ..errors import HeaderError
from .header import TensorInfo

_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def read_scalar(info: TensorInfo) -> float:
    """The single value of ``info`` as a float, read from its local file.

    Raises:
        HeaderError: the tensor holds more than one value or has a dtype with no scalar reading.
    """
    check_scalar(info)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        raw = f.read(info.nbytes)
    return decode_scalar(info, raw)


def check_scalar(info: TensorInfo) -> None:
    """Refuse a tensor that is not one value of a dtype read as a scalar (before reading its bytes).

    Raises:
        HeaderError: more than one value, or a dtype with no scalar reading.
    """
    if info.numel != 1:
        raise HeaderError(f"holds {info.numel} values where one scalar (alpha) was expected", path=info.file, key=info.key)
    if info.dtype != "BF16" and info.dtype not in _FORMATS:
        raise HeaderError(f"alpha has dtype {info.dtype}, which adapterfmt does not read as a scalar", path=info.file, key=info.key)


def decode_scalar(info: TensorInfo, raw: bytes) -> float:
    """The value of ``info`` from its bytes ``raw`` (read locally or by range request).

    Raises:
        HeaderError: as :func:`check_scalar`, or ``raw`` is shorter than the tensor.
    """
    check_scalar(info)
    if len(raw) != info.nbytes:
        raise HeaderError("the file is shorter than its header says", path=info.file, key=info.key)
    if info.dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + raw)[0]
    return float(struct.unpack(_FORMATS[info.dtype], raw)[0])


#: How a reader gets one scalar's value: :func:`read_scalar` for a local file.
ScalarReader = Callable[[TensorInfo], float]


def prefetched_scalars(tensors: Iterable[TensorInfo], fetch: Callable[[Sequence[tuple[int, int]]], list[bytes]]) -> ScalarReader:
    """A :data:`ScalarReader` for a remote file: the bytes of every one-value ``….alpha`` tensor of
    ``tensors`` fetched up front in one batch (``fetch``: byte ranges -> their bytes, e.g.
    :meth:`adapterfmt.sources.hub_files.RemoteFile.read_ranges`), any other scalar on demand."""
    wanted = [t for t in tensors if t.key.endswith(".alpha") and t.numel == 1]
    raw = dict(zip([t.key for t in wanted], fetch([(t.start, t.end) for t in wanted]))) if wanted else {}

    def scalar(info: TensorInfo) -> float:
        data = raw.get(info.key)
        if data is None:
            check_scalar(info)
            data = fetch([(info.start, info.end)])[0]
        return decode_scalar(info, data)

    return scalar
