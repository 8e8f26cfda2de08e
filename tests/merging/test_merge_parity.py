"""The merged model equals PEFT's ``merge_and_unload``: every tensor, bit for bit where PEFT rounds once,
and the logits of the merged directory loaded with transformers.

Documented tolerances (everything else is ``torch.equal``):
* Conv2d with a k×k kernel: PEFT builds the delta with ``conv2d`` instead of a matmul, which sums
  in another order; float32 results agree to a few ulp.
* Embedding LoRA on a bf16 base: PEFT casts the delta to bf16 before adding (two roundings),
  adapterfmt rounds once; they differ by at most one bf16 rounding of the delta and of the sum.
* several adapters on a bf16 base: PEFT rounds to bf16 after each adapter, adapterfmt once at the
  end (compared in float32 output, where both round the same way, they are bit-identical).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from peft import LoraConfig  # noqa: E402
from safetensors import safe_open  # noqa: E402

import adapterfmt  # noqa: E402
from adapterfmt.storage.header import read_header  # noqa: E402

from _merge_helpers import ConvEmbed, peft_merged, read_dir, save_adapter, save_module, seeded, tree_digest, unequal  # noqa: E402

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def _causal(path: Path, dtype: "torch.dtype | None" = None) -> torch.nn.Module:
    kwargs = {"dtype": dtype} if dtype else {}
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _tiny_llama(tmp: Path, name: str, *, tied: bool, dtype: torch.dtype = torch.float32) -> tuple[Path, transformers.PreTrainedModel]:
    seeded(0)
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied
    )
    model = transformers.LlamaForCausalLM(config).to(dtype)
    base = tmp / name
    model.save_pretrained(str(base))
    return base, model


def test_llama_sharded_bit_identical_layout_and_logits(tmp_path: Path) -> None:
    base, adapter, out = TESTDATA / "tiny-llama", TESTDATA / "tiny-llama-lora", tmp_path / "merged"
    before = tree_digest(base, adapter)
    summary = adapterfmt.merge_to_directory(base, adapter, out, verify=True)
    assert tree_digest(base, adapter) == before
    assert (summary.tensors_merged, summary.tensors_replaced) == (14, 1)

    ref_model = peft_merged(lambda: _causal(base), [adapter])
    ours = read_dir(out)
    assert set(ours) == set(ref_model.state_dict()) and unequal(ours, ref_model.state_dict()) == []
    assert torch.equal(_logits(_causal(out)), _logits(ref_model))

    # Same shard files and key order, index covering every key once, copied side files.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    headers = {name: read_header(out / name) for name in set(index["weight_map"].values())}
    assert index["metadata"]["total_size"] == sum(h.nbytes for h in headers.values())
    for name, header in headers.items():
        assert list(header.tensors) == list(read_header(base / name).tensors)
        assert header.metadata == {"format": "pt"}
    for side in ("config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (base / side).read_bytes()
    # Untouched tensors are the base's bytes, not a decode/encode round trip.
    norm = "model.layers.0.input_layernorm.weight"
    src, dst = read_header(base / base_index["weight_map"][norm]).tensors[norm], headers[index["weight_map"][norm]].tensors[norm]
    with open(src.file, "rb") as a, open(dst.file, "rb") as b:
        a.seek(src.start)
        b.seek(dst.start)
        assert a.read(src.nbytes) == b.read(dst.nbytes)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_tied_head_full_copy_is_written_and_untied(tmp_path: Path) -> None:
    base, adapter, out = TESTDATA / "tiny-llama-tied", TESTDATA / "tiny-llama-tied-lora", tmp_path / "merged"
    summary = adapterfmt.merge_to_directory(base, adapter, out)
    assert summary.untied == ["lm_head.weight"]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    ref_model = peft_merged(lambda: _causal(base), [adapter])
    assert ref_model.config.tie_word_embeddings is False  # PEFT unties too
    ours = read_dir(out)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(ours)
    assert unequal(ours, ref_model.state_dict()) == []
    assert torch.equal(_logits(_causal(out)), _logits(ref_model))


def test_tied_embedding_lora_changes_both_like_peft(tmp_path: Path) -> None:
    """PEFT merges an embed_tokens LoRA into the tensor lm_head shares, so the head changes too."""
    base, model = _tiny_llama(tmp_path, "base", tied=True)
    adapter = tmp_path / "adapter"
    save_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False), adapter)
    out = tmp_path / "merged"
    summary = adapterfmt.merge_to_directory(base, adapter, out)
    assert summary.untied == ["lm_head.weight"]
    ref_model = peft_merged(lambda: _causal(base), [adapter])
    ours = read_dir(out)
    assert torch.equal(ours["lm_head.weight"], ours["model.embed_tokens.weight"])
    assert unequal(ours, ref_model.state_dict()) == []
    assert torch.equal(_logits(_causal(out)), _logits(ref_model))

    # In memory: the tied state dict (two keys, one storage) merges the same way, input untouched.
    state = _causal(base).state_dict()
    snapshot = {k: v.clone() for k, v in state.items()}
    merged = adapterfmt.merge_state_dict(state, adapter)
    assert unequal(merged, ref_model.state_dict()) == []
    assert unequal(state, snapshot) == []


def test_gpt2_conv1d_bf16(tmp_path: Path) -> None:
    seeded(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).to(torch.bfloat16)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    model.save_pretrained(str(base))
    # c_attn (32 -> 96) and the square attention c_proj (32 -> 32), whose layout only the votes tell.
    target = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    save_adapter(model, target, adapter)
    adapterfmt.merge_to_directory(base, adapter, out)
    ref_model = peft_merged(lambda: _causal(base), [adapter])
    ours, ref = read_dir(out), ref_model.state_dict()
    assert "lm_head.weight" not in ours and ref_model.config.tie_word_embeddings  # embeddings untouched: still tied
    assert unequal(ours, {k: v for k, v in ref.items() if k != "lm_head.weight"}) == []
    assert torch.equal(_logits(_causal(out)), _logits(ref_model))


@pytest.mark.parametrize("name", ["tiny-bert-classifier", "tiny-bert-lorabias"])
def test_bert_classifier_and_lora_bias(tmp_path: Path, name: str) -> None:
    base, adapter, out = TESTDATA / "tiny-bert", TESTDATA / name, tmp_path / "merged"
    adapterfmt.merge_to_directory(base, adapter, out)

    def load(path: Path) -> torch.nn.Module:
        return transformers.AutoModelForSequenceClassification.from_pretrained(str(path)).eval()

    ref_model = peft_merged(lambda: load(base), [adapter])
    assert unequal(read_dir(out), ref_model.state_dict()) == []
    with torch.no_grad():
        assert torch.equal(load(out)(IDS).logits, ref_model(IDS).logits)


def test_dora_llama(tmp_path: Path) -> None:
    base, adapter, out = TESTDATA / "tiny-llama", TESTDATA / "tiny-llama-dora", tmp_path / "merged"
    adapterfmt.merge_to_directory(base, adapter, out)
    assert unequal(read_dir(out), peft_merged(lambda: _causal(base), [adapter]).state_dict()) == []


def test_rslora_with_rank_and_alpha_patterns(tmp_path: Path) -> None:
    base, model = _tiny_llama(tmp_path, "base", tied=False, dtype=torch.bfloat16)
    adapter = tmp_path / "adapter"
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3},
        target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
    )  # fmt: skip
    save_adapter(model, config, adapter)
    out = tmp_path / "merged"
    adapterfmt.merge_to_directory(base, adapter, out)
    assert unequal(read_dir(out), peft_merged(lambda: _causal(base), [adapter]).state_dict()) == []


def test_weighted_adapters_in_fp32(tmp_path: Path) -> None:
    """Σ w_i·ΔW_i equals PEFT merging both adapters with each scaling multiplied by its weight."""
    base, first, second = TESTDATA / "tiny-llama", TESTDATA / "tiny-llama-multi", TESTDATA / "tiny-llama-multi" / "second"
    out = tmp_path / "merged"
    summary = adapterfmt.merge_to_directory(base, [first, second], out, weights=[0.7, 0.3], dtype="fp32")
    assert summary.tensors_converted > 0
    ref_model = peft_merged(lambda: _causal(base, torch.float32), [first, second], scales=[0.7, 0.3])
    ours = read_dir(out)
    assert {t.dtype for t in ours.values()} == {torch.float32}
    assert unequal(ours, ref_model.state_dict()) == []
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_dora_and_lora_on_one_module_in_fp32(tmp_path: Path) -> None:
    """PEFT takes each DoRA norm from the unmerged weight and scales the weight as it stands."""
    base, dora, lora = TESTDATA / "tiny-llama", TESTDATA / "tiny-llama-dora", TESTDATA / "tiny-llama-lora"
    out = tmp_path / "merged"
    adapterfmt.merge_to_directory(base, [dora, lora], out, dtype="fp32")
    ref_model = peft_merged(lambda: _causal(base, torch.float32), [dora, lora])
    assert unequal(read_dir(out), ref_model.state_dict()) == []


def test_trainable_tokens_replace_rows(tmp_path: Path) -> None:
    base, model = _tiny_llama(tmp_path, "base", tied=False)
    adapter = tmp_path / "adapter"
    save_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5, 3], init_lora_weights=False), adapter)
    out = tmp_path / "merged"
    adapterfmt.merge_to_directory(base, adapter, out)
    ref_model = peft_merged(lambda: _causal(base), [adapter])
    assert unequal(read_dir(out), ref_model.state_dict()) == []
    assert not torch.equal(read_dir(out)["model.embed_tokens.weight"], read_dir(base)["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype, use_dora", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_custom_module_conv2d_and_embedding(tmp_path: Path, dtype: torch.dtype, use_dora: bool) -> None:
    seeded(0)
    model = ConvEmbed().to(dtype)
    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    save_module(model, base)
    save_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv3", "conv1"], use_dora=use_dora, init_lora_weights=False), adapter)
    adapterfmt.merge_to_directory(base, adapter, out)

    def load() -> torch.nn.Module:
        fresh = ConvEmbed().to(dtype)
        fresh.load_state_dict(read_dir(base))
        return fresh

    ref = peft_merged(load, [adapter]).state_dict()
    ours = read_dir(out)
    loose = {"conv3.weight"} | ({"emb.weight"} if dtype == torch.bfloat16 else set())
    assert unequal({k: ours[k] for k in ref if k not in loose}, {k: v for k, v in ref.items() if k not in loose}) == []
    # PEFT builds the 3x3 delta with conv2d, another summation order: a few float32 ulp apart at most.
    torch.testing.assert_close(ours["conv3.weight"], ref["conv3.weight"], rtol=1e-6, atol=1e-7)
    if dtype == torch.bfloat16:
        # PEFT casts an embedding delta to bf16 before adding it (two roundings); adapterfmt adds in
        # float32 and rounds once. Each rounding moves a value by at most half a bf16 ulp (2^-8 of it),
        # so they differ by at most 2^-8 (|ours| + |peft| + |ΔW|); checked with a factor 2 to spare.
        a, b = ours["emb.weight"].float(), ref["emb.weight"].float()
        delta = a - read_dir(base)["emb.weight"].float()
        assert ((a - b).abs() <= 2.0**-7 * (a.abs() + b.abs() + delta.abs())).all()
        assert not torch.equal(a, b)  # the difference this documents is real


def test_merge_state_dict_matches_directory_and_keeps_input(tmp_path: Path) -> None:
    base, adapter = TESTDATA / "tiny-llama", TESTDATA / "tiny-llama-lora"
    state = read_dir(base)
    snapshot = {k: v.clone() for k, v in state.items()}
    merged = adapterfmt.merge_state_dict(state, adapter)
    assert unequal(state, snapshot) == []
    assert list(merged) == list(state)
    out = tmp_path / "merged"
    adapterfmt.merge_to_directory(base, adapter, out)
    assert unequal(merged, read_dir(out)) == []
    norm = "model.norm.weight"
    assert merged[norm] is state[norm]  # untouched tensors are passed through, not copied
    with safe_open(str(out / "model-00003-of-00003.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
