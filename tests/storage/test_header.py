"""The pure-Python safetensors header reader, against the safetensors library itself.

Good files: every key, dtype, shape and byte range agrees with ``safe_open``. Damaged files:
``read_header`` raises a one-line :class:`HeaderError` naming the file (and the key), and
safetensors refuses the same file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from adapterfmt.errors import CheckpointNotFoundError, HeaderError
from adapterfmt.storage.header import read_header
from conftest import TESTDATA

NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}


@pytest.fixture
def good(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "good.safetensors"
    save_file(
        {
            "w": rng.standard_normal((3, 5)).astype(np.float32),
            "half": rng.standard_normal((2, 2, 2)).astype(np.float16),
            "ids": np.arange(7, dtype=np.int64),
            "mask": np.array([True, False]),
            "empty": np.zeros((0, 4), dtype=np.float32),
            "scalar": np.array(2.5, dtype=np.float64),
        },
        str(path),
        metadata={"format": "np", "note": "x"},
    )
    return path


def test_agrees_with_safe_open(good):
    header = read_header(good)
    raw = good.read_bytes()
    with safe_open(str(good), framework="np") as f:
        assert set(header.tensors) == set(f.keys())
        assert header.metadata == f.metadata() == {"format": "np", "note": "x"}
        for key, info in header.tensors.items():
            value = f.get_tensor(key)
            assert info.shape == value.shape and info.file == str(good)
            assert NUMPY_DTYPES[info.dtype] == value.dtype
            assert raw[info.start : info.end] == value.tobytes()
            assert info.nbytes == value.nbytes and info.numel == value.size


@pytest.mark.parametrize("name", ["tiny-llama-lora", "tiny-bert-classifier", "tiny-llama-dora"])
def test_real_adapters(name):
    path = TESTDATA / name / "adapter_model.safetensors"
    header = read_header(path)
    with safe_open(str(path), framework="np") as f:
        assert set(header.tensors) == set(f.keys())
        for key, info in header.tensors.items():
            assert list(info.shape) == f.get_slice(key).get_shape()


def test_real_sharded_base():
    index = json.loads((TESTDATA / "tiny-llama" / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        header = read_header(TESTDATA / "tiny-llama" / shard)
        assert {k for k, s in index["weight_map"].items() if s == shard} == set(header.tensors)
        assert {t.dtype for t in header.tensors.values()} == {"BF16"}


# ---------------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------------


def _file(tmp_path: Path, header: "dict | bytes", data: bytes, *, length: "int | None" = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
U = {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}

BROKEN = {
    "too-short": (lambda p: p.write_bytes(b"\x01\x02"), "too short for a safetensors header", None),
    "header-past-end": (lambda p: _file(p.parent, {"a": T}, b"\0" * 8, length=10_000), "runs past the end", None),
    "header-too-large": (lambda p: _file(p.parent, b"{}", b"", length=200_000_000), "exceeds the", None),
    "not-utf8": (lambda p: _file(p.parent, b"\xff\xfe{}", b""), "not UTF-8", None),
    "not-an-object": (lambda p: _file(p.parent, b"[1, 2]", b""), "not a JSON object", None),
    "bad-json": (lambda p: _file(p.parent, b'{"a": ', b""), "not valid JSON", None),
    "duplicate-key": (lambda p: _file(p.parent, b'{"a": %s, "a": %s}' % (json.dumps(T).encode(), json.dumps(U).encode()), b"\0" * 12), "appears twice", "a"),
    "unknown-dtype": (lambda p: _file(p.parent, {"a": {**T, "dtype": "F99"}}, b"\0" * 8), "unknown dtype 'F99'", "a"),
    "bad-shape": (lambda p: _file(p.parent, {"a": {**T, "shape": [-2]}}, b"\0" * 8), "not a list of non-negative integers", "a"),
    "bad-offsets": (lambda p: _file(p.parent, {"a": {**T, "data_offsets": [8, 0]}}, b"\0" * 8), "are not [begin, end]", "a"),
    "size-mismatch": (lambda p: _file(p.parent, {"a": {**T, "shape": [3]}}, b"\0" * 8), "needs 12 bytes but data_offsets span 8", "a"),
    "overlap": (lambda p: _file(p.parent, {"a": T, "b": {**U, "data_offsets": [4, 8]}}, b"\0" * 8), "overlap the previous tensor", "b"),
    "hole": (lambda p: _file(p.parent, {"a": T, "b": {**U, "data_offsets": [12, 16]}}, b"\0" * 16), "hole at byte 8", "b"),
    "truncated-data": (lambda p: _file(p.parent, {"a": T, "b": U}, b"\0" * 10), "the file has 10 after the header", None),
    "trailing-bytes": (lambda p: _file(p.parent, {"a": T}, b"\0" * 12), "4 bytes after the last tensor", None),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_damaged_file(tmp_path, case):
    make, text, key = BROKEN[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(HeaderError) as e:
        read_header(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and text in message and "\n" not in message
    if key is not None:
        assert e.value.key == key and f"'{key}'" in message
    # the safetensors library refuses it too (duplicate keys aside, which it silently collapses)
    if case != "duplicate-key":
        with pytest.raises(Exception):
            with safe_open(str(path), framework="np") as f:
                [f.get_tensor(k) for k in f.keys()]


def test_exact_message(tmp_path):
    path = _file(tmp_path, {"a": {**T, "shape": [3]}}, b"\0" * 8)
    with pytest.raises(HeaderError) as e:
        read_header(path)
    assert str(e.value) == f"{path}: 'a': shape [3] of F32 needs 12 bytes but data_offsets span 8; the file is damaged"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="is a directory"):
        read_header(tmp_path)


def test_bad_metadata(tmp_path):
    path = _file(tmp_path, {"__metadata__": {"format": 1}, "a": T}, b"\0" * 8)
    with pytest.raises(HeaderError, match="__metadata__"):
        read_header(path)


_TRICKY_OBJECTS = [
    "{}",
    "{ }",
    '{"a":1}',
    '{ "a" : 1 , "b" :\t[1, 2] }\n  ',
    '{"\\u00e9\\n\\"k":{"x":{"y":[]}}}',
    '{"a":NaN,"b":-Infinity,"c":1e400}',
    '{"a":1,"a":2}',
    '{"a":1,}',
    '{"a" 1}',
    '{"a":1 "b":2}',
    '{"a":1}}',
    '{"a":1} x',
    '{"a":"\x01"}',
    '{a:1}',
    '{"a":',
    '{"a":[1,2}',
    "{",
    '{"a":1',
]


@pytest.mark.parametrize("text", _TRICKY_OBJECTS)
def test_entry_by_entry_decoding_accepts_exactly_what_json_loads_accepts(text):
    """The header is decoded one top-level entry at a time (bounded memory); same answers as json.loads."""
    import json

    from adapterfmt.storage.header import _Object, _top_level_entries

    try:
        expected = json.loads(text, object_pairs_hook=list)
    except ValueError:
        with pytest.raises(ValueError):
            list(_top_level_entries(text))
        return
    got = list(_top_level_entries(text))
    assert [k for k, _ in got] == [k for k, _ in expected]
    assert json.dumps([v for _, v in got]) == json.dumps([list(v) if isinstance(v, _Object) else v for _, v in expected])


# ---------------------------------------------------------------------------------------------
# one json.loads for a valid header, the entry-by-entry reader for a defective one
# ---------------------------------------------------------------------------------------------


def test_duplicate_field_inside_an_entry_is_named(tmp_path):
    """A repeated field makes the one-call decoder give up; the exact reader names entry and field."""
    raw = b'{"a": {"dtype": "F32", "shape": [2], "shape": [2], "data_offsets": [0, 8]}}'
    with pytest.raises(HeaderError) as e:
        read_header(_file(tmp_path, raw, b"\0" * 8))
    assert e.value.key == "a" and "field 'shape' appears twice" in str(e.value)


def test_duplicate_metadata_key_is_refused(tmp_path):
    raw = b'{"__metadata__": {"x": "1", "x": "2"}, "a": %s}' % json.dumps(T).encode()
    with pytest.raises(HeaderError, match="field 'x' appears twice"):
        read_header(_file(tmp_path, raw, b"\0" * 8))


def test_repeated_key_deep_in_an_ignored_field_is_accepted_as_before(tmp_path):
    """The fast decoder refuses a repeat at any depth; the exact reader (which ignores unknown
    fields) then reads the header: the answer is the exact reader's, whichever path gave it."""
    raw = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": {"k": 1, "k": 2}}}'
    header = read_header(_file(tmp_path, raw, b"\0" * 8))
    assert list(header.tensors) == ["a"] and header.tensors["a"].shape == (2,)


