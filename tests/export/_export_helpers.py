"""Tiny bases and adapters built in code for the export tests: real transformers models, real PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

#: architecture -> (transformers config class name, extra config fields, LoRA target modules)
ARCHS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "llama": ("LlamaConfig", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]),
    "mistral": ("MistralConfig", {"head_dim": 16}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2": ("Qwen2Config", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gemma": ("GemmaConfig", {"head_dim": 16}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "phi3": ("Phi3Config", {"pad_token_id": 0}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def make_base(root: Path, arch: str, *, seed: int = 0) -> tuple[Path, Any]:
    """A tiny randomly initialised float32 model of ``arch`` saved at ``root/base``; returns (dir, model)."""
    import transformers

    cls_name, extra, _ = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    base = root / "base"
    model.save_pretrained(base)
    return base, model


def make_adapter(root: Path, model: Any, arch: str, name: str = "lora", *, seed: int = 1, **lora: Any) -> Path:
    """A PEFT LoRA adapter of ``model`` with random (non-zero) factors, saved at ``root/name``."""
    from peft import LoraConfig, get_peft_model

    targets = lora.pop("target_modules", ARCHS[arch][2])
    torch.manual_seed(seed)
    cfg = LoraConfig(r=lora.pop("r", 8), lora_alpha=lora.pop("lora_alpha", 16), target_modules=targets, init_lora_weights=False, **lora)
    peft_model = get_peft_model(model, cfg)
    out = root / name
    peft_model.save_pretrained(out)
    peft_model.unload()  # leave the base model as it was
    return out


def make_mixtral(root: Path, *, experts: int = 2, r: int = 4, layers: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """A Mixtral base config (config only: llama.cpp reads nothing else) and an adapter with the
    per-expert ``block_sparse_moe.experts.N.w1/w2/w3`` modules that PEFT wrote for transformers 4's
    Mixtral (the names llama.cpp's converter stacks), written with safetensors."""
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.MixtralConfig(**{**SMALL, "num_hidden_layers": layers}, num_local_experts=experts, num_experts_per_tok=2)
    cfg.architectures = ["MixtralForCausalLM"]
    base = root / "mixtral-base"
    cfg.save_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    h, i = SMALL["hidden_size"], SMALL["intermediate_size"]
    shapes = {"w1": (i, h), "w2": (h, i), "w3": (i, h)}
    for layer in range(layers):
        for x in range(experts):
            for w, (out, inp) in shapes.items():
                pre = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{x}.{w}"
                tensors[f"{pre}.lora_A.weight"] = torch.randn(r, inp, generator=g)
                tensors[f"{pre}.lora_B.weight"] = torch.randn(out, r, generator=g)
        for proj, out in (("q_proj", 64), ("k_proj", 32)):
            pre = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, h, generator=g)
            tensors[f"{pre}.lora_B.weight"] = torch.randn(out, r, generator=g)
    adapter = root / "mixtral-lora"
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    doc = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["w1", "w2", "w3", "q_proj", "k_proj"], "task_type": "CAUSAL_LM"}
    (adapter / "adapter_config.json").write_text(json.dumps(doc))
    return base, adapter


def edit_config(adapter: Path, **fields: Any) -> None:
    path = adapter / "adapter_config.json"
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


def peft_logits(base: Any, adapter: Optional[Path], ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``base`` (a model directory) with ``adapter`` loaded by PEFT (none: the base alone), float32."""
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(ids).logits
