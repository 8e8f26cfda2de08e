"""AdaLoRA in memory (PEFT's ``SVDLinear``; FORMAT.md §3.10), for :func:`adapterfmt.load`.

Names as PEFT's: ``X.base_layer.weight``, the containers of every PEFT ``LoraLayer``
(:func:`~adapterfmt.layers.base_layer.register_lora_containers`: ``lora_dropout.<adp>`` and the
empty ``lora_embedding_A`` / ``lora_embedding_B`` / ``lora_magnitude_vector``), ParameterDict entries ``X.lora_A.<adp>`` ``(r, in)``,
``X.lora_B.<adp>`` ``(out, r)``, ``X.lora_E.<adp>`` ``(r, 1)`` (trainable) and
``X.ranknum.<adp>`` ``(1,)`` (frozen, the rank). Forward adds
``(x @ (A ⊙ E)ᵀ @ Bᵀ) · α / (ranknum + 1e-5)`` to the base output, as PEFT computes it. Linear
layers only (AdaLoRA's budget allocation targets them). This module imports torch only.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .base_layer import BaseLayerWrapper, dropout_module, register_lora_containers


class AdaLoraLinear(BaseLayerWrapper):
    """An ``nn.Linear`` with AdaLoRA adapters."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        register_lora_containers(self)
        self.lora_E = nn.ParameterDict({})
        self.lora_A = nn.ParameterDict({})  # replaces LoraLayer's ModuleDict in place, as PEFT's SVDLinear does
        self.lora_B = nn.ParameterDict({})
        self.ranknum = nn.ParameterDict({})
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, rank: int, lora_alpha: float, *, dtype: torch.dtype, dropout: float = 0.0) -> None:
        """Empty factors for adapter ``name`` (values set by the loader); PEFT's scaling is α, or r when α is 0."""
        out_f, in_f = self.base_layer.weight.shape
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Parameter(torch.zeros(rank, in_f, dtype=dtype, device=device), requires_grad=False)
        self.lora_B[name] = nn.Parameter(torch.zeros(out_f, rank, dtype=dtype, device=device), requires_grad=False)
        self.lora_E[name] = nn.Parameter(torch.zeros(rank, 1, dtype=dtype, device=device), requires_grad=False)
        self.ranknum[name] = nn.Parameter(torch.full((1,), float(rank), dtype=dtype, device=device), requires_grad=False)
        self.scaling[name] = lora_alpha if lora_alpha > 0 else float(rank)
        self.lora_dropout[name] = dropout_module(dropout)

    def delete_adapter(self, name: str) -> None:
        for d in (self.lora_dropout, self.lora_A, self.lora_B, self.lora_E, self.ranknum):
            d.pop(name, None)
        self.scaling.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name], self.lora_B[name], self.lora_E[name]] if name in self.lora_A else []

    def delta_weight(self, name: str) -> torch.Tensor:
        """``B @ (A ⊙ E) · α / (ranknum + 1e-5)``, shaped like the base weight."""
        return self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self.scaling[name] / (self.ranknum[name] + 1e-5)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            h = self.lora_dropout[name](x.to(a.dtype))
            result = result + ((h @ (a * e).T @ b.T) * self.scaling[name] / (self.ranknum[name] + 1e-5)).to(result.dtype)
        return result

    def merge(self, names: Optional[Sequence[str]] = None) -> None:
        with torch.no_grad():
            for name in names if names is not None else self.active_adapters:
                if name in self.lora_A and name not in self.merged_adapters:
                    self.weight.data += self.delta_weight(name).to(self.weight.dtype)
                    self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged_adapters:
                self.weight.data -= self.delta_weight(self.merged_adapters.pop()).to(self.weight.dtype)


__all__ = ["AdaLoraLinear"]
