"""The dense delta of a LoRA / LoCon, LoHa or LoKr module: one implementation for merge and load.

Shared by kohya / LyCORIS files and PEFT's own LOHA / LOKR adapters, which use the same tensor
names and shapes (docs/FORMAT.md §10.3). Every product is computed in float32 (float64 factors
stay float64) and shaped like the base weight; ``scaling`` is applied once, last (LyCORIS 4.1.3's ``merge_to`` applies it twice;
its forward pass, which these functions match, applies it once).

* LoRA: ``up @ down``; with a Tucker core ``mid`` (LoCon): ``mid ×₀ up ×₁ down``.
* LoHa: ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; with Tucker cores ``t1``/``t2`` each factor is
  ``t ×₀ w_a ×₁ w_b`` (``w_a`` ``(r, out)``, ``w_b`` ``(r, in)``).
* LoKr: ``kron(w1, w2)`` with ``w1 = w1_a @ w1_b`` when factored and ``w2 = w2_a @ w2_b``
  (conv: ``w2_b`` ``(r, d, *k)``) or ``t2 ×₀ w2_a ×₁ w2_b`` with a Tucker core.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

LORA, LOHA, LOKR, DIFF = "lora", "loha", "lokr", "diff"


def _f(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 when it is float64 (a float64 model keeps its precision)."""
    return t if t.dtype == torch.float64 else t.float()


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, *, b_first: bool = False) -> torch.Tensor:
    """``core`` (r, r, *k) contracted with ``wa`` (r, p) on dim 0 and ``wb`` (r, q) on dim 1 -> (p, q, *k).

    The contraction order is PEFT's (``wb`` first for LoHa, ``wa`` first for LoKr), so a loaded
    PEFT adapter computes PEFT's bits, not just its values."""
    if b_first:
        return torch.einsum("i j ..., j q, i p -> p q ...", core, wb, wa)
    return torch.einsum("i j ..., i p, j q -> p q ...", core, wa, wb)


def lora_product(down: torch.Tensor, up: torch.Tensor, mid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``up @ down`` (kohya's names for B and A), ``(out, in, *k)``, unscaled."""
    down, up = _f(down), _f(up)
    if mid is None:
        k = down.shape[2:]
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], down.shape[1], *k)
    mid = _f(mid)
    return _tucker(mid, up.reshape(up.shape[0], -1).T, down.reshape(down.shape[0], -1))


def loha_product(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
    t1: Optional[torch.Tensor] = None, t2: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The Hadamard product of the two low-rank factors, unscaled (flattened for conv without cores)."""
    w1_a, w1_b, w2_a, w2_b = (_f(t) for t in (w1_a, w1_b, w2_a, w2_b))
    if t1 is not None and t2 is not None:
        return _tucker(_f(t1), w1_a, w1_b, b_first=True) * _tucker(_f(t2), w2_a, w2_b, b_first=True)
    return (w1_a @ w1_b) * (w2_a @ w2_b)


def lokr_product(
    w1: Optional[torch.Tensor] = None, w1_a: Optional[torch.Tensor] = None, w1_b: Optional[torch.Tensor] = None,
    w2: Optional[torch.Tensor] = None, w2_a: Optional[torch.Tensor] = None, w2_b: Optional[torch.Tensor] = None,
    t2: Optional[torch.Tensor] = None,
    *,
    peft_kron: bool = False,
) -> torch.Tensor:
    """``kron(w1, w2)``, each half rebuilt from its factors first, unscaled.

    ``peft_kron``: PEFT's convention (a PEFT LOKR adapter). It differs from LyCORIS's only for a
    3-D ``w2`` (a Conv1d with a full ``lokr_w2``): PEFT's ``kron`` then pads ``w1`` in front, giving
    another element order once reshaped to the weight, and PEFT's outputs are what that gives."""
    if w1 is None:
        if w1_a is None or w1_b is None:
            raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        w1 = _f(w1_a) @ _f(w1_b)
    if w2 is None:
        if w2_a is None or w2_b is None:
            raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        if t2 is not None:
            w2 = _tucker(_f(t2), _f(w2_a), _f(w2_b))
        else:
            r, d, *k = w2_b.shape
            w2 = (_f(w2_a) @ _f(w2_b).reshape(r, -1)).reshape(-1, d, *k)
    w1, w2 = _f(w1), _f(w2)
    if peft_kron:  # PEFT's make_kron: w1 gains trailing axes for a 4-D w2 only (torch.kron pads a 3-D one in front)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
    else:  # LyCORIS: w1 gains one trailing axis per extra axis of w2
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


def module_delta(
    kind: str, tensors: Mapping[str, torch.Tensor], scaling: float, weight_shape: "tuple[int, ...] | torch.Size", *, peft_kron: bool = False
) -> torch.Tensor:
    """The float32 delta ``scaling · product`` of one module, shaped like the base weight.

    ``tensors`` uses the file's slot names: ``lora_down``/``lora_up``/``lora_mid``,
    ``hada_w1_a``…``hada_t2``, ``lokr_w1``…``lokr_t2``, ``diff`` (kind ``diff``: ComfyUI's whole-weight delta). ``peft_kron``: a PEFT LOKR module
    (:func:`lokr_product`; the product is then reshaped to the weight as PEFT reshapes it).

    Raises:
        ValueError: an unknown kind, missing factors, or a product that does not fit ``weight_shape``.
    """
    t = tensors
    if kind == DIFF:  # ComfyUI's ``.diff``: the delta itself, exactly the weight's shape
        product = _f(t["diff"])
        product = product.clone() if product is t["diff"] else product
        if tuple(product.shape) != tuple(weight_shape):
            raise ValueError(f"the diff has shape {tuple(product.shape)}, which does not fit the weight {tuple(weight_shape)}")
        return product.mul_(scaling) if scaling != 1 else product
    if kind == LORA:
        product = lora_product(t["lora_down"], t["lora_up"], t.get("lora_mid"))
    elif kind == LOHA:
        product = loha_product(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"), t.get("hada_t2"))
    elif kind == LOKR:
        product = lokr_product(
            t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"),
            peft_kron=peft_kron,
        )
    else:
        raise ValueError(f"unknown adapter kind {kind!r}")
    shape = tuple(weight_shape)
    if product.numel() != _numel(shape):
        raise ValueError(f"the {kind} product has shape {tuple(product.shape)}, which does not fit the weight {shape}")
    if tuple(product.shape) != shape:
        if product.shape[0] != shape[0] and not peft_kron:
            raise ValueError(f"the {kind} product has shape {tuple(product.shape)}, which does not fit the weight {shape}")
        product = product.reshape(shape)  # a conv delta from 2-D factors, or a 1x1 conv from a linear-shaped product
    return product.mul_(scaling) if scaling != 1 else product


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
