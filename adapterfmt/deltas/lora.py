"""LoRA merge math on tensors: the one implementation used by the merge engine and the loader.

Follows PEFT's order of operations so results are bit-identical where PEFT rounds once
(docs/FORMAT.md §6): the delta is ``(B @ A) * scaling`` computed in float32 from the adapter
tensors, added to the base weight in float32, and the sum is rounded once to the output dtype.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Layouts (see :mod:`adapterfmt.base.resolution`).
LINEAR = "linear"
CONV1D_TRANSPOSED = "conv1d-transposed"  # transformers Conv1D: weight stored (in, out)
CONV = "conv"
EMBEDDING = "embedding"


def lora_product(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    layout: str,
    weight_shape: "tuple[int, ...] | torch.Size",
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``B @ A`` in float32, shaped like the base weight: :func:`lora_delta` before the scaling.

    ``out``: a contiguous float32 buffer of at least ``prod(weight_shape)`` elements to compute
    into (the result is a view of it); it spares a caller merging many large tensors the
    allocation and its page faults. The matmul is the same call either way, so are the bits.
    """
    a = lora_a.float()
    b = lora_b.float()
    if layout not in (LINEAR, CONV1D_TRANSPOSED, EMBEDDING, CONV):
        raise ValueError(f"unknown layout {layout!r}")
    if layout == CONV:
        b, a = b.flatten(1), a.flatten(1)
    buffer = None if out is None else out.reshape(-1)[: b.shape[0] * a.shape[1]].view(b.shape[0], a.shape[1])
    product = torch.matmul(b, a, out=buffer)
    if layout == CONV:
        product = product.reshape(weight_shape)
    elif layout != LINEAR:
        product = product.T
    if tuple(product.shape) != tuple(weight_shape):
        raise ValueError(f"delta shape {tuple(product.shape)} does not match weight shape {tuple(weight_shape)}")
    return product


def lora_delta(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    layout: str,
    weight_shape: "tuple[int, ...] | torch.Size",
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The dense float32 delta ``ΔW`` of one LoRA module, shaped like the base weight.

    Args:
        lora_a: ``lora_A`` (``(r, in)``; conv ``(r, in, *k)``; embedding ``lora_embedding_A`` ``(r, V)``).
        lora_b: ``lora_B`` (``(out, r)``; conv ``(out, r, 1, ...)``; embedding ``(D, r)``).
        scaling: ``alpha / r`` or ``alpha / sqrt(r)``.
        layout: one of ``linear``, ``conv1d-transposed``, ``conv``, ``embedding``.
        weight_shape: the base weight's shape.
        out: a float32 buffer to compute into, see :func:`lora_product`.
    """
    return lora_product(lora_a, lora_b, layout, weight_shape, out=out).mul_(scaling)


def add_scaled(acc: torch.Tensor, product: torch.Tensor, scaling: float, *, first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``acc + product · scaling`` in float32, in place on ``acc``, as ``acc + lora_delta(...)`` rounds.

    The product is scaled (one rounding) before the add (another), exactly as PEFT's
    ``W += (B @ A) * s``. With ``first`` (the base weight rows), ``acc`` is only a buffer:
    ``first + product · scaling`` is written into it, which saves a pass over memory.
    """
    if first is not None:
        return torch.mul(product, scaling, out=acc).add_(first)
    return acc.add_(product * scaling)


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
