"""``--json`` output: streamed, outer levels indented, rows on one line; the same document as json.dumps."""

from __future__ import annotations

import json

import pytest

DOCS = [
    {"a": {True: 1, 2: [1, 2], None: "x", "x": {"y": 1}}, "b": [], "c": [{"k": "v", "n": [1.5, None]}], "d": (1, 2), "e": {}},
    {"modules": [{"module": f"m.{i}", "tensors": {"lora_A": {"shape": [8, 64]}}} for i in range(5000)], "s": "é\n\"q\""},
]


@pytest.mark.parametrize("doc", DOCS, ids=["mixed", "many-rows"])
def test_emit_json_writes_the_same_document(doc, capsys):
    from adapterfmt.constants import FORMAT_VERSION
    from adapterfmt_cli.output import emit_json

    expected = json.loads(json.dumps({"format_version": FORMAT_VERSION, **doc}))
    emit_json(doc)
    text = capsys.readouterr().out
    assert json.loads(text) == expected and text.endswith("}\n")
    assert text.startswith('{\n  "format_version": ')
    if "modules" in doc:  # one line per row, not one per field
        assert len(text.splitlines()) < 5010


def test_a_row_writes_the_line_json_would_write():
    """``ModuleRow.to_json`` (the 100k-row fast path) is ``json``'s own encoding of ``as_dict()``,
    for every field type: None, bools, ints, floats, a NaN / infinite alpha (null), non-ASCII and
    quote characters in names, token-delta indices."""
    import json as _json
    import math as _math

    from adapterfmt.reports.inspect import ModuleRow

    rows = [
        ModuleRow("a.b", "a.b", True, "a.b", None, False, None, "adapter", "lora", "linear", 4, 8, 16, 4.0, False, True, "F32", 12,
                  {"lora_A": {"key": "base_model.model.a.b.lora_A.weight", "dtype": "F32", "shape": [4, 3]}}),
        ModuleRow('n"é\\x', "n_é", False, None, "no unique reading: 'x' or 'y'", False, "unet", "adapter", "loha", None, None, None,
                  _math.nan, _math.inf, True, False, "BF16", 0, {}),
        ModuleRow("emb", "emb", True, "emb", None, True, None, "token_delta", None, None, None, None, None, -_math.inf, False, False, "F16",
                  6, {"delta": {"key": "k", "dtype": "F16", "shape": [2, 3], "indices": [1, 5]}}),
        ModuleRow("c", "c", True, "c", None, True, "text_encoder", "adapter", "lokr", "conv2d", 2**70, 0, 1e-300, 2.5e300, True, True,
                  "F64", 7, {"w": {"key": "\u2603", "dtype": "F64", "shape": []}}),
    ]
    for row in rows:
        expected = _json.dumps(row.as_dict(), separators=(", ", ": "), allow_nan=True)
        expected = expected.replace("NaN", "null").replace("-Infinity", "null").replace("Infinity", "null")
        assert row.to_json() == expected
        assert _json.loads(row.to_json())["module"] == row.module
