"""The architecture matrix: tiny transformers models of many model types, each with a PEFT adapter
that changes its outputs (tests/tables/test_architectures.py).

Every model is built from a tiny seeded config (hidden size 16, one or two layers) and saved with
``save_pretrained``, so the base on disk has the checkpoint names transformers 5 writes (ViT's
``encoder.layer.N.attention.attention.query``, GPT-NeoX's ``embed_out``, Mixtral's per-expert
``block_sparse_moe.experts.N.w1``), while the adapter uses the in-memory names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

V, H = 64, 16  # vocabulary, hidden size


@dataclass
class Case:
    """One model type: how to build it, which auto class loads it, what the adapter targets."""

    name: str
    config: Callable[[], Any]
    auto: str  #: transformers auto class that loads the saved base
    lora: dict[str, Any]
    inputs: str = "ids"  #: ids | seq2seq | image | audio
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _t():
    import transformers

    return transformers


def _dec(cls: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        base = dict(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)
        base.update(kw)
        return getattr(_t(), cls)(**base)

    return make


def _cfg(cls: str, **kw: Any) -> Callable[[], Any]:
    return lambda: getattr(_t(), cls)(**kw)


CASES = [
    Case("llama-tied-head", _dec("LlamaConfig", num_key_value_heads=1, tie_word_embeddings=True), "AutoModelForCausalLM",
         dict(target_modules=["q_proj", "v_proj", "lm_head"])),
    Case("qwen2", _dec("Qwen2Config", num_key_value_heads=1), "AutoModelForCausalLM", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    Case("qwen3", _dec("Qwen3Config", num_key_value_heads=1, head_dim=8), "AutoModelForCausalLM", dict(target_modules=["q_proj", "o_proj"])),
    Case("mistral", _dec("MistralConfig", num_key_value_heads=1), "AutoModelForCausalLM", dict(target_modules=["q_proj", "gate_proj"])),
    Case("gemma-tied-head", _dec("GemmaConfig", num_key_value_heads=1, head_dim=8), "AutoModelForCausalLM",
         dict(target_modules=["q_proj", "up_proj", "lm_head"])),
    Case("phi3", _dec("Phi3Config", num_key_value_heads=2, pad_token_id=0), "AutoModelForCausalLM", dict(target_modules=["qkv_proj", "gate_up_proj"])),
    Case("gpt-neox-embed-out", _dec("GPTNeoXConfig"), "AutoModelForCausalLM", dict(target_modules=["query_key_value", "lm_head"])),
    Case("opt-tied-head", _cfg("OPTConfig", vocab_size=V, hidden_size=H, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                                 word_embed_proj_dim=H, max_position_embeddings=32), "AutoModelForCausalLM",
         dict(target_modules=["q_proj", "v_proj", "lm_head"])),
    Case("bloom", _cfg("BloomConfig", vocab_size=V, hidden_size=H, n_layer=1, n_head=2), "AutoModelForCausalLM",
         dict(target_modules=["query_key_value", "dense_4h_to_h"])),
    Case("falcon", _cfg("FalconConfig", vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2), "AutoModelForCausalLM",
         dict(target_modules=["query_key_value", "dense"])),
    Case("gpt2-conv1d", _cfg("GPT2Config", vocab_size=V, n_positions=32, n_embd=H, n_layer=1, n_head=2), "AutoModelForCausalLM",
         dict(target_modules=["c_attn", "c_fc"])),
    Case("phi", _dec("PhiConfig"), "AutoModelForCausalLM", dict(target_modules=["q_proj", "dense", "fc1"])),
    Case("starcoder2", _dec("Starcoder2Config", num_key_value_heads=1), "AutoModelForCausalLM", dict(target_modules=["q_proj", "c_fc"])),
    Case("mixtral", _dec("MixtralConfig", num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2), "AutoModelForCausalLM",
         dict(target_modules=["q_proj", "o_proj"]), notes="mlp.* in memory is block_sparse_moe.* on disk, experts fused in memory"),
    Case("t5", _cfg("T5Config", vocab_size=V, d_model=H, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                    decoder_start_token_id=0), "AutoModelForSeq2SeqLM", dict(target_modules=["q", "v", "wo", "lm_head"]), inputs="seq2seq",
         notes="lm_head and the encoder/decoder embed_tokens share `shared`; T5's config reads tie_word_embeddings as output scaling"),
    Case("bart", _cfg("BartConfig", vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32), "AutoModelForSeq2SeqLM",
         dict(target_modules=["q_proj", "v_proj", "fc1", "lm_head"]), inputs="seq2seq"),
    Case("whisper", _cfg("WhisperConfig", vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8,
                         max_target_positions=16, decoder_start_token_id=1, pad_token_id=0), "AutoModelForSpeechSeq2Seq",
         dict(target_modules=["q_proj", "v_proj"]), inputs="audio"),
    Case("bert-classifier", _cfg("BertConfig", vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 max_position_embeddings=32, num_labels=3), "AutoModelForSequenceClassification",
         dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    Case("roberta-classifier", _cfg("RobertaConfig", vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=40, num_labels=3), "AutoModelForSequenceClassification",
         dict(target_modules=["query", "value", "dense"], modules_to_save=["classifier"])),
    Case("deberta-v2", _cfg("DebertaV2Config", vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=32, num_labels=3), "AutoModelForSequenceClassification",
         dict(target_modules=["query_proj", "value_proj"], modules_to_save=["classifier", "pooler"])),
    Case("vit-renamed", _cfg("ViTConfig", hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
                             patch_size=4, num_labels=3), "AutoModelForImageClassification",
         dict(target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["classifier"]), inputs="image",
         notes="in-memory vit.layers.N.attention.q_proj is vit.encoder.layer.N.attention.attention.query on disk"),
    Case("llama-untied-embedding", _dec("LlamaConfig", num_key_value_heads=1, tie_word_embeddings=False), "AutoModelForCausalLM",
         dict(target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])),
]


#: MoE models whose adapter uses ``target_parameters`` (LoRA on fused 3-D expert weights, and on the
#: router's parameter): refused by merge and load with one clear error (tests/tables/test_architectures.py).
TARGET_PARAMETER_CASES = [
    Case("qwen3-moe-experts", _dec("Qwen3MoeConfig", num_key_value_heads=1, moe_intermediate_size=8, num_experts=3, num_experts_per_tok=2),
         "AutoModelForCausalLM", dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
    Case("mixtral-router", _dec("MixtralConfig", num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2), "AutoModelForCausalLM",
         dict(target_modules=["q_proj", "gate"])),
]


def inputs_for(case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, V, (1, 6), generator=g)
    if case.inputs == "ids":
        return {"input_ids": ids}
    if case.inputs == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, V, (1, 4), generator=g)}
    if case.inputs == "image":
        return {"pixel_values": torch.randn(1, 3, 8, 8, generator=g)}
    if case.inputs == "audio":
        return {"input_features": torch.randn(1, 8, 16, generator=g), "decoder_input_ids": torch.randint(2, V, (1, 4), generator=g)}
    raise AssertionError(case.inputs)


def load_base(case: Case, path: Path) -> torch.nn.Module:
    return getattr(_t(), case.auto).from_pretrained(str(path)).eval()


def output_of(model: torch.nn.Module, case: Case) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs_for(case)).logits


@dataclass
class Built:
    case: Case
    base: Path
    adapter: Path


def build(case: Case, root: Path) -> Built:
    """Save the tiny base (transformers' save_pretrained) and a PEFT adapter with random B and changed full copies."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = getattr(_t(), case.auto.replace("AutoModel", "AutoModel")).from_config(case.config()).eval()
    base = root / case.name / "base"
    model.save_pretrained(str(base))
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **case.lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.5)
    adapter = root / case.name / "adapter"
    peft_model.save_pretrained(str(adapter))
    return Built(case, base, adapter)
