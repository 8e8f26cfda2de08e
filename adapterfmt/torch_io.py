"""Reading tensors described by :class:`~adapterfmt.header.TensorInfo` (imports torch).

Safetensors files are read through safetensors' own ``safe_open`` (one handle per file, kept
open while a :class:`TensorReader` lives); pickle ``.bin`` adapters only through
``torch.load(weights_only=True)``, and only when the caller allowed pickles.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open

from .errors import HeaderError, UnsafeFileError, UnsupportedFeatureError
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


class TensorReader:
    """Reads tensors by :class:`TensorInfo`, keeping one ``safe_open`` handle per file.

    ``in_memory`` serves tensors already loaded (``.bin`` adapters) by key.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, in_memory: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self._handles: dict[str, Any] = {}
        self._in_memory = dict(in_memory or {})

    def get(self, info: TensorInfo) -> torch.Tensor:
        if info.key in self._in_memory and info.start == info.end == -1:
            return self._in_memory[info.key]
        if info.dtype not in TORCH_DTYPES:
            raise UnsupportedFeatureError(
                f"has dtype {info.dtype}, which adapterfmt cannot compute with", path=info.file, key=info.key, hint="convert it to F32, F16 or BF16"
            )
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(info.file, framework="pt")
            except (SafetensorError, OSError) as e:
                raise HeaderError(f"cannot be opened by safetensors ({e})", path=info.file) from None
            self._handles[info.file] = handle
        try:
            return handle.get_tensor(info.key)
        except (SafetensorError, OSError) as e:
            raise HeaderError(f"cannot be read ({e})", path=info.file, key=info.key) from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
