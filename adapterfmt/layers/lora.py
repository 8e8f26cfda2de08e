"""Wrapper modules that give a plain model PEFT's LoRA structure and forward, without PEFT.

A LoRA-wrapped module has PEFT's submodule names in PEFT's order (``base_layer``,
``lora_dropout``, ``lora_A``, ``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``,
``lora_magnitude_vector``), so ``named_modules()`` and ``state_dict()`` read
exactly as PEFT's do. The forward passes compute what PEFT's ``lora.Linear`` / ``Embedding`` /
``ConvNd`` and their DoRA variants compute (``peft/tuners/lora/layer.py``, ``dora.py``,
``variants.py``); merging uses :mod:`adapterfmt.deltas.lora`, the math shared with the merge engine.

Supported base layers: ``nn.Linear``, transformers ``Conv1D`` (recognised by duck typing, weight
stored ``(in, out)``), ``nn.Conv1d``/``Conv2d``/``Conv3d`` and ``nn.Embedding``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..deltas.lora import CONV, CONV1D_TRANSPOSED, EMBEDDING, LINEAR, dora_weight, lora_delta, merged_weight
from .base_layer import BaseLayerWrapper, dropout_module, register_lora_containers
from .types import adapter_dtype, base_layout, is_transformers_conv1d


class Magnitude(nn.Module):
    """DoRA's magnitude vector, held as a parameter named ``weight`` (PEFT's DoRA layer keeps it so)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class LoraLayer(BaseLayerWrapper):
    """A base layer plus any number of named LoRA adapters (PEFT's ``LoraLayer`` structure).

    Attributes:
        r / lora_alpha / scaling: per adapter name.
        active_adapters: names applied in forward, in order.
        merged_adapters: names currently merged into the base weight.
        disabled: forward runs the base layer only.
    """

    layout: str = LINEAR

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        register_lora_containers(self)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        #: DoRA merges keep the weight they replaced, so unmerge restores it exactly.
        self._weights_before_merge: dict[str, torch.Tensor] = {}

    # -- adapters --

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def create_adapter(
        self,
        name: str,
        rank: int,
        *,
        alpha: float,
        scaling: float,
        dropout: float = 0.0,
        lora_bias: bool = False,
        use_dora: bool = False,
        device: "torch.device | str | None" = None,
    ) -> None:
        """Add adapter ``name`` with PEFT's module types and shapes; values as the constructors leave them.

        ``device="meta"`` builds empty placeholders that a loader then replaces with checkpoint tensors.
        The constructors run in PEFT's order so a seeded :func:`adapterfmt.wrap` draws the same numbers.
        """
        self.r[name] = rank
        self.lora_alpha[name] = alpha
        self.scaling[name] = scaling
        self.lora_dropout[name] = dropout_module(dropout)
        self._create_factors(name, rank, lora_bias=lora_bias, device=device)
        if use_dora:
            self.lora_magnitude_vector[name] = Magnitude(torch.empty(self._magnitude_shape(), device=device))

    def _create_factors(self, name: str, rank: int, *, lora_bias: bool, device: Any) -> None:
        raise NotImplementedError

    def _magnitude_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def init_adapter(self, name: str, init_lora_weights: "bool | str" = True) -> None:
        """Initialise a freshly created adapter as PEFT does, then give it PEFT's dtype and device.

        ``True``: ``lora_A`` kaiming-uniform (a=√5), ``lora_B`` zero (embedding: A zero, B normal);
        ``"gaussian"``: ``lora_A`` normal with std 1/r; ``False``: the constructors' values. The
        factors are moved to the base weight's device and dtype, DoRA's magnitude is computed there
        (the norm of ``W + s·B@A``), and 16-bit results are kept in float32.
        """
        with torch.no_grad():
            if init_lora_weights is not False:
                self._reset(name, init_lora_weights)
            weight = self.base_layer.weight
            self._to(name, weight.device, weight.dtype if weight.dtype.is_floating_point else None)
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].weight.data = self._dora_norm(name, weight).detach()
            self._to(name, weight.device, adapter_dtype(weight))

    def _reset(self, name: str, init: "bool | str") -> None:
        if name in self.lora_A:
            if init is True:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            elif isinstance(init, str) and init.lower() == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / self.r[name])
            else:
                raise ValueError(f"init_lora_weights={init!r} is not supported; use True, False or 'gaussian'")
            nn.init.zeros_(self.lora_B[name].weight)
            if self.lora_B[name].bias is not None:
                nn.init.zeros_(self.lora_B[name].bias)
        if name in self.lora_embedding_A:
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def _to(self, name: str, device: torch.device, dtype: Optional[torch.dtype]) -> None:
        for container in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in container:
                container[name] = container[name].to(device=device, dtype=dtype)
        for pdict in (self.lora_embedding_A, self.lora_embedding_B):
            if name in pdict:
                pdict[name] = nn.Parameter(pdict[name].data.to(device=device, dtype=dtype))

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The trainable tensors of adapter ``name`` in this layer."""
        for container in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in container:
                yield from container[name].parameters()
        for pdict in (self.lora_embedding_A, self.lora_embedding_B):
            if name in pdict:
                yield pdict[name]

    def delete_adapter(self, name: str) -> None:
        for container in (
            self.lora_dropout,
            self.lora_A,
            self.lora_B,
            self.lora_embedding_A,
            self.lora_embedding_B,
            self.lora_magnitude_vector,
        ):
            if name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # -- the delta and DoRA's norm --

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_A, lora_B)`` tensors as saved (embedding: ``lora_embedding_A``/``_B``)."""
        if name in self.lora_embedding_A:
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        return self.lora_A[name].weight, self.lora_B[name].weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in float32, shaped like the base weight."""
        a, b = self.factors(name)
        return lora_delta(a, b, self.scaling[name], self.layout, self.base_layer.weight.shape)

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- merge --

    def merge(self, names: Optional[list[str]] = None) -> None:
        """Merge adapters (default: the active ones not yet merged) into the base weight.

        Vanilla LoRA: ``W + ΣΔW`` in float32 with one rounding, ``lora_B.bias`` likewise into the
        base bias; DoRA: ``(m / ‖W + ΔW‖) ⊙ (W + ΔW)``.

        Raises:
            ValueError: a DoRA adapter is merged together with another adapter on this layer, the
                conv layer has ``groups > 1``, or ``lora_bias`` is set on a layer without bias.
        """
        todo = [n for n in (names if names is not None else self.active_adapters) if n in self.r and n not in self.merged_adapters]
        if not todo:
            return
        dora = [n for n in todo if n in self.lora_magnitude_vector]
        if dora and (len(todo) > 1 or self.merged_adapters):
            raise ValueError(
                f"cannot merge DoRA adapter {dora[0]!r} together with other adapters on one layer; merge it alone"
            )
        if getattr(self.base_layer, "groups", 1) > 1:
            raise ValueError("merging LoRA into a convolution with groups > 1 is not supported")
        base = self.base_layer
        with torch.no_grad():
            weight = base.weight
            if dora:
                name = dora[0]
                merged = dora_weight(weight, self.delta_weight(name), self.lora_magnitude_vector[name].weight, self.layout)
                self._weights_before_merge[name] = weight.data
                weight.data = merged.to(weight.dtype)
            else:
                weight.data = merged_weight(weight, [self.delta_weight(n) for n in todo])
            bias_deltas = [self._bias_delta(n) for n in todo if self._has_lora_bias(n)]
            if bias_deltas:
                if base.bias is None:
                    raise ValueError("lora_bias cannot be merged: the base layer has no bias")
                base.bias.data = merged_weight(base.bias, bias_deltas)
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (DoRA: restores the saved weight)."""
        base = self.base_layer
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self._weights_before_merge:
                    base.weight.data = self._weights_before_merge.pop(name)
                else:
                    base.weight.data = merged_weight(base.weight, [-self.delta_weight(name)])
                if self._has_lora_bias(name):
                    base.bias.data = merged_weight(base.bias, [-self._bias_delta(name)])

    def _has_lora_bias(self, name: str) -> bool:
        return name in self.lora_B and self.lora_B[name].bias is not None

    def _bias_delta(self, name: str) -> torch.Tensor:
        return self.lora_B[name].bias.float() * self.scaling[name]

    # -- forward --

    def _live_adapters(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.r]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self._live_adapters():
            result, x = self._add_adapter_output(name, x, result)
        return result.to(out_dtype)

    def _add_adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


