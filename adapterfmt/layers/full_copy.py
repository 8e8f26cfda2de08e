"""PEFT's ``modules_to_save`` wrapper (:class:`FullCopy`) and walks over a model's adapter wrappers.

A module saved in full becomes a :class:`FullCopy` holding ``original_module`` and one copy per
adapter under ``modules_to_save``, so ``named_modules()`` and ``state_dict()`` read as PEFT's do.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import torch
from torch import nn

from .adalora import AdaLoraLinear
from .lora import LoraLayer
from .lycoris import FactorLayer
from .params import ParamLora
from .tokens import TokenWrapper


class FullCopy(nn.Module):
    """A module trained and saved in full (``modules_to_save``): the frozen original plus one copy per adapter.

    Forward runs the copy of the first active adapter that has one, else the original; attribute
    reads fall through to that same module (``lm_head.weight`` is the active copy's weight).
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def add_copy(self, name: str, *, device: "torch.device | str | None" = None) -> nn.Module:
        """Add a deep copy of the original for adapter ``name``.

        ``device="meta"`` copies the structure only: the parameters and persistent buffers become
        empty placeholders (the loader replaces every one of them with a checkpoint tensor), so no
        memory is spent duplicating weights about to be overwritten.
        """
        memo: dict[int, Any] = {}
        if device is not None:
            for p in self.original_module.parameters():
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            for _, sub in self.original_module.named_modules():
                for bname, buf in sub._buffers.items():
                    if buf is not None and bname not in sub._non_persistent_buffers_set:
                        memo[id(buf)] = torch.empty_like(buf, device=device)
        self.modules_to_save[name] = copied = copy.deepcopy(self.original_module, memo)
        self.original_module.requires_grad_(False)
        return copied

    def add_tied_copy(self, name: str, weight: nn.Parameter) -> nn.Module:
        """Adapter ``name``'s copy of a head tied to an embedding, as PEFT's ``ensure_weight_tying``
        builds it: a bias-free ``nn.Linear`` whose ``weight`` IS ``weight`` (the embedding copy's
        parameter), so the two copies stay one tensor while training."""
        out_f, in_f = weight.shape
        linear = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=weight.dtype)
        linear.weight = weight
        self.modules_to_save[name] = linear
        self.original_module.requires_grad_(False)
        return linear

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @property
    def active_module(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original_module" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.active_module, name)


#: Wrappers whose adapters change a base weight: they merge, unmerge and give way to ``base_layer`` on unload.
WEIGHT_WRAPPERS = (LoraLayer, ParamLora, AdaLoraLinear, FactorLayer)


def iter_wrappers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(path, wrapper)`` for every adapter wrapper in ``model``: :data:`WEIGHT_WRAPPERS`,
    :class:`FullCopy` and :class:`TokenWrapper`."""
    for path, module in model.named_modules():
        if isinstance(module, (FullCopy, TokenWrapper) + WEIGHT_WRAPPERS):
            yield path, module


def plain_module_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` with wrappers treated as the modules they stand for (their insides skipped)."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        out.append((prefix, module))
        if isinstance(module, (FullCopy, TokenWrapper) + WEIGHT_WRAPPERS):
            return
        for child_name, child in module.named_children():
            walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    walk("", model)
    return out
