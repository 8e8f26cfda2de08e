"""The base of every wrapper that holds a ``base_layer`` (LoRA, AdaLoRA, LoHa / LoKr layers).

A wrapped ``nn.Linear`` must still read as one: ``layer.weight``, ``layer.bias``,
``layer.in_features`` come from ``base_layer``, as in PEFT's ``BaseTunerLayer``. This module
imports torch only.
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


__all__ = ["BaseLayerWrapper"]
