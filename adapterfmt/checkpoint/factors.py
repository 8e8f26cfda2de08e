"""Shapes of LyCORIS-style factor products, from tensor shapes alone (no torch; FORMAT §10.1, §10.3).

Used where a factor module is checked against its base weight before anything is read: inspect,
check and the merge plan. The products themselves are computed by :mod:`adapterfmt.deltas.lycoris`.
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
    if kind == "diff":  # ComfyUI's whole-weight delta: its own shape (None: a bias delta only)
        return tuple(s["diff"]) if "diff" in s else None
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


def inner_mismatch(kind: str, shapes: Mapping[str, Shape]) -> Optional[str]:
    """Why the factors cannot be multiplied together (their shared rank dims differ), or ``None``.

    ``shapes`` must hold every factor the kind needs (see :func:`product_shape`)."""
    s = {k: tuple(v) for k, v in shapes.items()}
    if kind == "diff":
        return None

    def pair(left: str, left_dim: "int | slice", right: str, right_dim: int) -> Optional[str]:
        a = s[left][left_dim] if isinstance(left_dim, int) else prod(s[left][left_dim])
        b = s[right][right_dim]
        return None if a == b else f"{left} {list(s[left])} and {right} {list(s[right])} disagree on the rank ({a} vs {b})"

    try:
        if kind == "lora":
            if "lora_mid" in s:
                return pair("lora_up", slice(1, None), "lora_mid", 0) or pair("lora_down", 0, "lora_mid", 1)
            return pair("lora_up", slice(1, None), "lora_down", 0)
        if kind == "loha":
            if "hada_t1" in s:
                return (pair("hada_w1_a", 0, "hada_t1", 0) or pair("hada_w1_b", 0, "hada_t1", 1)
                        or pair("hada_w2_a", 0, "hada_t2", 0) or pair("hada_w2_b", 0, "hada_t2", 1))
            return pair("hada_w1_a", 1, "hada_w1_b", 0) or pair("hada_w2_a", 1, "hada_w2_b", 0)
        if kind == "lokr":
            out = pair("lokr_w1_a", 1, "lokr_w1_b", 0) if "lokr_w1" not in s else None
            if out or "lokr_w2" in s:
                return out
            if "lokr_t2" in s:
                return pair("lokr_w2_a", 0, "lokr_t2", 0) or pair("lokr_w2_b", 0, "lokr_t2", 1)
            return pair("lokr_w2_a", 1, "lokr_w2_b", 0)
    except (KeyError, IndexError):
        return "a factor has too few dimensions"
    return None


def fits(kind: str, shapes: Mapping[str, Shape], weight_shape: Shape) -> bool:
    """Whether the product can be added to a weight of ``weight_shape``: the same shape, or the same
    first dim and element count (a flattened conv product)."""
    if kind == "diff":  # added as it is: exactly the weight's shape (a bias delta alone adds nothing to it)
        return "diff" not in shapes or tuple(shapes["diff"]) == tuple(weight_shape)
    p = product_shape(kind, shapes)
    if p is None:
        return False
    return tuple(p) == tuple(weight_shape) or (p[0] == weight_shape[0] and prod(p) == prod(weight_shape))