class _FactorLayer(LoraLayer):
    """Linear and convolution layers: ``lora_A`` / ``lora_B`` are modules applied to the input."""

    def _add_adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        scaling = self.scaling[name]
        if x.dtype != lora_a.weight.dtype:
            x = x.to(lora_a.weight.dtype)
        if name not in self.lora_magnitude_vector:
            return result + lora_b(lora_a(dropout(x))) * scaling, x
        # DoRA: the base output is rescaled per output unit by m / ‖W + s·B@A‖ (norm detached).
        weight = self.base_layer.weight.to(x.dtype)
        scale = self.lora_magnitude_vector[name].weight / self._dora_norm(name, weight).detach()
        scale = self._unit_view(scale)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = self._without_bias(result)
        else:
            x = dropout(x)
            base_result = self._base_without_bias(x, weight)
        return result + (scale - 1) * base_result + scale * lora_b(lora_a(x)) * scaling, x

    def _unit_view(self, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _without_bias(self, result: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LoraLinear(_FactorLayer):
    """LoRA on ``nn.Linear`` or transformers ``Conv1D`` (``lora_A``: Linear(in, r), ``lora_B``: Linear(r, out))."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.layout = CONV1D_TRANSPOSED if is_transformers_conv1d(base_layer) else LINEAR
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.layout == CONV1D_TRANSPOSED else (w.shape[1], w.shape[0])

    def _create_factors(self, name: str, rank: int, *, lora_bias: bool, device: Any) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, device=device)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=lora_bias, device=device)

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.layout == CONV1D_TRANSPOSED else weight

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        lora_weight = (self.lora_B[name].weight @ self.lora_A[name].weight).to(weight.dtype)
        v = self._out_in(weight) + self.scaling[name] * lora_weight
        return torch.linalg.norm(v, dim=1).to(v.dtype)

    def _unit_view(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.view(1, -1)

    def _without_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return result if bias is None else result - bias

    def _base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._out_in(weight))


class LoraConv(_FactorLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: ``lora_A`` copies kernel, stride and padding; ``lora_B`` is 1×…×1 with the base's groups."""

    layout = CONV

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def _create_factors(self, name: str, rank: int, *, lora_bias: bool, device: Any) -> None:
        base = self.base_layer
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = conv(self.in_features, rank, base.kernel_size, base.stride, base.padding, bias=False, device=device)
        self.lora_B[name] = conv(rank, self.out_features, ones, ones, groups=base.groups, bias=lora_bias, device=device)

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.out_features) + (1,) * (self.base_layer.weight.dim() - 2)

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        r = a.shape[0]
        lora_weight = (b.reshape(-1, r) @ a.reshape(r, -1)).reshape(weight.shape)
        v = weight + self.scaling[name] * lora_weight
        return v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True).transpose(1, 0)

    def _unit_view(self, scale: torch.Tensor) -> torch.Tensor:
        return scale

    def _without_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        return result if bias is None else result - bias.view((1, -1) + (1,) * (result.dim() - 2))

    def _base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        return fn(x, weight, None, stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``lora_embedding_A`` ``(r, V)`` and ``lora_embedding_B`` ``(D, r)`` parameters."""

    layout = EMBEDDING

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def create_adapter(self, name: str, rank: int, *, lora_bias: bool = False, **kwargs: Any) -> None:
        if lora_bias:
            raise ValueError("lora_bias is not supported on embedding layers (PEFT has no such tensor)")
        super().create_adapter(name, rank, lora_bias=False, **kwargs)

    def _create_factors(self, name: str, rank: int, *, lora_bias: bool, device: Any) -> None:
        self.lora_embedding_A[name] = nn.Parameter(torch.randn((rank, self.in_features), device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn((self.out_features, rank), device=device))

    def _magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        v = weight.T + self.scaling[name] * (b @ a)  # (D, V)
        return torch.linalg.norm(v, dim=1).to(v.dtype)

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            x,
            table,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def _embed_scale(self) -> Optional[torch.Tensor]:
        """A scalar ``embed_scale`` the base applies in forward (Gemma), applied to the adapter output too."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=self.base_layer.weight.device, dtype=self.base_layer.weight.dtype)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return scale
        return None

    def _add_adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        out = (self._embed(x, a.T) @ b.T) * self.scaling[name]
        if name in self.lora_magnitude_vector:
            scale = self.lora_magnitude_vector[name].weight / self._dora_norm(name, self.base_layer.weight).detach()
            out = scale * out
            result = scale * result
        embed_scale = self._embed_scale()
        if embed_scale is not None:
            out = out * embed_scale.to(out.dtype)
        return result + out, x


def make_lora_layer(module: nn.Module) -> LoraLayer:
    """Wrap ``module`` in the LoRA layer class for its type.

    Raises:
        TypeError: the module is not a layer LoRA supports.
    """
    layout = base_layout(module)
    if layout == EMBEDDING:
        return LoraEmbedding(module)
    if layout == CONV:
        return LoraConv(module)
    if layout in (LINEAR, CONV1D_TRANSPOSED):
        return LoraLinear(module)
    raise TypeError(f"LoRA cannot wrap a {type(module).__name__}")
