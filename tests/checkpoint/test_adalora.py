"""AdaLoRA checkpoints (FORMAT.md §3.10): inspect and check read them, merge equals PEFT's
``merge_and_unload`` (to float32 rounding: PEFT divides by ``ranknum`` as a tensor), load equals
PEFT."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import adapterfmt

warnings.filterwarnings("ignore")
IDS = torch.tensor([[1, 5, 9, 2, 7]])


def _llama(path: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import transformers
    from peft import AdaLoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adalora")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(root / "base"))
    model = get_peft_model(_llama(root / "base"), AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                                total_step=10, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_()
    model.save_pretrained(str(root / "adapter"))
    return root / "base", root / "adapter"


def test_inspect_and_check(pair: tuple[Path, Path], run_cli) -> None:
    base, adapter = pair
    ckpt = adapterfmt.read_adapter(adapter)
    assert ckpt.unknown_keys == [] and len(ckpt.lora) == 3
    assert all(set(m.tensors) == {"lora_A", "lora_B", "lora_E"} and m.rank == 6 for m in ckpt.lora.values())
    assert abs(next(iter(ckpt.lora.values())).scaling - 8 / (6 + 1e-5)) < 1e-12
    doc = run_cli("inspect", adapter, "--json").json()
    assert not {f["code"] for f in doc.get("warnings", doc.get("findings", []))}
    assert run_cli("check", "--base", base, "--adapter", adapter).exit_code == 0


def test_merge_equals_peft(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    base, adapter = pair
    summary = adapterfmt.merge_to_directory(base, adapter, tmp_path / "out")
    assert summary.tensors_merged == 3
    ref = PeftModel.from_pretrained(_llama(base), str(adapter)).eval()
    with torch.no_grad():
        forward = ref(IDS).logits
    merged = ref.merge_and_unload().state_dict()
    ours = _llama(tmp_path / "out")
    for key, value in merged.items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=2e-6)
    with torch.no_grad():
        logits = ours(IDS).logits
        plain = _llama(base)(IDS).logits
    torch.testing.assert_close(logits, forward, rtol=0, atol=1e-5)
    assert (logits - plain).abs().max() > 1e-2


def test_load_equals_peft(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """load: PEFT's outputs, state_dict names (lora_A/B/E and ranknum ParameterDicts), trainable set,
    the re-saved file; unload(merge=True) keeps the outputs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base, adapter = pair
    ref = PeftModel.from_pretrained(_llama(base), str(adapter), is_trainable=True).eval()
    model = _llama(base)
    adapterfmt.load(model, adapter, is_trainable=True)
    model.eval()
    with torch.no_grad():
        expected, got = ref(IDS).logits, model(IDS).logits
    assert torch.equal(got, expected)
    assert set(model.state_dict()) == {k[len("base_model.model.") :] for k in ref.state_dict()}
    trainable = {k[len("base_model.model.") :] for k, p in ref.named_parameters() if p.requires_grad}
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable
    adapterfmt.save(model, tmp_path / "resaved")
    saved, ours = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(tmp_path / "resaved" / "adapter_model.safetensors"))
    assert set(saved) == set(ours) and all(torch.equal(saved[k], ours[k]) for k in saved)
    import json

    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["peft_type"] == "ADALORA"  # not rewritten as LORA
    again = PeftModel.from_pretrained(_llama(base), str(tmp_path / "resaved")).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, expected)
    adapterfmt.unload(model, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-5)
