"""LoRA on a parameter in memory (PEFT's ``ParamWrapper``, ``target_parameters``; FORMAT.md §3.9).

:class:`ParamLora` wraps the module that owns the parameter. Several targeted parameters of one
module nest the wrappers, the first registered parameter innermost, so the names are PEFT's:
``experts.lora_A.<adp>.weight`` (the outer parameter), ``experts.base_layer.lora_A.<adp>.weight``,
and the parameters themselves under ``experts.base_layer.base_layer.<param>``. ``lora_A`` is an
``nn.Linear(in, r·E)`` and ``lora_B`` an ``nn.Linear(r·E, out)``, E the number of experts (1 for a
2-D parameter). Forward runs the wrapped module with the parameter replaced by ``W + ΣΔW`` (the
parameter itself is never changed, as PEFT's parametrization does); ``merge`` adds ΔW in place.
Like every PEFT ``LoraLayer`` it also carries ``lora_dropout.<adp>`` (an ``nn.Identity``) and the
empty ``lora_embedding_A`` / ``lora_embedding_B`` / ``lora_magnitude_vector``. This module imports
torch only.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .base_layer import register_lora_containers


@contextlib.contextmanager
def _replaced(module: nn.Module, name: str, value: torch.Tensor) -> Iterator[None]:
    """``module.<name>`` reads ``value`` inside the block; the parameter object is put back after."""
    original = module._parameters.pop(name)
    object.__setattr__(module, name, value)
    try:
        yield
    finally:
        object.__delattr__(module, name)
        module._parameters[name] = original


class ParamLora(nn.Module):
    """PEFT's ``ParamWrapper``: LoRA factors for one parameter of the module it wraps."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        register_lora_containers(self)  # PEFT's ParamWrapper is a LoraLayer: all its containers, used or not
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        shape = tuple(self.param.shape)
        transposed = bool(getattr(self.owner, "is_transposed", False))
        if len(shape) == 3:
            self.experts = shape[0]
            self.in_features, self.out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
            self.transposed = transposed
        elif len(shape) == 2:
            self.experts, self.out_features, self.in_features, self.transposed = 1, shape[0], shape[1], False
        else:
            raise ValueError(f"LoRA on a {len(shape)}-D parameter is not defined (2-D and 3-D only)")

    @property
    def owner(self) -> nn.Module:
        """The module that holds the parameter (below every nested wrapper)."""
        m = self.base_layer
        while isinstance(m, ParamLora):
            m = m.base_layer
        return m

    @property
    def param(self) -> torch.Tensor:
        return self.owner._parameters[self.parameter_name]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, rank: int, scaling: float) -> None:
        """Factors of rank ``rank`` per expert for adapter ``name`` (values set by the loader)."""
        w = self.param
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_dropout[name] = nn.Identity()  # PEFT's ParamWrapper refuses lora_dropout != 0
        self.lora_A[name] = nn.Linear(self.in_features, rank * self.experts, bias=False, device=w.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(rank * self.experts, self.out_features, bias=False, device=w.device, dtype=dtype)
        self.scaling[name] = scaling

    def delete_adapter(self, name: str) -> None:
        self.lora_dropout.pop(name, None)
        self.lora_A.pop(name, None)
        self.lora_B.pop(name, None)
        self.scaling.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name].weight, self.lora_B[name].weight] if name in self.lora_A else []

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW shaped like the parameter: ``s·B@A`` (2-D) or per expert ``s·B[:, e::E] @ A[e·r:(e+1)·r]`` (3-D)."""
        a, b, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        if self.experts == 1:
            return (b @ a) * s
        a3 = a.reshape(self.experts, -1, a.shape[-1])
        b3 = b.reshape(b.shape[0], -1, self.experts)
        return torch.einsum("o r e, e r i -> e i o" if self.transposed else "o r e, e r i -> e o i", b3, a3) * s

    def _live(self) -> list[str]:
        return [] if self.disabled or self.merged else [n for n in self.active_adapters if n in self.lora_A]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._live()
        if not names:
            return self.base_layer(*args, **kwargs)
        w = self.param
        value = w
        for name in names:
            value = value + self.delta_weight(name).to(w.dtype)
        with _replaced(self.owner, self.parameter_name, value):
            return self.base_layer(*args, **kwargs)

    def merge(self, names: Optional[Sequence[str]] = None) -> None:
        with torch.no_grad():
            for name in names if names is not None else self.active_adapters:
                if name in self.lora_A and name not in self.merged_adapters:
                    self.param.data += self.delta_weight(name).to(self.param.dtype)
                    self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                self.param.data -= self.delta_weight(name).to(self.param.dtype)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_layer, name)


__all__ = ["ParamLora"]
