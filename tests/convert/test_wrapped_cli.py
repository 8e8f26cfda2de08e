"""The CLI on wrapped checkpoints: ``convert``, ``inspect`` and ``merge --wrapped``.

We test:
* ``adapterfmt convert``: output, ``--json``, refusal without ``--alpha``/``--config`` (exit 2, one line);
* ``adapterfmt inspect WRAPPED``: layout, adapter names and the ``full-copy-unchanged`` warning
  for the copy of a real PEFT model that never trained;
* ``adapterfmt merge --wrapped``: the merged model equals PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from _wrapped_helpers import llama_two_adapters, save_wrapped


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """Tiny Llama, adapters ``default`` and ``other``; ``other``'s lm_head copy never trained."""
    root = tmp_path_factory.mktemp("frozen")
    pm, base_sd = llama_two_adapters(5, freeze_copy="other")
    save_wrapped(pm, root / "w", model_config=pm.base_model.model.config.to_dict())
    save_wrapped(pm, root / "p", pickle=True)
    return pm, base_sd, root


def test_convert_command(frozen, run_cli, tmp_path):
    _, _, root = frozen
    r = run_cli("convert", root / "w", "-o", tmp_path / "out", "--adapter-name", "other", "--alpha", "6", "--json")
    assert r.exit_code == 0, r
    doc = r.json()
    assert doc["adapters"] == {"other": str(tmp_path / "out")} and doc["tensors"] == 13
    assert [w["code"] for w in doc["warnings"]] == ["full-copy-unchanged"]
    assert "lm_head.weight" in "".join(load_file(tmp_path / "out" / "adapter_model.safetensors"))

    r = run_cli("convert", root / "w", "-o", tmp_path / "out2")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("Error: ") and "does not store lora_alpha" in r.stderr and "--alpha" in r.stderr
    assert not (tmp_path / "out2").exists()
    r = run_cli("convert", root / "w", "-o", tmp_path / "out2", "--alpha", "1", "--config", root / "w" / "config.json")
    assert r.exit_code == 2 and "not both" in r.stderr


def test_inspect_shows_layout_adapters_and_unchanged_copy(frozen, run_cli):
    _, _, root = frozen
    r = run_cli("inspect", root / "w")
    assert r.exit_code == 0, r
    assert "layout: wrapped PeftModel.state_dict() (safetensors, prefix 'base_model.model.')" in r.stdout
    assert "adapters: default, other" in r.stdout
    assert "full copy 'lm_head': default trained, other UNCHANGED" in r.stdout
    assert "warning[full-copy-unchanged]: adapter 'other'" in r.stderr

    doc = run_cli("inspect", root / "w", "--json").json()
    assert doc["layout"] == "wrapped" and doc["adapters"] == ["default", "other"]
    assert doc["full_copies"] == {"default": {"lm_head": "trained"}, "other": {"lm_head": "unchanged"}}
    assert [w["code"] for w in doc["warnings"]] == ["full-copy-unchanged"]
    assert run_cli("inspect", root / "w", "--strict").exit_code == 1

    r = run_cli("inspect", root / "p" / "pytorch_model.bin")
    assert r.exit_code == 2 and "--allow-pickle" in r.stderr
    r = run_cli("inspect", root / "p" / "pytorch_model.bin", "--allow-pickle", "--json")
    assert r.exit_code == 0 and r.json()["storage"] == "pickle"
    assert r.json()["full_copies"]["other"] == {"lm_head": "unchanged"}


def test_merge_wrapped_command_equals_merge_and_unload(frozen, run_cli, tmp_path):
    import torch

    pm, _, root = frozen
    r = run_cli("merge", "--wrapped", root / "w", "-o", tmp_path / "merged", "--alpha", "8", "--json", "-q")
    assert r.exit_code == 0, r
    doc = r.json()
    assert doc["tensors_merged"] == 8 and doc["tensors_replaced"] == 1 and sorted(doc["files"]) == ["config.json", "model.safetensors"]
    # a wrapped checkpoint given as --base (no --adapter) is the same request
    assert run_cli("merge", "--base", root / "w", "-o", tmp_path / "again", "--alpha", "8", "-q").exit_code == 0
    pm.set_adapter("default")
    expected = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}  # last use of pm
    for out in ("merged", "again"):
        got = load_file(tmp_path / out / "model.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    r = run_cli("merge", "--wrapped", root / "w", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--alpha" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("merge", "--wrapped", root / "w", "--base", root / "w", "-o", tmp_path / "x", "--alpha", "8")
    assert r.exit_code == 2 and "without --base" in r.stderr
    assert not (tmp_path / "x").exists()
