"""Trainable tokens in ``adapterfmt.load`` (FORMAT.md §3.7): outputs, state_dict names, trainable
set and the re-saved file equal PEFT's, on a tied and an untied Llama (the tied head follows the
embedding's rows, as PEFT wraps it too); ``unload(merge=True)`` keeps the outputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import adapterfmt

warnings.filterwarnings("ignore")
IDS = torch.tensor([[1, 3, 7, 2, 5]])
PREFIX = "base_model.model."


def _llama(path: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied"])
def test_trainable_tokens_load_equals_peft(tied: bool, tmp_path: Path) -> None:
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "base"))
    peft_model = get_peft_model(
        _llama(tmp_path / "base"), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 7, 1], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    ref = PeftModel.from_pretrained(_llama(tmp_path / "base"), str(tmp_path / "adapter"), is_trainable=True)
    model = _llama(tmp_path / "base")
    adapterfmt.load(model, tmp_path / "adapter", is_trainable=True)
    with torch.no_grad():
        expected, got, plain = ref(IDS).logits, model(IDS).logits, _llama(tmp_path / "base")(IDS).logits
    assert torch.equal(got, expected) and (got - plain).abs().max() > 1e-2
    assert set(model.state_dict()) == {k[len(PREFIX) :] for k in ref.state_dict()}
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {k[len(PREFIX) :] for k, p in ref.named_parameters() if p.requires_grad}

    adapterfmt.save(model, tmp_path / "resaved")
    saved, ours = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")), load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in saved)

    adapterfmt.unload(model, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-5)


def test_trainable_tokens_bad_index_changes_nothing(tmp_path: Path) -> None:
    """An index outside the vocabulary is refused before the model changes."""
    import json

    import transformers
    from peft import LoraConfig, get_peft_model

    from adapterfmt.errors import InvalidConfigError

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "base"))
    get_peft_model(_llama(tmp_path / "base"), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 7])).save_pretrained(str(tmp_path / "a"))
    doc = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    doc["trainable_token_indices"] = [3, 700]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(doc))
    model = _llama(tmp_path / "base")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidConfigError, match="700"):
        adapterfmt.load(model, tmp_path / "a")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
