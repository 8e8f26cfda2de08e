"""Read a safetensors header without reading tensor bytes and without importing torch.

Why by hand and not ``safetensors.safe_open``: inspect must not import torch (``safe_open``
needs a framework to return shapes through slices), the merge engine needs the raw byte
offsets to copy untouched tensors through without decoding them, and every defect must become
an :class:`~adapterfmt.errors.HeaderError` that names the file and the key. The checks are the
ones the safetensors library itself makes (``safetensors/src/tensor.rs``), plus duplicate keys.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from itertools import islice
from json.decoder import scanstring
from math import prod
from operator import attrgetter
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from ..constants import DTYPE_BITS, MAX_HEADER_BYTES
from ..errors import HeaderError
from .gc_pause import with_gc_paused


class TensorInfo(NamedTuple):
    """Where one tensor lives: file, dtype, shape and absolute byte range in the file.

    Immutable and small. A tuple rather than a frozen dataclass: a 200k-tensor header builds
    200k of these, and a tuple is built in a third of the time of a frozen dataclass (which sets
    each field through ``object.__setattr__``).
    """

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  #: absolute offset of the first byte in ``file``
    end: int  #: absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    path: str
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)
    data_start: int = 8

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class _Object(list):
    """A JSON object as its list of ``(key, value)`` pairs (``json``'s ``object_pairs_hook``).

    A list keeps duplicate keys visible (a dict would keep the last one silently), the C decoder
    builds it without calling Python code, and its own type tells an object from an array.
    """

    __slots__ = ()


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(object_pairs_hook=_Object)


def _top_level_entries(text: str) -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of the top-level JSON object in ``text``, one entry decoded at a time.

    The object's own punctuation is walked here; every key and value is decoded by ``json``
    itself (``scanstring``, ``raw_decode``), so what is accepted is what ``json.loads`` accepts.
    Slow but exact: only a header the one-call decoder refuses is read this way (:func:`_entries`).

    Raises:
        ValueError: the text is not one JSON object (json's ``JSONDecodeError`` included).
    """
    end = _WS.match(text, 1).end()  # text[0] == "{"
    if text.startswith("}", end):
        if _WS.match(text, end + 1).end() != len(text):
            raise ValueError("extra data after the header object")
        return
    while True:
        if not text.startswith('"', end):
            raise ValueError(f"expected a key at {end}")
        key, end = scanstring(text, end + 1, True)
        end = _WS.match(text, end).end()
        if not text.startswith(":", end):
            raise ValueError(f"expected ':' at {end}")
        value, end = _DECODER.raw_decode(text, _WS.match(text, end + 1).end())
        yield key, value
        end = _WS.match(text, end).end()
        if text.startswith(",", end):
            end = _WS.match(text, end + 1).end()
        elif text.startswith("}", end):
            if _WS.match(text, end + 1).end() != len(text):
                raise ValueError("extra data after the header object")
            return
        else:
            raise ValueError(f"expected ',' or '}}' at {end}")


def _fields(pairs: "_Object") -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


def _unique_dict(pairs: list) -> dict[str, Any]:
    """``object_pairs_hook`` of the fast path: a dict, or :class:`_Duplicate` if a key repeats."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Duplicate("")
    return out


def _entries(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """The header's top-level ``(key, value)`` pairs, each object value a dict (or, read by the
    exact reader, an :class:`_Object` of its pairs).

    Fast path: one ``json.loads`` in C, with a hook that refuses a repeated key at any level;
    each entry is popped as it is handed out so the tree shrinks while records are built. A text
    that path rejects (bad JSON, a duplicate) is read again entry by entry
    (:func:`_top_level_entries`), which names the defect: the error is the same as if only the
    exact parser existed, and a valid header is decoded in less than half the time (a 200k-tensor
    header: 0.4 s instead of 1.0 s), for a higher peak (the whole tree at once: 166 MB of Python
    allocations for that 24.8 MB header, against 81 MB).

    Raises:
        HeaderError: not valid JSON, or a top-level key (or ``__metadata__``) that repeats.
    """
    try:
        tree = json.loads(text, object_pairs_hook=_unique_dict)
    except (ValueError, RecursionError, _Duplicate):
        tree = None
    if type(tree) is dict:
        for key in list(tree):
            yield key, tree.pop(key)
        return
    seen: set[str] = set()
    entries = _top_level_entries(text)
    while True:
        try:
            item = next(entries, None)
        except (ValueError, RecursionError):
            raise HeaderError("header is not valid JSON", path=name, hint="the file is damaged or not safetensors") from None
        if item is None:
            return
        key, entry = item
        if key in seen:
            raise HeaderError("appears twice in the header", path=name, key=key, hint="the writer is broken; re-export the file")
        seen.add(key)
        yield key, entry


@with_gc_paused
def read_header(path: "str | os.PathLike[str]") -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        A :class:`SafetensorsHeader` whose tensors carry absolute byte offsets.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        HeaderError: the header is truncated, too large, not a JSON object, has duplicate keys,
            an unknown dtype, offsets that overlap, leave holes or run past the end of the file,
            or a byte length that does not match ``shape × dtype``.
    """
    from ..errors import CheckpointNotFoundError

    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if not os.path.isfile(path) and not os.path.isdir(path):
            # a FIFO would block open() forever, a device has no size: refuse before opening
            raise HeaderError("is not a regular file (a pipe or a device)", path=path, hint="point at a .safetensors file")
        with open(path, "rb") as f:
            return parse_header(path, size, f.read)
    except FileNotFoundError:
        raise CheckpointNotFoundError("no such file", path=path) from None
    except IsADirectoryError:
        raise CheckpointNotFoundError("is a directory, expected a .safetensors file", path=path) from None
    except OSError as e:
        raise HeaderError(f"cannot be read ({e.strerror or type(e).__name__})", path=path) from None


