"""Tiny models and PEFT oracles for the loader tests (tests/test_load*.py).

Every model is built in code, seeded, in float32; nothing is downloaded. PEFT, transformers and
diffusers are test-only dependencies: they build reference adapters and reference outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

TESTDATA = Path(__file__).resolve().parent.parent / "testdata"
ATOL = 1e-6


def tiny_llama() -> nn.Module:
    """``testdata/tiny-llama`` (bf16 on disk) loaded in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TESTDATA / "tiny-llama", dtype=torch.float32)


def tiny_llama_tied() -> nn.Module:
    """``testdata/tiny-llama-tied``: lm_head tied to the input embedding, float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TESTDATA / "tiny-llama-tied", dtype=torch.float32)


def tiny_bert() -> nn.Module:
    """``testdata/tiny-bert``: BertForSequenceClassification, 3 labels, float32."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(TESTDATA / "tiny-bert").eval()


def tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 (transformers ``Conv1D`` projections), seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_sd3() -> nn.Module:
    """A one-block diffusers ``SD3Transformer2DModel`` with ``proj_out``, seeded."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def sd3_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 3, 16, generator=g),
        "pooled_projections": torch.randn(2, 16, generator=g),
        "timestep": torch.tensor([1, 500]),
    }


class ConvEmbedNet(nn.Module):
    """A plain network with every layer type LoRA wraps: Embedding, Conv1d/2d/3d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv3d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)
        self.classify = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.embed(ids).transpose(1, 2))  # (B, 6, 16)
        h = self.conv2(h.reshape(h.shape[0], 6, 4, 4))
        h = self.conv3(h.unsqueeze(2)).mean(dim=(2, 3, 4))
        return self.classify(torch.tanh(self.head(h)))


def conv_embed_net() -> nn.Module:
    torch.manual_seed(0)
    return ConvEmbedNet().eval()


def conv_embed_inputs() -> torch.Tensor:
    return torch.randint(0, 20, (3, 16), generator=torch.Generator().manual_seed(2))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class MLPStack(nn.Module):
    """``blocks.<i>.fc1/fc2`` for ``i`` in 0..12 and a ``head``: for the matching rules."""

    def __init__(self, n: int = 13) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def mlp_stack() -> nn.Module:
    torch.manual_seed(0)
    return MLPStack().eval()


def make_peft_adapter(build: Callable[[], nn.Module], out_dir: Path, seed: int = 3, **config: object) -> Path:
    """Train-free PEFT adapter: ``get_peft_model`` + random LoRA/DoRA/full-copy values + ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(), LoraConfig(**config))
    _randomize(model, seed)
    model.save_pretrained(out_dir)
    return out_dir


def make_unprefixed_adapter(build: Callable[[], nn.Module], out_dir: Path, seed: int = 3, **config: object) -> Path:
    """The diffusers way: ``inject_adapter_in_model`` + ``get_peft_model_state_dict`` (keys without prefix)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    cfg = LoraConfig(**config)
    model = inject_adapter_in_model(cfg, build())
    _randomize(model, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(out_dir))
    return out_dir


def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in name else 0.0))
            elif ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_reference(build: Callable[[], nn.Module], adapter_dir: Path, **kwargs: object) -> nn.Module:
    """``PeftModel.from_pretrained(build(), adapter_dir)``; returns the PeftModel."""
    from peft import PeftModel

    return PeftModel.from_pretrained(build(), str(adapter_dir), **kwargs)


def assert_same_structure(ours: nn.Module, peft_inner: nn.Module) -> None:
    """Same module names, same ``state_dict`` keys (in order), equal values, same requires_grad."""
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in peft_inner.named_modules()]
    a, b = ours.state_dict(), peft_inner.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    grads_a = {n for n, p in ours.named_parameters() if p.requires_grad}
    grads_b = {n for n, p in peft_inner.named_parameters() if p.requires_grad}
    assert grads_a == grads_b


def assert_outputs_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol)
