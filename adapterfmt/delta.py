"""LoRA merge math on tensors: the one implementation used by the merge engine and the loader.

Follows PEFT's order of operations so results are bit-identical where PEFT rounds once
(docs/FORMAT.md §6): the delta is ``(B @ A) * scaling`` computed in float32 from the adapter
tensors, added to the base weight in float32, and the sum is rounded once to the output dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Layouts (see :mod:`adapterfmt.resolve`).
LINEAR = "linear"
CONV1D_TRANSPOSED = "conv1d-transposed"  # transformers Conv1D: weight stored (in, out)
CONV = "conv"
EMBEDDING = "embedding"


def lora_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, layout: str, weight_shape: "tuple[int, ...] | torch.Size"
) -> torch.Tensor:
    """The dense float32 delta ``ΔW`` of one LoRA module, shaped like the base weight.

    Args:
        lora_a: ``lora_A`` (``(r, in)``; conv ``(r, in, *k)``; embedding ``lora_embedding_A`` ``(r, V)``).
        lora_b: ``lora_B`` (``(out, r)``; conv ``(out, r, 1, ...)``; embedding ``(D, r)``).
        scaling: ``alpha / r`` or ``alpha / sqrt(r)``.
        layout: one of ``linear``, ``conv1d-transposed``, ``conv``, ``embedding``.
        weight_shape: the base weight's shape.
    """
    a = lora_a.float()
    b = lora_b.float()
    if layout == LINEAR:
        delta = (b @ a) * scaling
    elif layout in (CONV1D_TRANSPOSED, EMBEDDING):
        delta = (b @ a).T * scaling
    elif layout == CONV:
        delta = (b.flatten(1) @ a.flatten(1)).reshape(weight_shape) * scaling
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if tuple(delta.shape) != tuple(weight_shape):
        raise ValueError(f"delta shape {tuple(delta.shape)} does not match weight shape {tuple(weight_shape)}")
    return delta


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, layout: str, *, onto: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """DoRA's merged weight in float32: ``(m / ‖W + ΔW‖) ⊙ (W + ΔW)``, the norm per output unit.

    Linear: one norm per output row (over the input dim); Conv1D weights are viewed in
    ``(out, in)`` layout; embedding: one norm per embedding column (over the vocab); conv: one
    per output channel. ``magnitude`` is ``lora_magnitude_vector`` as saved.

    ``onto``: the weight the factor is applied to, ``(m / ‖W + ΔW‖) ⊙ (onto + ΔW)``, when it
    differs from ``weight`` — PEFT merging several adapters in turn takes the norm from the
    unmerged base weight but scales the weight that already holds the earlier adapters.
    """
    onto = weight if onto is None else onto
    if layout == EMBEDDING:
        v = weight.float() + delta
        norm = torch.linalg.norm(v, dim=0, keepdim=True)  # (1, D)
        target = v if onto is weight else onto.float() + delta
        return target * (magnitude.float().view(1, -1) / norm)
    if layout in (LINEAR, CONV1D_TRANSPOSED):
        w = weight.T if layout == CONV1D_TRANSPOSED else weight
        d = delta.T if layout == CONV1D_TRANSPOSED else delta
        norm = torch.linalg.norm(w + 1 * d, dim=1).to(torch.promote_types(w.dtype, d.dtype))
        factor = (magnitude / norm).view(-1, 1)
        o = onto.T if layout == CONV1D_TRANSPOSED else onto
        merged = factor * (o + d)
        return merged.T if layout == CONV1D_TRANSPOSED else merged
    if layout == CONV:
        v = weight + 1 * delta
        norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True).transpose(1, 0)
        factor = magnitude / norm
        return factor.view(-1, *[1] * (v.dim() - 1)) * (onto + delta)
    raise ValueError(f"unknown layout {layout!r}")


def merged_weight(
    weight: torch.Tensor,
    deltas: "list[torch.Tensor]",
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``W + ΣΔ`` with the sum in float32 and one rounding to ``out_dtype`` (default: ``weight``'s)."""
    acc = weight.float()
    for d in deltas:
        acc = acc + d
    return acc.to(out_dtype or weight.dtype)
