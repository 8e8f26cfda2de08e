"""The public API as a PEFT user reads it (issue 10 point 9), checked against PEFT.

* ``wrap(model, config)`` takes an ``adapterfmt.LoraConfig`` (or an ``adapter_config.json`` dict) and
  gives the same adapter as the keyword form and as ``get_peft_model`` with the same config;
* ``save(model, path)`` writes every adapter, as ``save_pretrained`` does: ``default`` at the top,
  the others in ``path/<name>/``; PEFT loads each with the same outputs;
* ``load(model, state_dict, config=...)`` equals ``load(model, path)`` of the same files.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file

import adapterfmt
from adapterfmt.constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE

from _load_helpers import TESTDATA, assert_outputs_close, assert_same_structure, peft_reference, tiny_llama

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
FIELDS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, use_rslora=True)


def test_wrap_takes_a_config_object_like_get_peft_model():
    cfg = adapterfmt.parse_config({"peft_type": "LORA", **FIELDS})
    torch.manual_seed(7)
    from_object = adapterfmt.wrap(tiny_llama(), cfg).model
    torch.manual_seed(7)
    from_keywords = adapterfmt.wrap(tiny_llama(), **FIELDS).model
    torch.manual_seed(7)
    from_dict = adapterfmt.wrap(tiny_llama(), {"peft_type": "LORA", **FIELDS}).model
    torch.manual_seed(7)
    from_dataclass = adapterfmt.wrap(tiny_llama(), adapterfmt.LoraConfig(**FIELDS)).model
    torch.manual_seed(7)
    theirs = get_peft_model(tiny_llama(), PeftLoraConfig(**FIELDS))
    assert_same_structure(from_object, from_keywords)
    assert_same_structure(from_object, from_dict)
    assert_same_structure(from_object, from_dataclass)
    assert_same_structure(from_object, theirs.base_model.model)


def test_wrap_refuses_a_config_object_mixed_with_keywords():
    cfg = adapterfmt.parse_config({"peft_type": "LORA", **FIELDS})
    model = tiny_llama()
    with pytest.raises(TypeError, match="config object and field keywords"):
        adapterfmt.wrap(model, cfg, r=2)
    with pytest.raises(adapterfmt.UnsupportedFeatureError):
        adapterfmt.wrap(model, adapterfmt.parse_config({"peft_type": "LORA", **FIELDS, "bias": "all"}))
    assert "lora_A" not in str(list(model.state_dict()))  # nothing changed


def _two_wrapped_adapters() -> torch.nn.Module:
    model = tiny_llama()
    adapterfmt.wrap(model, adapterfmt.parse_config({"peft_type": "LORA", **FIELDS}))
    adapterfmt.wrap(model, ["k_proj", "o_proj"], r=2, lora_alpha=4, adapter_name="other")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.requires_grad_(False)  # as PeftModel.from_pretrained loads it
    return model.eval()


def test_save_writes_every_adapter_as_save_pretrained_does(tmp_path):
    ours = _two_wrapped_adapters()
    adapterfmt.save(ours, tmp_path)
    assert (tmp_path / ADAPTER_SAFETENSORS_FILE).is_file() and (tmp_path / ADAPTER_CONFIG_FILE).is_file()
    assert (tmp_path / "other" / ADAPTER_SAFETENSORS_FILE).is_file() and (tmp_path / "other" / ADAPTER_CONFIG_FILE).is_file()

    # The same layout PEFT writes for the same two adapters.
    theirs = get_peft_model(tiny_llama(), PeftLoraConfig(**FIELDS))
    theirs.add_adapter("other", PeftLoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    ours_files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and "peft" not in p.parts)
    peft_files = sorted(p.relative_to(tmp_path / "peft").as_posix() for p in (tmp_path / "peft").rglob("*") if p.is_file())
    assert ours_files == [f for f in peft_files if not f.endswith("README.md")]

    ref = peft_reference(tiny_llama, tmp_path)
    ref.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert_same_structure(ours, ref.base_model.model)
    for name in ("default", "other"):
        adapterfmt.set_adapter(ours, name)
        ref.set_adapter(name)
        with torch.no_grad():
            assert_outputs_close(ours(IDS).logits, ref(IDS).logits)


def test_save_of_one_named_adapter_still_writes_only_it(tmp_path):
    ours = _two_wrapped_adapters()
    adapterfmt.save(ours, tmp_path, adapter_name="other")
    assert not (tmp_path / ADAPTER_CONFIG_FILE).exists()
    assert (tmp_path / "other" / ADAPTER_CONFIG_FILE).is_file()


def test_load_takes_a_state_dict_and_config_like_load_lora_weights():
    src = TESTDATA / "tiny-llama-lora"
    state = load_file(str(src / ADAPTER_SAFETENSORS_FILE))
    config = json.loads((src / ADAPTER_CONFIG_FILE).read_text())
    from_path = adapterfmt.load(tiny_llama(), src).model
    from_dict = adapterfmt.load(tiny_llama(), state, config=config).model
    from_object = adapterfmt.load(tiny_llama(), state, config=adapterfmt.parse_config(config)).model
    assert_same_structure(from_dict, from_path)
    assert_same_structure(from_object, from_path)
    with torch.no_grad():
        assert_outputs_close(from_dict(IDS).logits, from_path(IDS).logits, atol=0)
    # the caller's tensors are copied, never shared with the model
    key = next(k for k in state if "lora_A" in k)
    before = state[key].clone()
    with torch.no_grad():
        for p in from_dict.parameters():
            p.zero_()
    assert torch.equal(state[key], before)


def test_load_of_a_state_dict_needs_its_config():
    state = load_file(str(TESTDATA / "tiny-llama-lora" / ADAPTER_SAFETENSORS_FILE))
    with pytest.raises(TypeError, match="needs config"):
        adapterfmt.load(tiny_llama(), state)
    with pytest.raises(TypeError, match="only for a state dict"):
        adapterfmt.load(tiny_llama(), TESTDATA / "tiny-llama-lora", config={"peft_type": "LORA"})
