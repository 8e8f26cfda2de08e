"""``adapterfmt verify`` / ``verify_directory``: problems a model directory can have that only a
whole-directory check sees (the bad-input corpus covers the rest through every command).

We test: every shipped checkpoint verifies clean; a wrong ``total_size``, a key held by two
shards, a key the index sends elsewhere and a leftover ``.safetensors`` file are each reported
with their own code, file and key; ``--json`` lists them; exit codes 0 / 1 / 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _hardening_helpers import TESTDATA, invoke_cli
from make_bad_inputs import INDEX, SHARD1, SHARD2, edit_json, pack, tensors_of
from adapterfmt.reports.verify import verify_directory


@pytest.mark.parametrize("name", sorted(p.name for p in TESTDATA.iterdir() if p.is_dir()))
def test_shipped_checkpoints_verify_clean(name: str) -> None:
    assert verify_directory(TESTDATA / name) == []


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(TESTDATA / "tiny-llama", d)
    return d


def _codes(d: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in verify_directory(d):
        out.setdefault(f.code, []).append(f.message)
    return out


def test_total_size_that_disagrees_with_the_shards(model: Path) -> None:
    edit_json(model / INDEX, lambda d: d["metadata"].__setitem__("total_size", d["metadata"]["total_size"] + 2))
    codes = _codes(model)
    assert list(codes) == ["total-size"]
    assert INDEX in codes["total-size"][0] and "metadata.total_size" in codes["total-size"][0]


def test_key_in_two_shards(model: Path) -> None:
    one = tensors_of(model / SHARD1)
    key, value = next(iter(one.items()))
    two = tensors_of(model / SHARD2)
    pack(model / SHARD2, {**two, key: value})
    codes = _codes(model)
    assert set(codes) == {"duplicate-key", "key-not-indexed", "total-size"}  # the extra copy adds bytes too
    assert key in codes["duplicate-key"][0] and SHARD1 in codes["duplicate-key"][0] and SHARD2 in codes["duplicate-key"][0]


def test_leftover_safetensors_file_not_in_the_index(model: Path) -> None:
    shutil.copyfile(model / SHARD1, model / "model-00001-of-00003.safetensors.bak.safetensors")
    codes = _codes(model)
    assert list(codes) == ["unindexed-file"]


def test_cli_exit_codes_and_json(model: Path, tmp_path: Path) -> None:
    ok = invoke_cli(["verify", str(model)])
    assert ok.exit_code == 0 and ok.stdout.strip().endswith(": ok")

    edit_json(model / INDEX, lambda d: d["metadata"].__setitem__("total_size", 1))
    bad = invoke_cli(["verify", str(model), "--json"])
    assert bad.exit_code == 1
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and [p["code"] for p in doc["problems"]] == ["total-size"]
    assert doc["problems"][0]["keys"] == ["metadata.total_size"]

    missing = invoke_cli(["verify", str(tmp_path / "nothing-here")])
    assert missing.exit_code == 2 and len(missing.stderr_lines) == 1 and missing.stderr_lines[0].startswith("Error: ")


def test_merged_output_verifies_clean(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = invoke_cli(["merge", "--base", str(TESTDATA / "tiny-llama"), "--adapter", str(TESTDATA / "tiny-llama-lora"), "-o", str(out), "--verify", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert verify_directory(out) == []
