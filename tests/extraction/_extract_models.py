"""The fine-tune every extraction test uses: a tiny Llama whose attention got a rank-3 update, whose
MLP got a dense one, one bias and the final norm changed; the rest byte-equal to the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel

LOW_RANK = ("q_proj", "k_proj", "v_proj", "o_proj")  # fine-tuned by a rank-3 update
FULL_RANK = ("gate_proj", "up_proj", "down_proj")  # fine-tuned everywhere


def _config(**kw: object) -> transformers.LlamaConfig:
    args = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, attention_bias=True)
    args.update(kw)
    return transformers.LlamaConfig(**args)


def make_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config())
    model.save_pretrained(str(tmp / "base"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 2)[-2]
            if name.endswith("weight") and module in LOW_RANK:
                p.add_(torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1], generator=g) * 0.02)
            elif name.endswith("weight") and module in FULL_RANK:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
            elif name.endswith("q_proj.bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif name == "model.norm.weight":
                p.add_(0.25)
    model.save_pretrained(str(tmp / "tuned"))
    return tmp / "base", tmp / "tuned"


def _load(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _peft_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(_load(base), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}




def make_noisy_models(tmp_path_factory: pytest.TempPathFactory, signal_rank: int = 24, noise: float = 0.05) -> tuple[Path, Path]:
    """A bf16 small Llama (hidden 128) whose every linear got a full fine-tune's spectrum: a
    rank-``signal_rank`` update (wider than a rank-4 sketch) plus dense noise at ``noise`` of its
    norm (bench/extract_verify.py's fine-tune, small)."""
    tmp = tmp_path_factory.mktemp("extract-noisy")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(attention_bias=False, hidden_size=128, intermediate_size=192)).to(torch.bfloat16)
    model.save_pretrained(str(tmp / "base"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                m, n = p.shape
                low = torch.randn(m, signal_rank, generator=g) @ torch.randn(signal_rank, n, generator=g) * 0.01
                dense = torch.randn(m, n, generator=g)
                dense *= noise * low.norm() / dense.norm()
                p.add_((low + dense).to(p.dtype))
    model.save_pretrained(str(tmp / "tuned"))
    return tmp / "base", tmp / "tuned"
