"""Read the value of a 0-d (or one-element) tensor straight from its bytes, without torch.

kohya and LyCORIS store each module's alpha as a scalar tensor; inspect shows it and must not
import torch (docs/FORMAT.md §10.1), so the few bytes are decoded here.
"""

from __future__ import annotations

import struct

from ..errors import HeaderError
from ..header import TensorInfo

_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def read_scalar(info: TensorInfo) -> float:
    """The single value of ``info`` as a float.

    Raises:
        HeaderError: the tensor holds more than one value or has a dtype with no scalar reading.
    """
    if info.numel != 1:
        raise HeaderError(f"holds {info.numel} values where one scalar (alpha) was expected", path=info.file, key=info.key)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise HeaderError("the file is shorter than its header says", path=info.file, key=info.key)
    if info.dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + raw)[0]
    fmt = _FORMATS.get(info.dtype)
    if fmt is None:
        raise HeaderError(f"alpha has dtype {info.dtype}, which adapterfmt does not read as a scalar", path=info.file, key=info.key)
    return float(struct.unpack(fmt, raw)[0])
