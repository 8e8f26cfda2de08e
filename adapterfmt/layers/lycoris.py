"""LoHa and LoKr in memory, with PEFT's names and forward (``peft/tuners/loha``, ``peft/tuners/lokr``).

A wrapped module holds ``base_layer`` and one ``nn.ParameterDict`` per factor slot, named as PEFT
names them (``hada_w1_a`` … ``hada_t2``; ``lokr_w1`` … ``lokr_t2``), so ``state_dict()`` reads
``X.base_layer.weight``, ``X.hada_w1_a.default``, ... exactly as PEFT's ``LoHaLayer`` /
``LoKrLayer``. Forward adds ``F.linear`` / ``F.convNd`` of the input with the module's delta
weight — the product of FORMAT §10.3, computed by :mod:`adapterfmt.deltas.lycoris` (the math the
merge engine uses), times the module's scale — to the base output, as PEFT does; in training mode
PEFT's ``module_dropout`` and ``rank_dropout`` apply. Base layers: ``nn.Linear`` and
``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``. This module imports torch only.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..deltas.lycoris import LOHA, LOKR, module_delta
from .base_layer import BaseLayerWrapper

#: PEFT's ParameterDict names per kind, in PEFT's order (``adapter_layer_names``).
FACTOR_SLOTS = {
    LOHA: ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    LOKR: ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def can_wrap(module: nn.Module) -> bool:
    """Whether ``module`` is a layer LoHa / LoKr can wrap (exact types, as PEFT dispatches)."""
    return type(module) is nn.Linear or type(module) in _CONV


class FactorLayer(BaseLayerWrapper):
    """A base layer plus named LoHa or LoKr adapters (one kind per layer, as PEFT's layer classes).

    Attributes:
        r / alpha / scaling / rank_dropout / module_dropout / rank_dropout_scale: per adapter name.
        active_adapters: names applied in forward, in order.
        merged_adapters: names currently merged into the base weight.
        disabled: forward runs the base layer only.
    """

    kind: str = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        for slot in FACTOR_SLOTS[self.kind]:
            setattr(self, slot, nn.ParameterDict({}))
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.peft_kron: dict[str, bool] = {}  #: LoKr: PEFT's Kronecker convention (a PEFT adapter) or LyCORIS's (a file)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    def _slots(self) -> list[nn.ParameterDict]:
        return [getattr(self, s) for s in FACTOR_SLOTS[self.kind]]

    def add_adapter(
        self,
        name: str,
        factors: "dict[str, torch.Tensor]",
        *,
        r: int,
        alpha: float,
        scaling: float,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        rank_dropout_scale: bool = True,
        peft_kron: bool = False,
    ) -> None:
        """Adapter ``name`` with the given factor tensors (slot -> tensor, frozen until made trainable)."""
        unknown = set(factors) - set(FACTOR_SLOTS[self.kind])
        if unknown:
            raise ValueError(f"not {self.kind} factor slots: {sorted(unknown)}")
        for slot, tensor in factors.items():
            getattr(self, slot)[name] = nn.Parameter(tensor, requires_grad=False)
        self.r[name], self.alpha[name], self.scaling[name] = r, alpha, scaling
        self.rank_dropout[name], self.module_dropout[name] = rank_dropout, module_dropout
        self.rank_dropout_scale[name] = rank_dropout_scale
        self.peft_kron[name] = peft_kron

    def delete_adapter(self, name: str) -> None:
        for d in self._slots():
            d.pop(name, None)
        for d in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout, self.rank_dropout_scale, self.peft_kron):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [d[name] for d in self._slots() if name in d]

    def factors(self, name: str) -> dict[str, torch.Tensor]:
        """slot -> tensor of adapter ``name``."""
        return {slot: d[name] for slot, d in zip(FACTOR_SLOTS[self.kind], self._slots()) if name in d}

    def delta_weight(self, name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        """``scaling · product`` shaped like the base weight (PEFT's ``get_delta_weight``)."""
        weight = module_delta(self.kind, self.factors(name), self.scaling[name], self.weight.shape, peft_kron=self.peft_kron[name])
        if apply_rank_dropout:  # training only: drop whole output rows, as PEFT does
            keep = (torch.rand(weight.size(0)) > self.rank_dropout[name]).to(weight.dtype)
            keep = keep.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)
            if self.kind == LOHA or self.rank_dropout_scale[name]:
                keep = keep / keep.mean()
            weight = weight * keep
        return weight

    def _delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name, apply_rank_dropout=self.training and bool(self.rank_dropout[name]))
        x = x.to(delta.dtype)
        base = self.base_layer
        conv = _CONV.get(type(base))
        if conv is None:
            return F.linear(x, delta)
        return conv(x, delta, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        result = self.base_layer(x, *args, **kwargs)
        if not (self.disabled or self.merged):
            for name in self.active_adapters:
                if name not in self.scaling:
                    continue
                if not self.training or torch.rand(1) > self.module_dropout[name]:
                    result = result + self._delta_output(name, x)
        return result.to(previous_dtype)

    def merge(self, names: Optional[Sequence[str]] = None) -> None:
        """Add each adapter's delta to the base weight in place, one adapter at a time (as PEFT)."""
        with torch.no_grad():
            for name in names if names is not None else self.active_adapters:
                if name in self.scaling and name not in self.merged_adapters:
                    self.weight.data += self.delta_weight(name)
                    self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged_adapters:
                self.weight.data -= self.delta_weight(self.merged_adapters.pop())

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapters={self.adapter_names}"


class LoHaLayer(FactorLayer):
    """LoHa: the Hadamard product of two low-rank products (PEFT's ``loha.Linear`` / ``Conv2d`` / ``Conv1d``)."""

    kind = LOHA


class LoKrLayer(FactorLayer):
    """LoKr: the Kronecker product of two factors (PEFT's ``lokr.Linear`` / ``Conv2d`` / ``Conv1d``)."""

    kind = LOKR


LAYER_CLASSES = {LOHA: LoHaLayer, LOKR: LoKrLayer}

__all__ = ["FACTOR_SLOTS", "FactorLayer", "LAYER_CLASSES", "LoHaLayer", "LoKrLayer", "can_wrap"]
