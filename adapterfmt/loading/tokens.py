"""Put an adapter's trainable-token rows on a model, as PEFT does (FORMAT.md §3.7; used by :func:`adapterfmt.load`).

Each ``E.token_adapter.trainable_tokens_delta`` of the checkpoint wraps the model's embedding at
``E`` (after ``prefix_map``) in a :class:`~adapterfmt.layers.tokens.TokenWrapper`, and every output
head sharing that embedding's weight in a tied wrapper that follows it. Shapes and indices are
checked before anything changes; replaced modules go to ``created`` so a failed load is undone.
This module imports torch only.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..checkpoint.matching import apply_prefix_map
from ..errors import InvalidConfigError, NonFiniteValuesError, ShapeMismatchError, UnresolvedModulesError, UnsupportedFeatureError
from ..formats.peft.reading import AdapterCheckpoint
from ..layers.tokens import TokenWrapper, tied_heads
from ..reports.scan import count_non_finite
from ..storage.tensor_source import TensorReader
from .module_tree import find_module, replace_module


def load_token_rows(
    model: nn.Module,
    ckpt: AdapterCheckpoint,
    name: str,
    prefix_map: Mapping[str, str],
    active: Sequence[str],
    created: list[tuple[str, nn.Module]],
) -> None:
    """Wrap every embedding the checkpoint has token rows for and load the rows under adapter ``name``."""
    if not ckpt.token_deltas:
        return
    planned = []
    for saved_path, td in ckpt.token_deltas.items():
        path = apply_prefix_map(saved_path, prefix_map)
        module = find_module(model, path)
        if module is None:
            raise UnresolvedModulesError(
                f"trainable tokens for '{saved_path}' match no module of the model", unresolved=[saved_path], path=ckpt.weights_file, key=td.key
            )
        base = module.original_module if isinstance(module, TokenWrapper) else module
        weight = getattr(base, "weight", None)
        if not isinstance(base, nn.Embedding) or not isinstance(weight, torch.Tensor):
            raise UnsupportedFeatureError(
                f"trainable tokens need an nn.Embedding, '{path}' is a {type(base).__name__}", path=ckpt.weights_file, key=td.key
            )
        indices = list(td.indices or [])
        vocab, dim = weight.shape
        if tuple(td.tensor.shape) != (len(indices), dim):
            raise ShapeMismatchError(
                f"holds {list(td.tensor.shape)} but {len(indices)} indices of the embedding {list(weight.shape)} need [{len(indices)}, {dim}]",
                path=ckpt.weights_file,
                key=td.key,
            )
        bad = [i for i in indices if not (isinstance(i, int) and 0 <= i < vocab)]
        if bad or len(set(indices)) != len(indices):
            why = f"index {bad[0]!r} is outside the vocabulary of {vocab}" if bad else "an index appears twice"
            raise InvalidConfigError(f"trainable_token_indices: {why}", path=ckpt.config.path, key="trainable_token_indices")
        planned.append((path, module, base, td, indices))
    with TensorReader(ckpt.tensors_in_memory) as reader:
        for path, module, base, td, indices in planned:
            rows = reader.get(td.tensor)
            nan, inf = count_non_finite(rows)
            if nan or inf:
                raise NonFiniteValuesError(f"holds {nan} NaN and {inf} Inf value(s)", path=ckpt.weights_file, key=td.key)
            heads = [] if isinstance(module, TokenWrapper) else tied_heads(model, base)
            if isinstance(module, TokenWrapper):
                wrapper = module
            else:
                wrapper = TokenWrapper(base)
                wrapper.active_adapters = list(active)
                replace_module(model, path, wrapper)
                created.append((path, base))
            wrapper.add_rows(name, indices)
            wrapper.token_adapter.trainable_tokens_delta[name] = nn.Parameter(
                rows.to(device=base.weight.device, dtype=base.weight.dtype), requires_grad=False
            )
            for head_path in heads:
                head = find_module(model, head_path)
                follower = TokenWrapper(head, tied=wrapper)
                follower.active_adapters = list(active)
                replace_module(model, head_path, follower)
                created.append((head_path, head))


__all__ = ["load_token_rows"]
