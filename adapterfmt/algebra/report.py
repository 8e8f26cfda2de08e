"""What ``resize`` and ``combine`` report: one row per module and the totals (BEHAVIOUR §9.3).

Every error is relative and in the Frobenius norm, computed in float64 from the factors as
written (after rounding to the output dtype): ``‖Δ − Δ′‖ / ‖Δ‖``, where Δ is the source module's
delta (resize) or the exact weighted sum of the sources' deltas (combine). For a DoRA module it
is the error of the LoRA part; the magnitude vector is kept as it was. Plain records, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModuleRow:
    """One module of the output."""

    module: str
    layer_kind: str
    old_rank: int  #: resize: the module's rank; combine: Σ rᵢ of the sources that hold it
    new_rank: int
    retained_energy: float  #: fraction of ‖Δ‖² the kept singular values hold (1.0 for cat / exact)
    error: float  #: ‖Δ − Δ′‖_F / ‖Δ‖_F of the written factors
    norm: float  #: ‖Δ‖_F, the reference the error is relative to
    dora: bool = False
    sources: Optional[list[int]] = None  #: combine: indices of the sources that hold the module
    method_error: Optional[float] = None  #: ties / dare / magnitude_prune: ‖D − Δ′‖/‖D‖ of the merged dense D
    dtype: Optional[str] = None  #: the written factors' safetensors dtype (``F32``, ``BF16``, ...)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "module": self.module, "layer_kind": self.layer_kind, "old_rank": self.old_rank, "new_rank": self.new_rank,
            "retained_energy": self.retained_energy, "error": self.error, "norm": self.norm, "dora": self.dora,
        }
        if self.dtype is not None:
            d["dtype"] = self.dtype
        if self.sources is not None:
            d["sources"] = self.sources
        if self.method_error is not None:
            d["truncation_error"] = self.method_error
        return d


@dataclass
class AlgebraReport:
    """The result of ``resize`` or ``combine``."""

    command: str  #: ``resize`` or ``combine``
    output: str
    format: str  #: ``peft``, ``kohya`` or ``diffusers``
    sources: list[dict[str, Any]]  #: ``{"path", "weight"}`` per source (weight 1 for resize)
    how: dict[str, Any]  #: resize: the rule; combine: method, rank, density, majority_sign, seed
    rows: list[ModuleRow] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)  #: saved keys copied unchanged (full copies, tokens, ...)
    params_before: int = 0
    params_after: int = 0
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        ref = math.fsum(r.norm**2 for r in self.rows)
        err = math.fsum((r.error * r.norm) ** 2 for r in self.rows if math.isfinite(r.error))
        kept = math.fsum(r.retained_energy * r.norm**2 for r in self.rows)
        return {
            "modules": len(self.rows),
            "changed_rank": sum(1 for r in self.rows if r.new_rank != r.old_rank),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "retained_energy": kept / ref if ref else 1.0,
            "error": math.sqrt(err / ref) if ref else 0.0,
            "max_error": max((r.error for r in self.rows), default=0.0),
            "dora_modules": sum(1 for r in self.rows if r.dora),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command, "output": self.output, "format": self.format, "sources": self.sources, **self.how,
            "totals": self.totals(), "modules": [r.as_dict() for r in self.rows], "carried": self.carried, "notes": self.notes,
        }
