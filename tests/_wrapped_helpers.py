"""Wrapped checkpoints for the wrapped-checkpoint tests, made with real PEFT ``state_dict()``.

Models are tiny and seeded; PEFT's zero ``lora_B`` is replaced by random values and trained
copies are perturbed, so every converted or merged result differs from the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def randomize(peft_model: nn.Module, seed: int, *, freeze_copy: Optional[str] = None) -> None:
    """Give every adapter tensor non-trivial values; leave the copies of adapter ``freeze_copy`` untouched."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "magnitude" in name else 0.0))
            elif ".modules_to_save." in name and (freeze_copy is None or f".modules_to_save.{freeze_copy}." not in name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def tiny_llama(seed: int = 0):
    """A base ``LlamaForCausalLM`` and a clone of its state dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def llama_two_adapters(seed: int = 0, *, freeze_copy: Optional[str] = None):
    """``PeftModel`` on a tiny Llama: ``default`` (LoRA q,k,v,o with a rank pattern, lm_head full
    copy) and ``other`` (DoRA on o_proj/down_proj, lm_head full copy). Returns (peft_model, base_sd)."""
    from peft import LoraConfig, get_peft_model

    model, base_sd = tiny_llama(seed)
    pm = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], rank_pattern={"v_proj": 2},
                   modules_to_save=["lm_head"]),
    )
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["o_proj", "down_proj"], use_dora=True,
                                       modules_to_save=["lm_head"]))
    randomize(pm, seed + 1, freeze_copy=freeze_copy)
    return pm.eval(), base_sd


class Custom(nn.Module):
    """Embedding, Conv2d and Linear targets plus a nested container saved in full (``head``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (B, T, 8)
        x = x + self.conv(x.unsqueeze(1)).mean(1)
        return self.head(torch.relu(self.proj(x)))


def custom_peft(seed: int = 0):
    """``PeftModel`` on :class:`Custom`: LoRA r=3 on emb, conv (r=2) and proj; ``head`` saved in full."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = Custom().eval()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    pm = get_peft_model(
        model, LoraConfig(r=3, lora_alpha=5, target_modules=["emb", "conv", "proj"], rank_pattern={"conv": 2},
                          modules_to_save=["head"])
    )
    randomize(pm, seed + 1)
    return pm.eval(), base_sd


def state_dict_of(peft_model: nn.Module, *, prefix: bool = True) -> dict[str, torch.Tensor]:
    """The model's ``state_dict()`` ready for ``save_file`` (clones break shared storage)."""
    sd = {k: v.detach().clone().contiguous() for k, v in peft_model.state_dict().items()}
    if not prefix:
        sd = {k[len("base_model.model."):]: v for k, v in sd.items()}
    return sd


def save_wrapped(peft_model: nn.Module, directory: Path, *, shards: bool = False, prefix: bool = True,
                 pickle: bool = False, model_config: Optional[dict] = None) -> Path:
    """Save ``peft_model.state_dict()`` under ``directory`` as ``model.safetensors``, as shards with
    ``model.safetensors.index.json`` (``shards=True``), or as ``torch.save`` ``pytorch_model.bin``.
    Returns the directory (or the file for a single file)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    sd = state_dict_of(peft_model, prefix=prefix)
    if model_config is not None:
        (directory / "config.json").write_text(json.dumps(model_config))
    if pickle:
        torch.save(sd, directory / "pytorch_model.bin")
        return directory / "pytorch_model.bin"
    if not shards:
        save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory / "model.safetensors"
    split = split_torch_state_dict_into_shards(sd, max_shard_size=8000)
    assert split.is_sharded
    for name, keys in split.filename_to_tensors.items():
        save_file({k: sd[k] for k in keys}, str(directory / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": split.tensor_to_filename}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out
