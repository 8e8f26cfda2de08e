"""``merge --wrapped`` reads the base where it lies in the wrapped file: no scratch copy of the base,
the same tensors as merging the plain base and adapter, and only the model's files beside them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.convert import wrapped as convert
from adapterfmt.base.reading import read_base
from adapterfmt.convert.wrapped import merge_wrapped, wrapped_names
from adapterfmt.formats.peft.reading import read_adapter

from _merge_helpers import read_dir, unequal

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
BASE, ADAPTER = TESTDATA / "tiny-llama", TESTDATA / "tiny-llama-lora"


def test_wrapped_merge_reads_the_base_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {}
    for shard in sorted(BASE.glob("*.safetensors")):
        base.update(load_file(str(shard)))
    adapter = read_adapter(ADAPTER)
    saved = load_file(adapter.weights_file)
    names = wrapped_names(adapter, list(read_base(BASE).tensors))
    wrapped = tmp_path / "run"
    wrapped.mkdir()
    save_file({k: (base[s.key] if s.kind == "base" else saved[s.key]).contiguous() for k, s in names.items()}, str(wrapped / "model.safetensors"))
    (wrapped / "config.json").write_text((BASE / "config.json").read_text())
    (wrapped / "trainer_state.json").write_text("{}")  # a training file, not the merged model's

    def no_scratch(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base was copied to a scratch directory")

    monkeypatch.setattr(convert, "write_base", no_scratch)
    seen = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": seen.append(str(p)) or real_listdir(p))
    out = tmp_path / "merged"
    summary = merge_wrapped(wrapped, out, config=str(ADAPTER / "adapter_config.json"))  # with its alpha_pattern
    monkeypatch.undo()
    assert not any("wrapped-inputs" in p for p in seen)
    assert summary.tensors_merged == 14
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert unequal(read_dir(out), adapterfmt.merge_state_dict(read_dir(BASE), ADAPTER)) == []
    assert sorted(os.listdir(tmp_path)) == ["merged", "run"]
