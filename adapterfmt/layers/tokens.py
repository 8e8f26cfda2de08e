"""Trainable tokens in :func:`adapterfmt.load` (``trainable_token_indices``, FORMAT.md §3.7).

PEFT wraps the embedding ``E`` as ``E.token_adapter`` (a ``TrainableTokensLayer`` under a
``TrainableTokensWrapper``): the base weight moves to ``E.token_adapter.base_layer.weight`` and
each adapter's rows live in ``E.token_adapter.trainable_tokens_delta.<adp>`` ``(n, D)``, and the
base's rows they replace in ``E.token_adapter.trainable_tokens_original.<adp>`` (a non-persistent
buffer, as PEFT's ``BufferDict``: in ``named_buffers()``, not in ``state_dict()``). Forward
looks the ids up in the base weight with rows ``indices[j]`` **replaced** by row ``j`` (not added).
An output head that shares the embedding's weight is wrapped too and follows it (it shares the
ParameterDict and originals, so its state dict shows the same rows under
``lm_head.token_adapter.…``), as PEFT does for a tied ``lm_head``.

:class:`TokenWrapper` has the wrapper interface the loader's other wrappers have
(``active_adapters``, ``disabled``, ``delete_adapter``, ``original_module``, ``active_module``).
This module imports torch only.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BufferDict(nn.Module):
    """Named non-persistent buffers (PEFT's ``BufferDict`` with ``persistent=False``)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=False)

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def pop(self, key: str, default: Any = None) -> Any:
        value = self._buffers.pop(key, default)
        self._non_persistent_buffers_set.discard(key)
        return value


class TokenLayer(nn.Module):
    """``token_adapter``: the base embedding (or tied head) and the replacement rows per adapter."""

    def __init__(self, base_layer: nn.Module, tied: Optional["TokenLayer"] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied] if tied is not None else []  # a list: kept out of named_modules, as PEFT does
        if tied is None:
            self.trainable_tokens_delta = nn.ParameterDict({})
            self.trainable_tokens_original = BufferDict()
            self.token_indices: dict[str, list[int]] = {}
        else:
            self.trainable_tokens_delta = tied.trainable_tokens_delta
            self.trainable_tokens_original = tied.trainable_tokens_original
            self.token_indices = tied.token_indices

    def weight_for(self, names: Sequence[str]) -> torch.Tensor:
        """The base weight with the rows of ``names`` replaced, in order."""
        w = self.base_layer.weight
        for name in names:
            if name in self.trainable_tokens_delta:
                index = torch.tensor(self.token_indices[name], device=w.device)
                w = w.index_copy(0, index, self.trainable_tokens_delta[name].to(w))
        return w

    def forward(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        base = self.base_layer
        if not any(n in self.trainable_tokens_delta for n in names):
            return base(x)
        w = self.weight_for(names)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale in their forward
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else (out * scale if isinstance(scale, (int, float)) else out)
        return F.linear(x, w, getattr(base, "bias", None))


class TokenWrapper(nn.Module):
    """PEFT's ``TrainableTokensWrapper`` around an embedding (or the head tied to it)."""

    def __init__(self, base_layer: nn.Module, tied: Optional["TokenWrapper"] = None) -> None:
        super().__init__()
        self.token_adapter = TokenLayer(base_layer, tied.token_adapter if tied is not None else None)
        self.active_adapters: list[str] = []
        self.disabled = False

    @property
    def tied(self) -> bool:
        return bool(self.token_adapter._tied)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.token_adapter.base_layer.weight

    def add_rows(self, name: str, indices: Sequence[int], *, device: "torch.device | str | None" = None) -> None:
        """An empty ``(n, D)`` placeholder for adapter ``name`` (filled by the loader), and the base's
        rows at ``indices`` kept as ``trainable_tokens_original`` (PEFT keeps them to unmerge)."""
        w = self.weight
        self.token_adapter.token_indices[name] = list(indices)
        self.token_adapter.trainable_tokens_original[name] = w.detach()[list(indices)].clone()
        self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(
            torch.empty((len(indices), w.shape[1]), dtype=w.dtype, device=device or w.device), requires_grad=False
        )

    def delete_adapter(self, name: str) -> None:
        if not self.tied:
            self.token_adapter.trainable_tokens_delta.pop(name, None)
            self.token_adapter.trainable_tokens_original.pop(name, None)
            self.token_adapter.token_indices.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        delta = self.token_adapter.trainable_tokens_delta
        return [delta[name]] if name in delta and not self.tied else []

    @property
    def active_module(self) -> nn.Module:
        """The base module with the active rows written into its weight (``unload(merge=True)``)."""
        base = self.original_module
        with torch.no_grad():
            base.weight.data = self.token_adapter.weight_for(self.active_adapters).detach().clone()
        return base

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            return self.token_adapter.base_layer(x, *args, **kwargs)
        return self.token_adapter(x, self.active_adapters)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.token_adapter.base_layer, name)


def tied_heads(model: nn.Module, embedding: nn.Module) -> list[str]:
    """Paths of modules (other than ``embedding``) whose ``weight`` is the embedding's weight: the tied heads."""
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return []
    return [p for p, m in model.named_modules() if m is not embedding and isinstance(m, nn.Linear) and m.weight is weight]


__all__ = ["BufferDict", "TokenLayer", "TokenWrapper", "tied_heads"]
