"""Shapes of LyCORIS-style factor products, from tensor shapes alone (no torch; FORMAT §10.1, §10.3).

Used where a factor module is checked against its base weight before anything is read: inspect,
check and the merge plan. The products themselves are computed by :mod:`adapterfmt.lycoris_math`.
"""

from __future__ import annotations

from math import prod
from typing import Mapping, Optional

Shape = tuple[int, ...]


def product_shape(kind: str, shapes: Mapping[str, Shape]) -> Optional[Shape]:
    """The shape of a module's product as its factors give it, ``None`` when a factor is missing.

    LoHa without Tucker cores and a LoRA / LoKr on a 1x1 conv give a 2-D shape for a 4-D weight
    (see :func:`fits`)."""
    s = shapes
    try:
        if kind == "lora":
            down, up = s["lora_down"], s["lora_up"]
            k = s["lora_mid"][2:] if "lora_mid" in s else down[2:]
            return (up[0], down[1], *k)
        if kind == "loha":
            if "hada_t1" in s:
                return (s["hada_w1_a"][1], s["hada_w1_b"][1], *s["hada_t1"][2:])
            return (s["hada_w1_a"][0], s["hada_w1_b"][1])
        if kind == "lokr":
            w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
            if "lokr_w2" in s:
                w2 = s["lokr_w2"]
            elif "lokr_t2" in s:
                w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1], *s["lokr_t2"][2:])
            else:
                w2 = (s["lokr_w2_a"][0], *s["lokr_w2_b"][1:])
            return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    except (KeyError, IndexError):
        return None
    raise ValueError(f"unknown adapter kind {kind!r}")


def fits(kind: str, shapes: Mapping[str, Shape], weight_shape: Shape) -> bool:
    """Whether the product can be added to a weight of ``weight_shape``: the same shape, or the same
    first dim and element count (a flattened conv product)."""
    p = product_shape(kind, shapes)
    if p is None:
        return False
    return tuple(p) == tuple(weight_shape) or (p[0] == weight_shape[0] and prod(p) == prod(weight_shape))
