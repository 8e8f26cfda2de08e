"""The base of every wrapper that holds a ``base_layer`` (LoRA, AdaLoRA, LoHa / LoKr layers), and
the containers every PEFT ``LoraLayer`` registers.

A wrapped ``nn.Linear`` must still read as one: ``layer.weight``, ``layer.bias``,
``layer.in_features`` come from ``base_layer``, as in PEFT's ``BaseTunerLayer``.

PEFT's ``LoraLayer.__init__`` registers ``lora_dropout``, ``lora_A``, ``lora_B``,
``lora_embedding_A``, ``lora_embedding_B`` and ``lora_magnitude_vector`` on every layer built on it
(``lora.Linear`` ..., ``ParamWrapper``, AdaLoRA's ``SVDLinear``), used or not, so they are in
``named_modules()``: :func:`register_lora_containers` is the one place adapterfmt's wrappers of
those classes get them, in PEFT's order. This module imports torch only.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


class BaseLayerWrapper(nn.Module):
    """An ``nn.Module`` whose missing attributes are read from its ``base_layer`` child."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "base_layer" or "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)


def register_lora_containers(module: nn.Module) -> None:
    """Register PEFT's ``LoraLayer`` containers on ``module``, empty, in PEFT's order (after ``base_layer``).

    A subclass that keeps ``lora_A`` / ``lora_B`` in ParameterDicts (AdaLoRA) reassigns them
    afterwards: the position in ``named_modules()`` stays, as in PEFT.
    """
    module.lora_dropout = nn.ModuleDict()
    module.lora_A = nn.ModuleDict()
    module.lora_B = nn.ModuleDict()
    module.lora_embedding_A = nn.ParameterDict()
    module.lora_embedding_B = nn.ParameterDict()
    module.lora_magnitude_vector = nn.ModuleDict()


def dropout_module(p: float) -> nn.Module:
    """``lora_dropout[adapter]`` as PEFT builds it: ``nn.Dropout(p)``, or ``nn.Identity`` for 0."""
    return nn.Dropout(p=p) if p > 0.0 else nn.Identity()


__all__ = ["BaseLayerWrapper", "dropout_module", "register_lora_containers"]
