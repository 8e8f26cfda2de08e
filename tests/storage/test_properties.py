"""Property tests (hypothesis): key mapping round trips and a header reader that never crashes.

We test:
  * for generated module paths, adapter names and parameters, every :class:`Role` that has a
    saved and/or wrapped spelling renders to a key that parses back to the same key, saved and
    wrapped keys convert into each other losslessly, and both name the same base tensor;
  * ``read_header`` on arbitrarily mutated bytes of a real safetensors file (flipped bytes,
    truncation, inserted bytes, rewritten length prefix) raises nothing but ``AdapterFormatError``,
    and whatever it accepts stays inside the file;
  * whatever safetensors itself rejects, ``read_header`` rejects too (never a laxer reader).
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adapterfmt import AdapterFormatError, read_header
from adapterfmt.checkpoint.keys import (
    ROLE_TEMPLATES,
    KeyParts,
    Role,
    parse_saved,
    parse_wrapped,
    render_base,
    render_saved,
    render_wrapped,
    saved_to_base,
    saved_to_wrapped,
    wrapped_to_base,
    wrapped_to_saved,
)

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
VALID = (TESTDATA / "tiny-llama-lora" / "adapter_model.safetensors").read_bytes()
(HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# KEY MAPPING
# ---------------------------------------------------------------------------------------------

#: Words the grammar gives a meaning to; a module path or adapter name made of them is another key.
GRAMMAR_WORDS = {t.value for t in Role} | {"token_adapter", "trainable_tokens_delta", "base_layer", "original_module"}
_IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in GRAMMAR_WORDS | {"base_model"})
_SEGMENT = st.one_of(_IDENT, st.integers(0, 99).map(str))
MODULES = st.lists(_SEGMENT, min_size=1, max_size=6).map(".".join)
ADAPTERS = _IDENT
#: Parameter names per role, as saved and wrapped keys carry them (None: the role has no parameter).
PARAMS: dict[Role, st.SearchStrategy] = {
    Role.LORA_A: st.just("weight"),
    Role.LORA_B: st.sampled_from(["weight", "bias"]),
    Role.LORA_EMBEDDING_A: st.none(),
    Role.LORA_EMBEDDING_B: st.none(),
    Role.DORA_MAGNITUDE: st.none(),
    Role.TOKENS_DELTA: st.none(),
    Role.FULL_COPY: st.lists(_IDENT, min_size=0, max_size=2).map(lambda p: ".".join([*p, "weight"])),
    Role.ORIGINAL: st.sampled_from(["weight", "bias"]),
    Role.BASE_LAYER: st.sampled_from(["weight", "bias"]),
    Role.TOKENS_BASE: st.just("weight"),
    Role.PLAIN: st.sampled_from(["weight", "bias"]),
}


def test_every_role_has_a_parameter_strategy() -> None:
    assert set(PARAMS) == set(Role) == set(ROLE_TEMPLATES)
    assert UNSAVED_ROLES and BOTH_ROLES


SAVED_ROLES = [r for r in Role if ROLE_TEMPLATES[r].saved is not None]
WRAPPED_ROLES = [r for r in Role if ROLE_TEMPLATES[r].wrapped is not None]
BOTH_ROLES = [r for r in SAVED_ROLES if r in WRAPPED_ROLES]
UNSAVED_ROLES = [r for r in Role if r not in SAVED_ROLES]


@st.composite
def key_parts(draw: st.DrawFn, roles: "list[Role]") -> KeyParts:
    role = draw(st.sampled_from(roles))
    return KeyParts(draw(MODULES), role, draw(PARAMS[role]), draw(ADAPTERS), draw(st.sampled_from(["", "base_model.model."])))


@PROPERTY_SETTINGS
@given(key_parts(SAVED_ROLES))
def test_saved_keys_round_trip(parts: KeyParts) -> None:
    """render_saved -> parse_saved -> render_saved is the identity, for every role with a saved name."""
    saved = render_saved(parts)
    full_copies = [parts.module] if parts.role is Role.FULL_COPY else []
    parsed = parse_saved(saved, full_copy_modules=full_copies)
    assert (parsed.module, parsed.role, parsed.prefix) == (parts.module, parts.role, parts.prefix)
    assert render_saved(parsed) == saved


@PROPERTY_SETTINGS
@given(key_parts(WRAPPED_ROLES))
def test_wrapped_keys_round_trip(parts: KeyParts) -> None:
    """render_wrapped -> parse_wrapped -> render_wrapped is the identity and keeps the adapter name."""
    wrapped = render_wrapped(parts)
    parsed = parse_wrapped(wrapped)
    assert (parsed.module, parsed.role, parsed.prefix) == (parts.module, parts.role, parts.prefix)
    if "{adapter}" in ROLE_TEMPLATES[parts.role].wrapped:
        assert parsed.adapter == parts.adapter
    assert render_wrapped(parsed) == wrapped


@PROPERTY_SETTINGS
@given(key_parts(BOTH_ROLES))
def test_saved_and_wrapped_convert_losslessly_and_agree_on_the_base_key(parts: KeyParts) -> None:
    full_copies = [parts.module] if parts.role is Role.FULL_COPY else []
    saved = render_saved(parts)
    wrapped = saved_to_wrapped(saved, adapter=parts.adapter, full_copy_modules=full_copies)
    assert wrapped == render_wrapped(parts)
    assert wrapped_to_saved(wrapped) == saved
    assert saved_to_base(saved, full_copy_modules=full_copies) == wrapped_to_base(wrapped) == render_base(parts)


@PROPERTY_SETTINGS
@given(key_parts(UNSAVED_ROLES))
def test_roles_without_a_saved_name_fail_cleanly(parts: KeyParts) -> None:
    """A role that is never saved (original_module, the token adapter's base layer) raises AdapterFormatError."""
    with pytest.raises(AdapterFormatError):
        render_saved(parts)


@PROPERTY_SETTINGS
@given(st.lists(st.sampled_from(["a", "0", "", "weight", "default", "base_model", "model", *sorted(GRAMMAR_WORDS)]), max_size=8).map(".".join))
def test_parsers_accept_or_raise_adapter_format_error_on_any_string(key: str) -> None:
    for parse in (parse_saved, parse_wrapped):
        try:
            parse(key)
        except AdapterFormatError:
            pass


# ---------------------------------------------------------------------------------------------
# HEADER READER ON MUTATED BYTES
# ---------------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A mutation of VALID, biased towards the header where the parser's decisions are."""
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "length", "splice"]))
    in_header = st.integers(0, 8 + HEADER_LEN - 1)
    if kind == "flip":
        for pos in draw(st.lists(st.one_of(in_header, st.integers(0, len(data) - 1)), min_size=1, max_size=8)):
            data[pos] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "insert":
        pos = draw(in_header)
        data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "length":
        data[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, len(data) + 16), st.integers(0, 2**64 - 1))))
    else:
        # replace a JSON token of the header by another plausible one
        header = bytes(data[8 : 8 + HEADER_LEN])
        old = draw(st.sampled_from([b'"F32"', b'"data_offsets"', b'"shape"', b"[", b"]", b",", b":", b"64", b"8"]))
        new = draw(st.sampled_from([b'"F16"', b'"F33"', b"-1", b"[]", b"{}", b"null", b'""', b"1e309", b"18446744073709551616"]))
        count = header.count(old)
        assume(count)
        nth = draw(st.integers(0, count - 1))
        at = -1
        for _ in range(nth + 1):
            at = header.index(old, at + 1)
        header = header[:at] + new + header[at + len(old) :]
        data = bytearray(struct.pack("<Q", len(header)) + header + bytes(data[8 + HEADER_LEN :]))
    return bytes(data)


