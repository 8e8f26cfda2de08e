"""Which base modules LoRA can wrap, as which :mod:`adapterfmt.deltas.lora` layout, and in what dtype.

Decided from the module's type alone (transformers' ``Conv1D`` by duck typing, so the library never
imports transformers); the loader, the wrapper and the LoRA layers all ask here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..deltas.lora import CONV, CONV1D_TRANSPOSED, EMBEDDING, LINEAR
from ..errors import UnsupportedFeatureError

#: Adapter weights in these dtypes are kept in float32, as PEFT's ``autocast_adapter_dtype`` does.
_UPCAST_DTYPES = {torch.float16, torch.bfloat16} | {
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
}


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``(in, out)``.

    Recognised by class name and its ``nf`` attribute so the library never imports transformers.
    """
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def base_layout(module: nn.Module) -> Optional[str]:
    """The :mod:`adapterfmt.deltas.lora` layout of a module LoRA can wrap, or ``None`` if it cannot."""
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.Linear):
        return LINEAR
    if is_transformers_conv1d(module):
        return CONV1D_TRANSPOSED
    return None


def supported_layout(module: nn.Module, key: str, *, path: Optional[str] = None, hint: Optional[str] = None) -> str:
    """:func:`base_layout` of ``module`` (named ``key``), or UnsupportedFeatureError if LoRA cannot wrap it."""
    layout = base_layout(module)
    if layout is None:
        raise UnsupportedFeatureError(
            f"is a {type(module).__name__}; LoRA can wrap nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding",
            path=path,
            key=key,
            hint=hint,
        )
    return layout


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """The dtype PEFT gives adapter weights on this base: the base dtype, but float32 for 16/8-bit floats."""
    dtype = base_weight.dtype
    if dtype in _UPCAST_DTYPES or not (dtype.is_floating_point or dtype.is_complex):
        return torch.float32
    return dtype
