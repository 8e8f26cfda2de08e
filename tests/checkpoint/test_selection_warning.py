"""A config whose selection matches none of its tensors' modules: ``config-tensor-mismatch`` in
inspect, check and merge (PEFT refuses to load such an adapter)."""

from __future__ import annotations

import pytest

from conftest import TESTDATA, edit_adapter_config

SELECTS_NOTHING = [
    {"layers_to_transform": [5], "layers_pattern": "layers"},
    {"layers_to_transform": 7},
    {"exclude_modules": r".*_proj"},
    {"exclude_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    {"target_modules": r".*\.attention\.(query|value)"},
]


@pytest.mark.parametrize("change", SELECTS_NOTHING, ids=str)
def test_selection_matching_nothing_is_reported_by_inspect_check_and_merge(change, run_cli, copy_testdata, tmp_path):
    adapter = copy_testdata("tiny-llama-lora")
    edit_adapter_config(adapter, **change)

    doc = run_cli("inspect", adapter, "--json").json()
    hits = [w for w in doc["warnings"] if w["code"] == "config-tensor-mismatch" and "matches none" in w["message"]]
    assert len(hits) == 1 and len(hits[0]["keys"]) == 14, doc["warnings"]

    check = run_cli("check", "--base", TESTDATA / "tiny-llama", "--adapter", adapter)
    assert check.exit_code == 0 and "config-tensor-mismatch" in check.stderr and "matches none" in check.stderr
    assert run_cli("check", "--base", TESTDATA / "tiny-llama", "--adapter", adapter, "--strict").exit_code == 1

    merge = run_cli("merge", "--base", TESTDATA / "tiny-llama", "--adapter", adapter, "-o", tmp_path / "out")
    assert merge.exit_code == 0 and "warning [config-tensor-mismatch]" in merge.stderr and "matches none" in merge.stderr


def test_a_selection_that_matches_some_modules_names_the_rest(run_cli, copy_testdata):
    adapter = copy_testdata("tiny-llama-lora")
    edit_adapter_config(adapter, layers_to_transform=[0], layers_pattern="layers")
    doc = run_cli("inspect", adapter, "--json").json()
    (w,) = [w for w in doc["warnings"] if w["code"] == "config-tensor-mismatch"]
    assert "layer filter" in w["message"] and all(".layers.1." in k for k in w["keys"]) and len(w["keys"]) == 7


def test_the_unchanged_adapter_has_no_such_warning(run_cli):
    doc = run_cli("inspect", TESTDATA / "tiny-llama-lora", "--json").json()
    assert not [w for w in doc["warnings"] if w["code"] == "config-tensor-mismatch"]


def test_peft_refuses_an_adapter_whose_selection_matches_nothing(copy_testdata):
    """The oracle: PEFT's loader raises for the first case above."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = copy_testdata("tiny-llama-lora")
    edit_adapter_config(adapter, **SELECTS_NOTHING[0])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TESTDATA / "tiny-llama")
    with pytest.raises(ValueError, match="No modules were targeted"):
        PeftModel.from_pretrained(model, adapter)
