"""An adapter held in memory (a PEFT state dict + its config) as an :class:`~adapterfmt.formats.peft.reading.AdapterCheckpoint`.

What diffusers' ``load_lora_weights(state_dict)`` accepts: the tensors never touch the disk, and the
record is built by the same :func:`~adapterfmt.formats.peft.reading.read_adapter` rules as a file's (the
state dict is described like a header, exactly as an ``adapter_model.bin`` is), so
:func:`~adapterfmt.load` checks and applies it identically. This module imports torch.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ...checkpoint.config import LoraConfig, parse_config
from ...constants import DEFAULT_ADAPTER_NAME
from ...errors import HeaderError, InvalidConfigError
from ...storage.header import SafetensorsHeader, TensorInfo
from ...storage.torch_io import SAFETENSORS_DTYPES
from .reading import AdapterCheckpoint, describe_tensors

#: What error messages name as the "file" of an in-memory adapter.
IN_MEMORY = "<in-memory state dict>"


def as_lora_config(config: "LoraConfig | Mapping[str, Any]") -> LoraConfig:
    """``config`` itself, or a decoded ``adapter_config.json`` validated into a :class:`LoraConfig`.

    Raises:
        InvalidConfigError: neither, or the document is not a valid LoRA config.
    """
    if isinstance(config, LoraConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(dict(config))
    raise InvalidConfigError(
        f"must be an adapterfmt.LoraConfig or an adapter_config.json dict, got {type(config).__name__}",
        key="config",
    )


def read_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: "LoraConfig | Mapping[str, Any]",
    name: str = DEFAULT_ADAPTER_NAME,
) -> AdapterCheckpoint:
    """Describe ``state_dict`` (PEFT's saved keys, with or without ``base_model.model.``) as a checkpoint.

    A LoRA / AdaLoRA config (a :class:`LoraConfig` or a dict) gives LoRA records; a LOHA / LOKR
    config dict gives the factor records of PEFT's LoHa / LoKr (FORMAT §10.6).

    Raises:
        HeaderError: a value is not a tensor of a safetensors dtype.
        InvalidConfigError / UnknownKeyError / InconsistentAdapterError: as :func:`~adapterfmt.read_adapter`.
    """
    header = _header(state_dict)
    held = {k: v.detach().clone() for k, v in state_dict.items()}  # never shared with the caller's
    if isinstance(config, Mapping) and str(config.get("peft_type", "")).upper() in ("LOHA", "LOKR"):
        from .lycoris import describe_peft_lycoris, lycoris_adapter

        adapter = lycoris_adapter(describe_peft_lycoris(dict(config), header, config_path=IN_MEMORY), name)
        adapter.directory, adapter.tensors_in_memory = IN_MEMORY, held
        return adapter
    ckpt = AdapterCheckpoint(
        name=name, directory=IN_MEMORY, config=as_lora_config(config), weights_file=IN_MEMORY, prefix="", tensors_in_memory=held
    )
    describe_tensors(ckpt, header)
    return ckpt


def _header(state_dict: Mapping[str, torch.Tensor]) -> SafetensorsHeader:
    """The state dict described as a safetensors header would describe it (no byte offsets)."""
    tensors: dict[str, TensorInfo] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise HeaderError("is not a flat dict of name -> tensor", path=IN_MEMORY, key=str(key))
        dtype = SAFETENSORS_DTYPES.get(value.dtype)
        if dtype is None:
            raise HeaderError(f"has unsupported dtype {value.dtype}", path=IN_MEMORY, key=key)
        tensors[key] = TensorInfo(key, IN_MEMORY, dtype, tuple(value.shape), -1, -1)
    return SafetensorsHeader(path=IN_MEMORY, tensors=tensors, metadata={})


__all__ = ["IN_MEMORY", "as_lora_config", "read_state_dict"]