@pytest.fixture(scope="module")
def scratch() -> "tempfile.TemporaryDirectory[str]":
    with tempfile.TemporaryDirectory() as d:
        yield Path(d) / "mutated.safetensors"


@PROPERTY_SETTINGS
@given(blob=mutated())
def test_read_header_raises_only_adapter_format_error_and_stays_in_bounds(blob: bytes, scratch: Path) -> None:
    scratch.write_bytes(blob)
    try:
        header = read_header(scratch)
    except AdapterFormatError as e:
        assert "\n" not in str(e) and str(scratch) in str(e)
        return
    for info in header.tensors.values():
        assert header.data_start <= info.start <= info.end <= len(blob)


@PROPERTY_SETTINGS
@given(blob=mutated())
def test_read_header_is_never_laxer_than_safetensors(blob: bytes, scratch: Path) -> None:
    """A file the safetensors library refuses is refused by read_header too."""
    from safetensors import safe_open

    scratch.write_bytes(blob)
    try:
        with safe_open(str(scratch), framework="numpy"):
            pass
    except Exception:  # noqa: BLE001 - safetensors raises SafetensorError, or others for odd input
        with pytest.raises(AdapterFormatError):
            read_header(scratch)


@st.composite
def with_repeats(draw: st.DrawFn) -> bytes:
    """VALID (or a mutation of it) with a key repeated somewhere: a top-level entry, an entry's
    field, a metadata key, or a key inside an unknown field's object."""
    blob = draw(st.one_of(st.just(VALID), mutated()))
    (n,) = struct.unpack("<Q", blob[:8]) if len(blob) >= 8 else (0,)
    header = blob[8 : 8 + n]
    pattern = draw(st.sampled_from([b'"dtype":', b'"shape":', b'"data_offsets":', b'"__metadata__":', b'"format":', b'{"', b'{']))
    count = header.count(pattern)
    assume(count)
    at = -1
    for _ in range(draw(st.integers(0, count - 1)) + 1):
        at = header.index(pattern, at + 1)
    insert = draw(
        st.sampled_from(
            [
                b'"dtype": "F32", ',
                b'"shape": [1], ',
                b'"data_offsets": [0, 0], ',
                b'"format": "pt", ',
                b'"x": {"k": 1, "k": 2}, ',
                b'"base_model.model.q.lora_A.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, ',
            ]
        )
    )
    cut = at + (len(pattern) if pattern.startswith(b"{") else 0)
    header = header[:cut] + insert + header[cut:]
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


@PROPERTY_SETTINGS
@given(blob=st.one_of(mutated(), with_repeats()))
def test_the_fast_header_path_answers_as_the_exact_reader(blob: bytes, scratch: Path) -> None:
    """A valid header is decoded by one json.loads (header._entries); anything else by the exact
    entry-by-entry reader. Forcing every header through the exact reader gives the same records,
    or the same one-line error."""
    from unittest import mock

    from adapterfmt.storage import header as header_module

    def outcome() -> object:
        try:
            h = read_header(scratch)
        except AdapterFormatError as e:
            return ("error", str(e))
        return (list(h.tensors.items()), dict(h.metadata), h.data_start)

    scratch.write_bytes(blob)
    fast = outcome()

    def refuse(pairs: list) -> dict:
        raise header_module._Duplicate("")

    with mock.patch.object(header_module, "_unique_dict", refuse):
        exact = outcome()
    assert fast == exact


def test_the_valid_file_is_accepted_by_both(scratch: Path) -> None:
    from safetensors import safe_open

    scratch.write_bytes(VALID)
    with safe_open(str(scratch), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(read_header(scratch).tensors)
    assert os.path.getsize(scratch) == len(VALID)