@with_gc_paused
def parse_header(name: str, size: int, read: Callable[[int], bytes]) -> SafetensorsHeader:
    """Parse and validate the header of a ``size``-byte safetensors file whose bytes ``read(n)``
    returns in order from the start: a local file (:func:`read_header`) or a remote one read by
    range request (:mod:`adapterfmt.sources.hub_files`). ``name`` is what the records and errors call
    the file (each :class:`TensorInfo`'s ``file``).

    Raises:
        HeaderError: as :func:`read_header`.
        OSError: ``read`` failed.
    """
    head = read(8)
    if len(head) < 8:
        raise HeaderError(
            f"file is {size} bytes, too short for a safetensors header",
            path=name,
            hint="the file is truncated or not safetensors; download it again",
        )
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise HeaderError(
            f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit",
            path=name,
            hint="the file is damaged or not safetensors",
        )
    if 8 + n > size:
        raise HeaderError(
            f"header length {n} runs past the end of the {size}-byte file",
            path=name,
            hint="the file is truncated; download it again",
        )
    raw = read(n)
    if len(raw) != n:
        raise HeaderError("the file is shorter than its header length says", path=name, hint="the file is truncated; download it again")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError("header is not UTF-8", path=name, hint="the file is damaged or not safetensors") from None
    del raw
    if not text.startswith("{"):
        raise HeaderError("header is not a JSON object", path=name, hint="the file is damaged or not safetensors")
    data_start = 8 + n
    buffer_len = size - data_start
    metadata: Any = {}
    tensors: dict[str, TensorInfo] = {}
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape
    for key, entry in _entries(text, name):
        try:
            if key == "__metadata__":
                metadata = _fields(entry) if type(entry) is _Object else entry
                continue
            tensors[key] = _tensor_info(name, key, entry, data_start, shapes)
        except _Duplicate as dup:
            raise HeaderError(f"field '{dup.key}' appears twice in the header entry", path=name, key=key, hint="the writer is broken; re-export the file") from None
    del text
    metadata = metadata or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise HeaderError("__metadata__ must map strings to strings", path=name, key="__metadata__")

    # Tensors must tile the byte buffer from 0 to its end, with no hole and no overlap.
    cursor = 0
    in_order = tensors.values()
    if any(a.end != b.start for a, b in zip(in_order, islice(in_order, 1, None))):
        in_order = sorted(in_order, key=attrgetter("start", "end"))  # the writer did not write them in order
    for info in in_order:
        rel_start, rel_end = info.start - data_start, info.end - data_start
        if rel_start != cursor:
            what = "overlap the previous tensor" if rel_start < cursor else f"leave a hole at byte {cursor}"
            raise HeaderError(f"data offsets {what}", path=name, key=info.key, hint="the file is damaged")
        cursor = rel_end
    if cursor != buffer_len:
        if cursor > buffer_len:
            raise HeaderError(
                f"tensor data needs {cursor} bytes but the file has {buffer_len} after the header",
                path=name,
                hint="the file is truncated; download it again",
            )
        raise HeaderError(
            f"{buffer_len - cursor} bytes after the last tensor are not covered by the header",
            path=name,
            hint="the file is damaged",
        )
    return SafetensorsHeader(path=name, tensors=tensors, metadata=dict(metadata), data_start=data_start)


def _tensor_info(path: str, key: str, entry: object, data_start: int, shapes: dict) -> TensorInfo:
    if type(entry) is _Object:
        fields = _fields(entry)
    elif type(entry) is dict:
        fields = entry
    else:
        raise HeaderError("header entry is not an object", path=path, key=key, hint="the file is damaged")
    dtype = fields.get("dtype")
    shape = fields.get("shape")
    offsets = fields.get("data_offsets")
    bits = DTYPE_BITS.get(dtype) if type(dtype) is str else None
    if bits is None:
        raise HeaderError(f"unknown dtype {_plain(dtype)!r}", path=path, key=key, hint=f"expected one of {', '.join(sorted(DTYPE_BITS))}")
    if type(shape) is not list or (shape and (not _INTS.issuperset(map(type, shape)) or min(shape) < 0)):
        raise HeaderError(f"shape {_plain(shape)!r} is not a list of non-negative integers", path=path, key=key, hint="the file is damaged")
    if type(offsets) is not list or len(offsets) != 2 or not _INTS.issuperset(map(type, offsets)) or not 0 <= offsets[0] <= offsets[1]:
        raise HeaderError(f"data_offsets {_plain(offsets)!r} are not [begin, end]", path=path, key=key, hint="the file is damaged")
    bits *= prod(shape)
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise HeaderError(
            f"shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets span {offsets[1] - offsets[0]}",
            path=path,
            key=key,
            hint="the file is damaged",
        )
    t = tuple(shape)
    return TensorInfo(key, path, _DTYPE_NAMES[dtype], shapes.setdefault(t, t), data_start + offsets[0], data_start + offsets[1])


_INTS = frozenset({int})  #: ``type(x) is int``: JSON integers only (never bool or float)
#: one string object per dtype name, shared by every TensorInfo
_DTYPE_NAMES = {name: name for name in DTYPE_BITS}


def _plain(value: object) -> object:
    """A parsed value as JSON would show it (objects back to dicts, at any depth) for error messages."""
    if type(value) is _Object:
        return {k: _plain(v) for k, v in value}  # type: ignore[misc]
    if type(value) is list:
        return [_plain(v) for v in value]
    return value
