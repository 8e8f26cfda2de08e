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
