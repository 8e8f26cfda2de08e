"""One path and one schema for every adapter format (BEHAVIOUR §4.3).

``inspect --json`` and ``check --json`` of a PEFT LoRA, a PEFT LoHa, a kohya / LyCORIS file and a
diffusers file — each written by its own tool (PEFT, LyCORIS, diffusers) — validate against the
same published schema, and list their modules and bindings with the same fields.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _diffusion_helpers import save_component, sd_lora_case, tiny_unet
from _schemas import validate_json

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """format -> (adapter, base it is checked against)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoHaConfig, LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("one_schema")
    sd = sd_lora_case(str(root))
    unet = tiny_unet()
    save_component(unet, str(root / "unet"))
    loha = get_peft_model(copy.deepcopy(unet), LoHaConfig(r=4, alpha=6, target_modules=["to_q", "to_k", "conv1"]))
    loha.save_pretrained(root / "loha")
    lora_unet = copy.deepcopy(unet)
    lora_unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for n, p in lora_unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    StableDiffusionPipeline.save_lora_weights(str(root / "diffusers"), unet_lora_layers=get_peft_model_state_dict(lora_unet))
    return {
        "peft-lora": (TESTDATA / "tiny-llama-lora", TESTDATA / "tiny-llama"),
        "peft-loha": (root / "loha", root / "unet"),
        "kohya": (sd["file"], sd["pipe"]),
        "diffusers": (root / "diffusers" / "pytorch_lora_weights.safetensors", root / "unet"),
    }


FORMATS = ["peft-lora", "peft-loha", "kohya", "diffusers"]
MODULE_FIELDS = {"module", "name_in_file", "resolved", "grammar_name", "grammar_note", "checked", "component", "type", "method", "layer_kind", "rank", "config_rank", "alpha",
                 "scaling", "use_dora", "lora_bias", "dtype", "params", "tensors"}
BINDING_FIELDS = {"module", "type", "method", "base_key", "layout"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_and_check_share_one_schema(fmt, sources, run_cli):
    adapter, base = sources[fmt]
    inspected = run_cli("inspect", adapter, "--json")
    assert inspected.exit_code == 0, inspected
    doc = inspected.json()
    validate_json("inspect", doc)  # run_cli validates too; said here because it is the point
    assert doc["modules"] and all(set(m) == MODULE_FIELDS for m in doc["modules"])
    adapted = [m for m in doc["modules"] if m["type"] == "adapter"]
    assert adapted and {m["method"] for m in adapted} == set(doc["methods"]) == {"peft-lora": {"lora"}, "peft-loha": {"loha"}}.get(fmt, {"lora"})
    assert doc["totals"]["adapter_modules"] == len(adapted)

    checked = run_cli("check", "--base", base, "--adapter", adapter, "--json")
    assert checked.exit_code == 0, checked
    report = checked.json()
    validate_json("check", report)
    assert report["ok"] and report["components"]
    bindings = [b for c in report["components"] for b in c["bindings"]]
    assert bindings and all(set(b) == BINDING_FIELDS for b in bindings)
    # every adapted module binds, by the same record, to the base tensor it changes
    assert {b["module"] for b in bindings if b["type"] == "adapter"} >= {m["module"] for m in adapted if m["resolved"]}
    assert sum(c["counts"]["adapter"]["resolved"] for c in report["components"]) == len(adapted)
    # inspect --base carries the same check document
    with_base = run_cli("inspect", adapter, "--base", base, "--json").json()
    assert with_base["check"]["components"] == report["components"]


def test_the_schema_rejects_a_record_of_another_shape(sources, run_cli):
    """The schema has teeth: an old (format_version 1) record, or an extra field, fails it."""
    import jsonschema

    doc = run_cli("inspect", sources["kohya"][0], "--json").json()
    old = copy.deepcopy(doc)
    old["modules"][0]["kind"] = old["modules"][0].pop("method")
    with pytest.raises(jsonschema.ValidationError):
        validate_json("inspect", old)
    extra = copy.deepcopy(doc)
    extra["totals"]["lora_modules"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_json("inspect", extra)
