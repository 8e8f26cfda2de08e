"""Several adapters on one model, merge / unmerge / unload / disable, against PEFT.

We test:
* two adapters side by side (``lora_A.default`` / ``lora_A.second``): PEFT's structure and outputs
  with either active, and with adapters disabled;
* ``merge`` gives PEFT's merged weights (fp32: bit-equal), ``unmerge`` restores them (DoRA: exactly);
  merges on conv, embedding and Conv1D layers (DoRA, rsLoRA, lora_bias) keep the outputs and equal
  PEFT's ``merge_and_unload``;
* ``unload(merge=True)`` equals ``merge_and_unload``; ``unload()`` gives back the plain model.
"""

from __future__ import annotations

import pytest
import torch

import adapterfmt
from adapterfmt.errors import MergeError
from adapterfmt.layers.full_copy import FullCopy
from adapterfmt.layers.lora import LoraLayer

from _load_helpers import (
    TESTDATA,
    assert_outputs_close,
    assert_same_structure,
    conv_embed_inputs,
    conv_embed_net,
    make_peft_adapter,
    peft_reference,
    tiny_gpt2,
    tiny_llama,
)

MULTI = TESTDATA / "tiny-llama-multi"
IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture()
def pair():
    """(ours, PEFT) with ``default`` and ``second`` loaded from tiny-llama-multi."""
    ours = tiny_llama()
    adapterfmt.load(ours, MULTI)
    handle = adapterfmt.load(ours, MULTI / "second", adapter_name="second")
    ref = peft_reference(tiny_llama, MULTI)
    ref.load_adapter(str(MULTI / "second"), adapter_name="second")
    assert handle.active == ["default"] and set(handle.adapters) == {"default", "second"}
    return ours, ref


def test_two_adapters_match_peft(pair):
    ours, ref = pair
    assert_same_structure(ours, ref.base_model.model)
    assert_outputs_close(logits(ours), logits(ref))
    adapterfmt.set_adapter(ours, "second")
    ref.set_adapter("second")
    assert_outputs_close(logits(ours), logits(ref))
    with adapterfmt.disable_adapters(ours), ref.disable_adapter():
        assert_outputs_close(logits(ours), logits(ref))
        assert_outputs_close(logits(ours), logits(tiny_llama()))
    assert_outputs_close(logits(ours), logits(ref))


def test_merge_equals_peft_and_unmerge_restores(pair):
    ours, ref = pair
    inner = ref.base_model.model
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    out = logits(ours)
    adapterfmt.merge(ours)
    ref.merge_adapter()
    assert_same_structure(ours, inner)  # fp32 vanilla LoRA: bit-equal merged weights
    assert_outputs_close(logits(ours), out, atol=1e-5)
    with pytest.raises(MergeError):
        adapterfmt.set_adapter(ours, "second")
    with adapterfmt.disable_adapters(ours):
        assert_outputs_close(logits(ours), logits(tiny_llama()), atol=1e-5)
    assert_outputs_close(logits(ours), out, atol=1e-5)
    adapterfmt.unmerge(ours)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_unload_with_merge_equals_merge_and_unload():
    ours = tiny_llama()
    adapterfmt.load(ours, TESTDATA / "tiny-llama-lora")
    merged = adapterfmt.unload(ours, merge=True)
    ref = peft_reference(tiny_llama, TESTDATA / "tiny-llama-lora").merge_and_unload()
    assert merged is ours
    assert_same_structure(ours, ref)
    assert not any(isinstance(m, (LoraLayer, FullCopy)) for m in ours.modules())
    assert_outputs_close(logits(ours), logits(ref))


def test_unload_gives_back_the_plain_model(pair):
    ours, _ = pair
    plain = tiny_llama()
    adapterfmt.merge(ours)
    adapterfmt.unload(ours)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in plain.named_modules()]
    assert type(ours.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, plain.state_dict()[k], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no adapters"):
        adapterfmt.set_adapter(ours, "default")
    adapterfmt.load(ours, MULTI)  # a fresh start works


def test_dora_merge_keeps_outputs_and_unmerge_is_exact():
    ours = tiny_llama()
    adapterfmt.load(ours, TESTDATA / "tiny-llama-dora")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    out = logits(ours)
    adapterfmt.merge(ours)
    assert_outputs_close(logits(ours), out, atol=1e-5)
    adapterfmt.unmerge(ours)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


MERGE_CASES = {
    "conv-embedding-dora": (conv_embed_net, conv_embed_inputs, dict(target_modules=["embed", "conv1", "conv2", "conv3", "head"], use_dora=True)),
    "conv1d-dora-rslora": (tiny_gpt2, lambda: IDS % 64, dict(target_modules=["c_attn", "c_proj"], use_dora=True, use_rslora=True)),
    "conv1d-lora-bias": (tiny_gpt2, lambda: IDS % 64, dict(target_modules=["c_attn", "c_fc"], lora_bias=True)),
}


@pytest.mark.parametrize("name", list(MERGE_CASES))
def test_merge_and_unload_per_layer_type(tmp_path, name):
    build, inputs, config = MERGE_CASES[name]
    adapter = make_peft_adapter(build, tmp_path / "a", r=4, lora_alpha=8, **config)
    ours = build()
    adapterfmt.load(ours, adapter)
    ref = peft_reference(build, adapter).merge_and_unload()

    def run(m):
        with torch.no_grad():
            out = m(inputs())
        return out if isinstance(out, torch.Tensor) else out.logits

    out = run(ours)
    adapterfmt.merge(ours)
    assert_outputs_close(run(ours), out, atol=1e-5)
    adapterfmt.unload(ours, merge=True)
    assert_outputs_close(run(ours), run(ref), atol=1e-5)


def test_unknown_adapter_name_is_refused(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="no adapter named 'third'"):
        adapterfmt.set_adapter(ours, "third")
    with pytest.raises(ValueError, match="already on this model"):
        adapterfmt.load(ours, MULTI, adapter_name="second")
