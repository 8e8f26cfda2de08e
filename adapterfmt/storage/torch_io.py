"""Reading tensors described by :class:`~adapterfmt.storage.header.TensorInfo` (imports torch).

Tensor bytes are read by the one reader, :mod:`adapterfmt.storage.tensor_source`; pickle ``.bin`` adapters only through
``torch.load(weights_only=True)``, and only when the caller allowed pickles.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..errors import HeaderError, UnsafeFileError
from .header import SafetensorsHeader, TensorInfo

#: safetensors dtype name -> torch dtype (entries needing newer torch are added when present).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
}
for _name, _attr in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as safetensors stores them (contiguous, native little-endian order)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def read_pickle_weights(path: str) -> tuple[SafetensorsHeader, dict[str, torch.Tensor]]:
    """Load a ``.bin`` state dict with ``weights_only=True`` and describe it like a header.

    Raises:
        UnsafeFileError: the file holds more than tensors (``weights_only`` refused it).
    """
    try:
        with warnings.catch_warnings():  # torch warns on stderr about pickle protocols; the CLI prints one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise UnsafeFileError(f"cannot be loaded with torch.load(weights_only=True) ({type(e).__name__})", path=path) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UnsafeFileError("is not a flat dict of name -> tensor", path=path)
    tensors = {}
    for k, v in state.items():
        dtype = SAFETENSORS_DTYPES.get(v.dtype)
        if dtype is None:
            raise HeaderError(f"has unsupported dtype {v.dtype}", path=path, key=k)
        tensors[k] = TensorInfo(k, os.fspath(path), dtype, tuple(v.shape), -1, -1)
    return SafetensorsHeader(path=os.fspath(path), tensors=tensors, metadata={}), state
