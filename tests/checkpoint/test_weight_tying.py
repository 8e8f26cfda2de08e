"""PEFT's ``ensure_weight_tying`` checkpoints on a tied Llama (FORMAT.md §3.6, §6.9).

* ``modules_to_save=["embed_tokens"]``: PEFT also saves the tied ``lm_head.weight``; it is the
  head's full copy (no ``unknown-key``), and merge/load equal PEFT.
* ``target_modules`` with the embedding: PEFT adds a mirrored LoRA on the tied head. Its
  ``merge_and_unload`` adds the one delta twice and disagrees with its own forward; adapterfmt
  applies it once and equals the unmerged forward.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import adapterfmt

warnings.filterwarnings("ignore")
IDS = torch.tensor([[1, 5, 9, 2, 7]])
CONFIGS = {
    "modules-to-save": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "lora-on-embedding": dict(target_modules=["q_proj", "embed_tokens"]),
}


def _llama(path: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True
    )
    path = tmp_path_factory.mktemp("tied") / "base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _adapter(base: Path, name: str, root: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(_llama(base), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, ensure_weight_tying=True, **CONFIGS[name]))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".modules_to_save." in key:
                p.add_(torch.randn_like(p))
    out = root / name
    model.save_pretrained(str(out))
    return out


def _peft(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_llama(base), str(adapter)).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reads_without_false_findings(base: Path, name: str, tmp_path: Path) -> None:
    ckpt = adapterfmt.read_adapter(_adapter(base, name, tmp_path))
    assert ckpt.unknown_keys == []
    assert not {f.code for f in ckpt.findings} & {"unknown-key", "config-tensor-mismatch"}, ckpt.findings
    if name == "modules-to-save":
        assert set(ckpt.full_copies) == {"model.embed_tokens", "lm_head"}


def test_modules_to_save_merge_and_load_equal_peft(base: Path, tmp_path: Path) -> None:
    adapter = _adapter(base, "modules-to-save", tmp_path)
    summary = adapterfmt.merge_to_directory(base, adapter, tmp_path / "out")
    assert summary.untied == ["lm_head.weight"]
    ref = _peft(base, adapter)
    ref_logits = _logits(ref)
    merged = ref.merge_and_unload().state_dict()
    ours = _llama(tmp_path / "out")
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in merged.items())
    assert torch.equal(_logits(ours), ref_logits)
    model = _llama(base)
    adapterfmt.load(model, adapter)
    assert torch.equal(_logits(model), ref_logits)
    assert set(model.state_dict()) == {k[len("base_model.model.") :] for k in _peft(base, adapter).state_dict()}


def test_lora_on_tied_embedding_follows_the_unmerged_forward(base: Path, tmp_path: Path) -> None:
    adapter = _adapter(base, "lora-on-embedding", tmp_path)
    adapterfmt.merge_to_directory(base, adapter, tmp_path / "out")
    ref = _peft(base, adapter)
    forward = _logits(ref)
    ours = _logits(_llama(tmp_path / "out"))
    torch.testing.assert_close(ours, forward, rtol=1e-5, atol=1e-3)
    # PEFT's own merge adds the shared delta twice (documented difference, FORMAT.md §6.9).
    assert (_logits(ref.merge_and_unload()) - forward).abs().max() > 1.0
    model = _llama(base)
    adapterfmt.load(model, adapter)
    torch.testing.assert_close(_logits(model), forward, rtol=1e-5, atol=1e-3)
