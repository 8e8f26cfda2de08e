"""AdaLoRA checkpoints (``peft_type: "ADALORA"``): LoRA with a learned diagonal (FORMAT.md §3.10).

AdaLoRA stores, per module ``X``, ParameterDict entries without ``.weight``: ``X.lora_A``
``(r, in)``, ``X.lora_B`` ``(out, r)`` and the singular values ``X.lora_E`` ``(r, 1)``. Its delta is
``ΔW = B @ (A ⊙ E) · α / (r + 1e-5)`` with ``α = lora_alpha`` (``r`` when ``lora_alpha`` is 0) and
``r`` the rank the tensors hold (PEFT's ``ranknum``, never saved: a budget-pruned adapter is
saved with its pruned rank, and its ``rank_pattern`` holds boolean masks, not ranks).
Embeddings use ``lora_embedding_A`` / ``lora_embedding_B`` as LoRA does, with ``lora_E`` too.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

#: saved AdaLoRA parameter name -> slot of the module record
SLOTS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}


def is_adalora(raw: Mapping[str, Any]) -> bool:
    return str(raw.get("peft_type", "")).upper() == "ADALORA"


def init_rank(raw: Mapping[str, Any]) -> Optional[int]:
    """AdaLoRA trains at ``init_r`` (its ``r`` is the target budget, not a layer rank)."""
    v = raw.get("init_r")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def scaling(lora_alpha: float, rank: int) -> float:
    """``α / (r + 1e-5)``, α = ``lora_alpha`` or ``r`` when it is 0 (PEFT's ``scaling / ranknum``)."""
    alpha = lora_alpha if lora_alpha > 0 else float(rank)
    return alpha / (rank + 1e-5)