def test_tensors_listed_out_of_byte_order(tmp_path):
    """Writers may list tensors in any order: tiling is checked in byte order."""
    header = read_header(_file(tmp_path, {"b": U, "a": T}, b"\0" * 12))
    assert list(header.tensors) == ["b", "a"]
    assert [(t.start, t.end) for t in header.tensors.values()] == [(header.data_start + 8, header.data_start + 12), (header.data_start, header.data_start + 8)]
    with pytest.raises(HeaderError, match="overlap"):
        read_header(_file(tmp_path, {"b": {**U, "data_offsets": [4, 8]}, "a": T}, b"\0" * 8))


@pytest.mark.parametrize("text", _TRICKY_OBJECTS)
def test_fast_and_exact_readers_give_the_same_entries(text):
    """``_entries`` (one json.loads) yields what the entry-by-entry reader yields, or the same error."""
    from adapterfmt.storage.header import _Object, _entries, _top_level_entries

    def plain(v):
        if isinstance(v, _Object):
            return {k: plain(x) for k, x in v}
        return [plain(x) for x in v] if isinstance(v, list) else v

    try:
        exact = [(k, plain(v)) for k, v in _top_level_entries(text)]
    except ValueError:
        with pytest.raises(HeaderError):
            list(_entries(text, "x"))
        return
    if len({k for k, _ in exact}) != len(exact):
        with pytest.raises(HeaderError, match="appears twice"):
            list(_entries(text, "x"))
        return
    assert [(k, plain(v)) for k, v in _entries(text, "x")] == exact
