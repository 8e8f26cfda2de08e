"""Quantized bases, recognised from ``config.json`` or from the tensors, and refused in one line.

A LoRA delta is added to full-precision weights; a quantized weight is packed integers (GPTQ, AWQ,
bitsandbytes), 8-bit floats with scales (fp8) or a compressed layout, so its shape and values are
not the layer's. Merging there would be wrong (or fail on shapes with a misleading message), so
adapterfmt names the method and the fix: merge into the unquantized base, then quantize.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..errors import UnsupportedFeatureError
from ..storage.header import TensorInfo

#: Tensor-name endings that only quantized checkpoints have -> the method they show.
_QUANT_SUFFIXES = (
    (".qweight", "GPTQ/AWQ (packed qweight)"),
    (".qzeros", "GPTQ/AWQ (packed qweight)"),
    (".SCB", "bitsandbytes 8-bit"),
    (".weight_format", "bitsandbytes 8-bit"),
    (".absmax", "bitsandbytes 4-bit"),
    (".quant_map", "bitsandbytes 4-bit"),
    (".quant_state.bitsandbytes__nf4", "bitsandbytes 4-bit"),
    (".quant_state.bitsandbytes__fp4", "bitsandbytes 4-bit"),
    (".weight_packed", "compressed-tensors (packed)"),
    (".weight_scale_inv", "fp8"),
    (".weight_scale", "fp8"),
)
_LOW_PRECISION = {"F8_E5M2": "fp8", "F8_E4M3": "fp8", "F8_E8M0": "fp8", "F8_E4M3FNUZ": "fp8", "F8_E5M2FNUZ": "fp8",
                  "F4": "fp4", "F6_E2M3": "fp6", "F6_E3M2": "fp6"}


def quantization_method(config: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> Optional[str]:
    """The quantization method of a base, or None when its weights are plain floats.

    From ``quantization_config.quant_method`` (top level or ``text_config``; for bitsandbytes
    with the bit width), the older ``compression_config``, or else the tensors: names only
    quantized checkpoints have, or 8/6/4-bit float ``.weight`` dtypes.
    """
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, Mapping):
            continue
        q = cfg.get("quantization_config")
        if isinstance(q, Mapping) and q:
            method = str(q.get("quant_method") or "unknown method")
            if method == "bitsandbytes":
                bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else ""
                method = f"bitsandbytes {bits}".strip()
            return method
        if isinstance(cfg.get("compression_config"), Mapping) and cfg["compression_config"]:
            return "compressed-tensors"
    for key, info in tensors.items():
        for suffix, method in _QUANT_SUFFIXES:
            if key.endswith(suffix):
                return method
        if key.endswith(".weight") and info.dtype in _LOW_PRECISION:
            return f"{_LOW_PRECISION[info.dtype]} ({info.dtype} weights)"
    return None


def refuse_quantized(config: Mapping[str, Any], tensors: Mapping[str, TensorInfo], *, path: str) -> None:
    """Raise when the base is quantized.

    Raises:
        UnsupportedFeatureError: naming the method and the fix.
    """
    method = quantization_method(config, tensors)
    if method is not None:
        raise UnsupportedFeatureError(
            f"is a quantized base ({method}); LoRA merges and checks need the full-precision weights",
            path=path,
            hint="merge into the unquantized base model, then quantize the merged model",
        )


__all__ = ["quantization_method", "refuse_quantized"]
