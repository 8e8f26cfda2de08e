"""``adapterfmt check``: resolution counts, exit codes, prefix suggestions, endswith collisions, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterfmt.base.reading import read_base
from conftest import TESTDATA, assert_one_error_line, edit_adapter_weights, write_adapter, write_base


def base_like(src: str, dest: Path, *, rename=lambda k: k, drop=lambda k: False, reshape=None) -> Path:
    """A header-only copy of a testdata base with keys renamed, dropped or reshaped."""
    base = read_base(TESTDATA / src)
    tensors = {}
    for key, info in base.tensors.items():
        if drop(key):
            continue
        shape = (reshape or {}).get(key, info.shape)
        tensors[rename(key)] = (info.dtype, shape)
    return write_base(dest, tensors, base.config)


@pytest.mark.parametrize(
    ("base", "adapter", "summary"),
    [
        ("tiny-llama", "tiny-llama-lora", "14/14 LoRA targets and 1/1 full copies resolved"),
        ("tiny-llama", "tiny-llama-multi", "4/4 LoRA targets and 0/0 full copies resolved"),
        ("tiny-llama", "tiny-llama-dora", "4/4 LoRA targets and 0/0 full copies resolved"),
        ("tiny-bert", "tiny-bert-classifier", "4/4 LoRA targets and 1/1 full copies resolved"),
        ("tiny-bert", "tiny-bert-lorabias", "4/4 LoRA targets and 1/1 full copies resolved"),
    ],
)
def test_real_checkpoints_resolve(run_cli, base, adapter, summary):
    result = run_cli("check", "--base", TESTDATA / base, "--adapter", TESTDATA / adapter)
    assert result.exit_code == 0, result
    assert result.stdout.splitlines()[0] == summary + ": ok"
    assert result.stderr == ""


def test_sub_adapter(run_cli):
    result = run_cli("check", "--base", TESTDATA / "tiny-llama", "--adapter", TESTDATA / "tiny-llama-multi", "--subfolder", "second")
    assert result.exit_code == 0, result
    assert result.stdout.startswith("4/4 LoRA targets")


def test_json_document(run_cli):
    result = run_cli("check", "--base", TESTDATA / "tiny-llama", "--adapter", TESTDATA / "tiny-llama-lora", "--json")
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["components"][0]["counts"]["adapter"] == {"resolved": 14, "total": 14}
    assert doc["components"][0]["counts"]["full_copy"] == {"resolved": 1, "total": 1}
    assert doc["components"][0]["unresolved"] == [] and doc["components"][0]["suggestion"] is None
    q = next(b for b in doc["components"][0]["bindings"] if b["module"] == "model.layers.0.self_attn.q_proj")
    assert q == {"module": "model.layers.0.self_attn.q_proj", "type": "adapter", "method": "lora", "base_key": "model.layers.0.self_attn.q_proj.weight", "layout": "linear"}


def test_tied_head_resolves_with_a_warning(run_cli):
    result = run_cli("check", "--base", TESTDATA / "tiny-llama-tied", "--adapter", TESTDATA / "tiny-llama-tied-lora")
    assert result.exit_code == 0, result
    assert "warning[tied-full-copy]" in result.stderr
    strict = run_cli("check", "--base", TESTDATA / "tiny-llama-tied", "--adapter", TESTDATA / "tiny-llama-tied-lora", "--strict")
    assert strict.exit_code == 1


def test_prefix_mismatch_lists_keys_and_suggests_a_rewrite(run_cli, tmp_path):
    vlm = base_like("tiny-llama", tmp_path / "vlm", rename=lambda k: "language_model." + k)
    result = run_cli("check", "--base", vlm, "--adapter", TESTDATA / "tiny-llama-lora")
    assert result.exit_code == 1, result
    lines = result.stdout.splitlines()
    assert lines[0] == "0/14 LoRA targets and 0/1 full copies resolved: FAILED"
    listed = [line for line in lines if line.startswith("  ") and "no base tensor" in line]
    assert len(listed) == 10
    assert "... and 5 more" in result.stdout
    doc = run_cli("check", "--base", vlm, "--adapter", TESTDATA / "tiny-llama-lora", "--json").json()
    old, new = doc["components"][0]["suggestion"]["old"], doc["components"][0]["suggestion"]["new"]
    assert f"--prefix-map '{old}={new}'" in result.stdout
    # the suggested rewrite is exactly what fixes it
    fixed = run_cli("check", "--base", vlm, "--adapter", TESTDATA / "tiny-llama-lora", "--prefix-map", f"{old}={new}")
    assert fixed.exit_code == 0, fixed
    assert fixed.stdout.splitlines()[0] == "14/14 LoRA targets and 1/1 full copies resolved: ok"


def test_suggestion_keeps_what_already_resolves(run_cli, tmp_path):
    """Only the decoder moved under ``language_model.``; ``lm_head`` still binds, so the rewrite must spare it."""
    vlm = base_like("tiny-llama", tmp_path / "vlm", rename=lambda k: "language_model." + k if k.startswith("model.") else k)
    result = run_cli("check", "--base", vlm, "--adapter", TESTDATA / "tiny-llama-lora")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == "0/14 LoRA targets and 1/1 full copies resolved: FAILED"
    assert "did you mean `model.` → `language_model.model.`?" in result.stdout
    fixed = run_cli("check", "--base", vlm, "--adapter", TESTDATA / "tiny-llama-lora", "--prefix-map", "model.=language_model.model.")
    assert fixed.exit_code == 0, fixed


def test_partial_resolution_fails(run_cli, tmp_path):
    base = base_like("tiny-llama", tmp_path / "half", drop=lambda k: k.startswith("model.layers.1."))
    result = run_cli("check", "--base", base, "--adapter", TESTDATA / "tiny-llama-lora", "--json")
    assert result.exit_code == 1
    doc = result.json()
    assert doc["components"][0]["counts"]["adapter"] == {"resolved": 7, "total": 14}
    assert doc["components"][0]["unresolved_count"] == 7
    assert doc["components"][0]["unresolved"][0] == {"name": "model.layers.1.mlp.down_proj", "looked_for": "model.layers.1.mlp.down_proj.weight"}


def test_shape_mismatch_fails(run_cli, tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight"
    base = base_like("tiny-llama", tmp_path / "wide", reshape={key: (96, 64)})
    result = run_cli("check", "--base", base, "--adapter", TESTDATA / "tiny-llama-lora")
    assert result.exit_code == 1
    assert "13/14 LoRA targets" in result.stdout
    assert "shape errors (1):" in result.stdout and "'model.layers.0.self_attn.q_proj'" in result.stdout


def test_unknown_tensor_fails_the_check(run_cli, copy_testdata):
    import torch
    d = copy_testdata("tiny-llama-lora")
    stray = "base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"
    edit_adapter_weights(d, add={stray: torch.zeros(8, 64)})
    result = run_cli("check", "--base", TESTDATA / "tiny-llama", "--adapter", d)
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == "14/14 LoRA targets and 1/1 full copies resolved: FAILED"
    assert f"  {stray}" in result.stdout.splitlines()
    assert "warning[unknown-key]" in result.stderr
    assert run_cli("check", "--base", TESTDATA / "tiny-llama", "--adapter", d, "--json").json()["components"][0]["unknown_keys"] == [stray]


def test_peft_endswith_collision_is_reported(run_cli, tmp_path):
    """Seed case: modules_to_save ``model.layers.0.x`` also catches ``img_model.layers.0.x`` in PEFT."""
    base = write_base(
        tmp_path / "base",
        {
            "model.layers.0.x.weight": ("F32", (4, 4)),
            "img_model.layers.0.x.weight": ("F32", (4, 4)),
            "model.layers.0.q.weight": ("F32", (4, 4)),
        },
    )
    adapter = write_adapter(
        tmp_path / "adapter",
        {
            "base_model.model.model.layers.0.q.lora_A.weight": ("F32", (2, 4)),
            "base_model.model.model.layers.0.q.lora_B.weight": ("F32", (4, 2)),
            "base_model.model.model.layers.0.x.weight": ("F32", (4, 4)),
        },
        {"r": 2, "lora_alpha": 2, "target_modules": ["q"], "modules_to_save": ["model.layers.0.x"]},
    )
    result = run_cli("check", "--base", base, "--adapter", adapter, "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    assert doc["components"][0]["summary"] == "1/1 LoRA targets and 1/1 full copies resolved"
    # exact matching binds the right module ...
    assert {"module": "model.layers.0.x", "type": "full_copy", "method": None, "base_key": "model.layers.0.x.weight", "layout": "replace"} in doc["components"][0]["bindings"]
    # ... and the report names the module PEFT's endswith would also wrap
    suffix = [w for w in doc["warnings"] if w["code"] == "full-copy-suffix"]
    assert suffix and "img_model.layers.0.x" in suffix[0]["keys"]
    assert run_cli("check", "--base", base, "--adapter", adapter, "--strict").exit_code == 1


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_missing_base(run_cli, tmp_path):
    missing = tmp_path / "nothing"
    assert_one_error_line(run_cli("check", "--base", missing, "--adapter", TESTDATA / "tiny-llama-lora"), str(missing))


def test_missing_adapter(run_cli, tmp_path):
    missing = tmp_path / "nothing"
    assert_one_error_line(run_cli("check", "--base", TESTDATA / "tiny-llama", "--adapter", missing), str(missing))


def test_adapter_given_as_base(run_cli):
    result = run_cli("check", "--base", TESTDATA / "tiny-llama-lora", "--adapter", TESTDATA / "tiny-llama-lora")
    assert_one_error_line(result, str(TESTDATA / "tiny-llama-lora"), "model.safetensors")


def test_broken_shard_index(run_cli, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(TESTDATA / "tiny-llama", base)
    (base / "model-00002-of-00003.safetensors").unlink()
    assert_one_error_line(run_cli("check", "--base", base, "--adapter", TESTDATA / "tiny-llama-lora"), "model-00002-of-00003.safetensors")


def test_truncated_base_shard(run_cli, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(TESTDATA / "tiny-llama", base)
    shard = base / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    assert_one_error_line(run_cli("check", "--base", base, "--adapter", TESTDATA / "tiny-llama-lora"), str(shard))


def test_bad_prefix_map_is_a_usage_error(run_cli):
    result = run_cli("check", "--base", TESTDATA / "tiny-llama", "--adapter", TESTDATA / "tiny-llama-lora", "--prefix-map", "model.")
    assert result.exit_code == 2
    assert "OLD=NEW" in result.stderr
