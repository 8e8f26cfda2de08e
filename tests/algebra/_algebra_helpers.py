"""Helpers for the algebra tests: tiny PEFT adapters and PEFT's own per-module deltas.

PEFT is the oracle: ``PeftModel.from_pretrained`` loads an adapter directory and
``get_delta_weight`` gives each module's delta with PEFT's own scale (rsLoRA, patterns, DoRA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from _load_helpers import conv_embed_net, make_peft_adapter, mlp_stack  # noqa: F401


def peft_deltas(build: Callable[[], nn.Module], adapter_dir: Path, name: str = "default") -> dict[str, torch.Tensor]:
    """module path -> the delta ``scaling · B · A`` in float64 (2-D: convolution factors flattened,
    an embedding's un-transposed) from the factors and the scale PEFT loaded for every LoRA layer."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    pm = PeftModel.from_pretrained(build(), str(adapter_dir), adapter_name=name)
    out = {}
    for path, mod in pm.base_model.model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        if name in mod.lora_A:
            a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
        elif name in mod.lora_embedding_A:
            a, b = mod.lora_embedding_A[name], mod.lora_embedding_B[name]
        else:
            continue
        out[path] = (b.detach().double().flatten(1) @ a.detach().double().flatten(1)) * mod.scaling[name]
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are zero)."""
    nb = float(torch.linalg.norm(b.double()))
    d = float(torch.linalg.norm(a.double() - b.double()))
    return d / nb if nb else d


def best_rank(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of a dense delta (float64 SVD), in the delta's shape."""
    d = delta.double()
    flat = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(d.shape)


def svdvals(delta: torch.Tensor) -> torch.Tensor:
    d = delta.double()
    return torch.linalg.svdvals(d.reshape(d.shape[0], -1))
