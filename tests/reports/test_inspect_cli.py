"""``adapterfmt inspect``: the table, ``--json``, every warning code, ``--scan``, ``--base``, errors.

Warning codes are triggered by deliberately broken copies of the real PEFT checkpoints in
``testdata/``; the module count, ranks and scalings are checked against PEFT itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from adapterfmt.checkpoint.keys import split_prefix
from conftest import ADAPTERS, TESTDATA, assert_one_error_line, edit_adapter_config, edit_adapter_weights

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def codes(doc: dict) -> list[str]:
    return [w["code"] for w in doc["warnings"]]


def warning(doc: dict, code: str) -> dict:
    found = [w for w in doc["warnings"] if w["code"] == code]
    assert found, f"no {code!r} warning in {doc['warnings']}"
    return found[0]


# ---------------------------------------------------------------------------------------------
# the table and the JSON document
# ---------------------------------------------------------------------------------------------


def test_table_lists_every_module_with_totals(run_cli):
    result = run_cli("inspect", TESTDATA / "tiny-llama-lora")
    assert result.exit_code == 0, result
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("module"))
    assert header.split() == ["module", "kind", "layer", "rank", "alpha", "scaling", "dtype", "params"]
    down = next(line for line in lines if line.startswith("model.layers.1.mlp.down_proj "))
    # rank_pattern / alpha_pattern give down_proj r=4, alpha=8: scaling 2; A (4, 128) + B (64, 4)
    assert down.split() == ["model.layers.1.mlp.down_proj", "lora", "linear", "4", "8", "2", "F32", "768"]
    head = next(line for line in lines if line.startswith("lm_head "))
    assert head.split() == ["lm_head", "full", "copy", "-", "-", "-", "-", "F32", "16,384"]
    assert "totals: 14 LoRA modules, 1 full copy;" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("name", ADAPTERS)
def test_json_parses_and_matches_the_table(run_cli, name):
    result = run_cli("inspect", TESTDATA / name, "--json")
    assert result.exit_code == 0, result
    doc = json.loads(result.stdout)
    assert doc["format_version"] == 2
    assert doc["warnings"] == []  # the shipped checkpoints are clean
    lora = [m for m in doc["modules"] if m["type"] == "adapter"]
    assert doc["totals"]["adapter_modules"] == len(lora)
    assert doc["totals"]["params"] == sum(m["params"] for m in doc["modules"])
    table = run_cli("inspect", TESTDATA / name).stdout
    for m in doc["modules"]:
        assert any(line.split()[:1] == [m["module"]] for line in table.splitlines()), m["module"]


def test_sub_adapters_are_listed_and_selectable(run_cli):
    top = run_cli("inspect", TESTDATA / "tiny-llama-multi")
    assert "sub-adapters: second" in top.stdout
    assert run_cli("inspect", TESTDATA / "tiny-llama-multi", "--json").json()["sub_adapters"] == ["second"]
    sub = run_cli("inspect", TESTDATA / "tiny-llama-multi", "--subfolder", "second", "--json").json()
    assert sub["config"]["name"] == "second"
    assert {m["module"].rsplit(".", 1)[-1] for m in sub["modules"]} == {"o_proj", "down_proj"}
    # r=2, alpha=4, use_rslora: alpha / sqrt(r)
    assert all(m["scaling"] == pytest.approx(4 / math.sqrt(2)) for m in sub["modules"])


def test_dora_and_lora_bias_are_shown(run_cli):
    dora = run_cli("inspect", TESTDATA / "tiny-llama-dora", "--json").json()
    assert all(m["use_dora"] and "magnitude" in m["tensors"] for m in dora["modules"])
    assert "lora+dora" in run_cli("inspect", TESTDATA / "tiny-llama-dora").stdout
    bias = run_cli("inspect", TESTDATA / "tiny-bert-lorabias", "--json").json()
    assert all(m["lora_bias"] for m in bias["modules"] if m["type"] == "adapter")


# ---------------------------------------------------------------------------------------------
# PEFT as the oracle for module count, ranks and scalings
# ---------------------------------------------------------------------------------------------

PEFT_CASES = [
    ("tiny-llama-lora", "tiny-llama", "causal"),
    ("tiny-llama-multi/second", "tiny-llama", "causal"),
    ("tiny-bert-classifier", "tiny-bert", "seq-cls"),
    ("tiny-llama-dora", "tiny-llama", "causal"),
]


@pytest.mark.parametrize(("adapter", "base", "head"), PEFT_CASES)
def test_modules_ranks_and_scalings_equal_peft(run_cli, adapter, base, head):
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    model = PeftModel.from_pretrained(auto.from_pretrained(TESTDATA / base, dtype=torch.float32), TESTDATA / adapter)
    peft_layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            peft_layers[split_prefix(name)[1]] = (module.r["default"], module.scaling["default"])

    doc = run_cli("inspect", TESTDATA / adapter, "--json").json()
    ours = {m["module"]: (m["rank"], m["scaling"]) for m in doc["modules"] if m["type"] == "adapter"}
    assert len(ours) == len(peft_layers) == doc["totals"]["adapter_modules"]
    assert ours.keys() == peft_layers.keys()
    for name, (rank, scaling) in peft_layers.items():
        assert ours[name][0] == rank, name
        assert ours[name][1] == pytest.approx(scaling, rel=1e-12), name


# ---------------------------------------------------------------------------------------------
# every warning code, from a broken copy
# ---------------------------------------------------------------------------------------------


def test_orphan_lora(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-lora")
    edit_adapter_weights(d, drop=[f"{Q_PROJ}.lora_B.weight"])
    result = run_cli("inspect", d, "--json")
    assert result.exit_code == 0, result
    w = warning(result.json(), "orphan-lora")
    assert w["keys"] == [f"{Q_PROJ}.lora_A.weight"]
    assert "model.layers.0.self_attn.q_proj" in w["message"] and "lora_B" in w["message"]


def test_rank_mismatch_between_config_and_tensors(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-multi")
    edit_adapter_config(d, r=8)
    doc = run_cli("inspect", d, "--json").json()
    w = warning(doc, "rank-mismatch")
    assert f"{Q_PROJ}.lora_A.weight" in w["keys"]
    assert "rank 4" in w["message"] and "r=8" in w["message"]
    # the tensors decide: scaling = alpha / tensor rank
    assert {m["scaling"] for m in doc["modules"]} == {2.0}


def test_rank_mismatch_between_a_and_b(run_cli, copy_testdata):
    import torch
    d = copy_testdata("tiny-llama-multi")
    key = f"{Q_PROJ}.lora_B.weight"
    edit_adapter_weights(d, change=lambda t: t.__setitem__(key, torch.zeros(64, 2)))
    w = warning(run_cli("inspect", d, "--json").json(), "rank-mismatch")
    assert w["keys"] == [f"{Q_PROJ}.lora_A.weight", key]


def test_unknown_key(run_cli, copy_testdata):
    import torch
    d = copy_testdata("tiny-llama-lora")
    stray = "base_model.model.model.layers.0.self_attn.rotary.inv_freq"
    edit_adapter_weights(d, add={stray: torch.ones(4)})
    doc = run_cli("inspect", d, "--json").json()
    assert warning(doc, "unknown-key")["keys"] == [stray]
    assert doc["unknown_keys"] == [stray]


def test_non_finite_only_with_scan(run_cli, copy_testdata):
    import torch  # noqa: F401  (the poisoned copy below is written with torch)
    d = copy_testdata("tiny-llama-lora")
    key = f"{Q_PROJ}.lora_A.weight"

    def poison(t):
        t[key][0, 0] = float("nan")
        t[key][1, 1] = float("inf")

    edit_adapter_weights(d, change=poison)
    plain = run_cli("inspect", d, "--json").json()
    assert "non-finite" not in codes(plain) and plain["scanned"] is False
    scanned = run_cli("inspect", d, "--json", "--scan").json()
    assert scanned["scanned"] is True
    found = [w for w in scanned["warnings"] if w["code"] == "non-finite"]
    assert [w["keys"] for w in found] == [[key]]
    assert "1 NaN and 1 Inf" in found[0]["message"]


def test_scan_of_a_clean_adapter_adds_nothing(run_cli):
    doc = run_cli("inspect", TESTDATA / "tiny-llama-lora", "--json", "--scan").json()
    assert doc["scanned"] is True and doc["warnings"] == []


def test_tied_full_copy_with_base(run_cli):
    result = run_cli("inspect", TESTDATA / "tiny-llama-tied-lora", "--base", TESTDATA / "tiny-llama-tied", "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    assert warning(doc, "tied-full-copy")["keys"] == ["lm_head"]
    assert doc["check"]["ok"] is True
    assert doc["check"]["components"][0]["summary"] == "4/4 LoRA targets and 1/1 full copies resolved"
    # without the base nothing says lm_head is tied
    assert "tied-full-copy" not in codes(run_cli("inspect", TESTDATA / "tiny-llama-tied-lora", "--json").json())


def test_config_tensor_mismatch(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-multi")
    edit_adapter_config(d, target_modules=["q_proj", "v_proj", "gate_proj"])
    w = warning(run_cli("inspect", d, "--json").json(), "config-tensor-mismatch")
    assert w["keys"] == ["gate_proj"]


def test_config_tensor_mismatch_tensors_not_in_config(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-multi")
    edit_adapter_config(d, target_modules=["q_proj"])
    w = warning(run_cli("inspect", d, "--json").json(), "config-tensor-mismatch")
    assert w["keys"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_target_and_full_copy(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-lora")
    edit_adapter_config(d, modules_to_save=["lm_head", "q_proj"])
    w = warning(run_cli("inspect", d, "--json").json(), "target-and-full-copy")
    assert "model.layers.0.self_attn.q_proj" in w["keys"]


def test_warnings_go_to_stderr_and_strict_fails(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-lora")
    edit_adapter_weights(d, drop=[f"{Q_PROJ}.lora_B.weight"])
    result = run_cli("inspect", d)
    assert result.exit_code == 0
    assert "warning[orphan-lora]:" in result.stderr
    assert "warning[" not in result.stdout
    strict = run_cli("inspect", d, "--strict")
    assert strict.exit_code == 1
    assert run_cli("inspect", TESTDATA / "tiny-llama-lora", "--strict").exit_code == 0


def test_base_that_does_not_fit_gives_unresolved_and_shape_warnings(run_cli):
    doc = run_cli("inspect", TESTDATA / "tiny-llama-lora", "--base", TESTDATA / "tiny-bert", "--json").json()
    assert doc["check"]["ok"] is False
    assert warning(doc, "unresolved-module")["keys"][0] == "model.layers.0.mlp.down_proj"
    assert run_cli("inspect", TESTDATA / "tiny-llama-lora", "--base", TESTDATA / "tiny-bert", "--strict").exit_code == 1


# ---------------------------------------------------------------------------------------------
# pickle files
# ---------------------------------------------------------------------------------------------


def test_bin_needs_allow_pickle(run_cli, copy_testdata):
    import torch
    from safetensors.torch import load_file

    d = copy_testdata("tiny-llama-multi")
    st = d / "adapter_model.safetensors"
    torch.save(load_file(str(st)), d / "adapter_model.bin")
    st.unlink()
    assert_one_error_line(run_cli("inspect", d), "adapter_model.bin", "--allow-pickle")
    doc = run_cli("inspect", d, "--allow-pickle", "--json", "--scan").json()
    assert doc["totals"]["adapter_modules"] == 4 and doc["warnings"] == []


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the path
# ---------------------------------------------------------------------------------------------


def test_missing_path(run_cli, tmp_path):
    missing = tmp_path / "no-such-adapter"
    assert_one_error_line(run_cli("inspect", missing), str(missing))


def test_not_an_adapter_directory(run_cli):
    assert_one_error_line(run_cli("inspect", TESTDATA / "tiny-llama"), str(TESTDATA / "tiny-llama"), "adapter_config.json")


def test_missing_weights(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-multi")
    (d / "adapter_model.safetensors").unlink()
    assert_one_error_line(run_cli("inspect", d), str(d), "adapter_model.safetensors")


def test_truncated_safetensors(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-multi")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_one_error_line(run_cli("inspect", d), str(f), "truncated")


def test_broken_config(run_cli, copy_testdata):
    d = copy_testdata("tiny-llama-multi")
    (d / "adapter_config.json").write_text("{not json")
    assert_one_error_line(run_cli("inspect", d), str(d / "adapter_config.json"))


def test_unknown_subfolder(run_cli):
    assert_one_error_line(run_cli("inspect", TESTDATA / "tiny-llama-multi", "--subfolder", "third"), "third")


def test_missing_base(run_cli, tmp_path: Path):
    missing = tmp_path / "no-base"
    assert_one_error_line(run_cli("inspect", TESTDATA / "tiny-llama-lora", "--base", missing), str(missing))
