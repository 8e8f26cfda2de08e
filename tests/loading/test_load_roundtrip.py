"""adapterfmt.save: PEFT's layout, readable by PEFT and by adapterfmt.load.

We test:
* PEFT save -> adapterfmt load -> adapterfmt save gives back the same tensors, keys, metadata and config;
* adapterfmt save (of a loaded adapter, of a ``wrap``-made DoRA adapter, of two adapters) ->
  ``PeftModel.from_pretrained`` gives the same structure and outputs;
* adapterfmt save -> adapterfmt load gives the same model;
* base tensors a checkpoint replaces (a targeted embedding saved in full, ``bias="all"``) are
  loaded as PEFT loads them and saved back under the same keys (PEFT's wrapper junk dropped).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterfmt
from adapterfmt.constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE

from _load_helpers import (
    TESTDATA,
    assert_outputs_close,
    assert_same_structure,
    conv_embed_inputs,
    conv_embed_net,
    make_peft_adapter,
    peft_reference,
    tiny_bert,
    tiny_llama,
)

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


def _file(directory):
    with safe_open(str(directory / ADAPTER_SAFETENSORS_FILE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _config(directory):
    return json.loads((directory / ADAPTER_CONFIG_FILE).read_text())


def test_save_reproduces_the_peft_file(tmp_path):
    src = TESTDATA / "tiny-llama-lora"
    model = tiny_llama()
    adapterfmt.load(model, src)
    adapterfmt.save(model, tmp_path)
    (ours, meta), (theirs, _) = _file(tmp_path), _file(src)
    assert meta == {"format": "pt"}
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert _config(tmp_path) == _config(src)


def test_peft_loads_what_we_save_of_two_adapters(tmp_path):
    multi = TESTDATA / "tiny-llama-multi"
    model = tiny_llama()
    adapterfmt.load(model, multi)
    adapterfmt.load(model, multi / "second", adapter_name="second")
    adapterfmt.save(model, tmp_path, adapter_name=None)
    assert (tmp_path / ADAPTER_CONFIG_FILE).is_file() and (tmp_path / "second" / ADAPTER_SAFETENSORS_FILE).is_file()
    ref = peft_reference(tiny_llama, tmp_path)
    ref.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert_same_structure(model, ref.base_model.model)
    for name in ("default", "second"):
        adapterfmt.set_adapter(model, name)
        ref.set_adapter(name)
        with torch.no_grad():
            assert_outputs_close(model(IDS).logits, ref(IDS).logits)


def test_wrapped_dora_adapter_roundtrips_through_peft_and_back(tmp_path):
    """wrap -> (pretend training) -> save -> PEFT loads it; and adapterfmt loads it back identically."""
    model = conv_embed_net()
    adapterfmt.wrap(
        model,
        ["embed", "conv1", "conv2", "conv3", "head"],
        modules_to_save=["classify"],
        r=4,
        lora_alpha=6,
        use_dora=True,
        use_rslora=True,
        rank_pattern={"conv3": 2},
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.requires_grad_(False)
    adapterfmt.save(model, tmp_path)
    with torch.no_grad():
        expected = model(conv_embed_inputs())

    ref = peft_reference(conv_embed_net, tmp_path)
    assert_same_structure(model, ref.base_model.model)
    again = conv_embed_net()
    adapterfmt.load(again, tmp_path)
    assert_same_structure(model, again)
    with torch.no_grad():
        assert_outputs_close(ref(conv_embed_inputs()), expected)
        assert_outputs_close(again(conv_embed_inputs()), expected, atol=0)


BASE_OVERRIDES = {
    "embedding-saved-in-full": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "bias-all": (tiny_bert, dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("name", list(BASE_OVERRIDES))
def test_base_tensors_saved_in_full(tmp_path, name):
    build, config = BASE_OVERRIDES[name]
    src = make_peft_adapter(build, tmp_path / "src", **config)
    state = load_file(str(src / ADAPTER_SAFETENSORS_FILE))
    junk = {k for k in state if ".original_module." in k or ".modules_to_save." in k}
    g = torch.Generator().manual_seed(9)
    for k, v in state.items():  # make the replaced base tensors differ from the base
        if "lora_" not in k and k not in junk and not k.startswith("base_model.model.classifier."):
            state[k] = v + torch.randn(v.shape, generator=g) * 0.1
    save_file(state, str(src / ADAPTER_SAFETENSORS_FILE), metadata={"format": "pt"})

    ours = build()
    adapterfmt.load(ours, src, is_trainable=True)  # trainable: bias="all" also trains every bias, as in PEFT
    ref = peft_reference(build, src, is_trainable=True)
    assert_same_structure(ours, ref.base_model.model)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_outputs_close(ours(ids).logits, ref(ids).logits)
    adapterfmt.save(ours, tmp_path / "out")
    (saved, _) = _file(tmp_path / "out")
    assert sorted(saved) == sorted(set(state) - junk)
    for k, v in saved.items():
        assert torch.equal(v, state[k]), k
