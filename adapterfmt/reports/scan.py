"""Opt-in value scan: NaN and Inf in an adapter's tensors (imports torch).

Only ``adapterfmt inspect --scan`` reads tensor values; everything else works from headers. The
scan reads one tensor at a time and checks it in chunks, so memory stays at one tensor plus a
small boolean buffer, even for a large full copy such as ``lm_head``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..checkpoint.findings import Finding, non_finite_finding
from ..formats.peft.reading import AdapterCheckpoint

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..formats.diffusion.records import ForeignCheckpoint
    from ..storage.header import TensorInfo

#: Elements checked per step; bounds the temporary boolean masks.
_CHUNK = 1 << 24


def count_non_finite(tensor: "torch.Tensor") -> tuple[int, int]:
    """``(nan_count, inf_count)`` of a tensor; integer and bool tensors have none."""
    import torch

    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0, 0
    flat = tensor.reshape(-1)
    nan = inf = 0
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return nan, inf


def non_finite_findings(ckpt: AdapterCheckpoint) -> list[Finding]:
    """One ``non-finite`` finding per tensor of ``ckpt`` that holds NaN or Inf.

    Args:
        ckpt: the adapter (safetensors file, or a ``.bin`` already loaded into memory).

    Returns:
        The findings, in key order; empty when every value is finite.

    Raises:
        HeaderError: the file cannot be read by safetensors.
    """
    return _scan(ckpt.weights_file, ckpt.tensor_infos(), ckpt.tensors_in_memory)


def foreign_non_finite_findings(ckpt: "ForeignCheckpoint") -> list[Finding]:
    """:func:`non_finite_findings` for a kohya / LyCORIS, diffusers or PEFT LoHa / LoKr file: every
    tensor its header lists, ``alpha`` scalars, ``dora_scale`` and unknown keys included (a NaN
    alpha poisons a module as surely as a NaN factor).

    Raises:
        HeaderError: the file is shorter than its header says.
        UnsupportedFeatureError: a tensor has a dtype torch cannot read.
    """
    return _scan(ckpt.file, ckpt.file_tensors, None)


def _scan(where: str, infos: "Mapping[str, TensorInfo]", in_memory: "Optional[Mapping[str, Any]]") -> list[Finding]:
    """The findings of ``infos`` (key -> tensor of ``where``), read one at a time by the one offset reader."""
    from ..storage.tensor_source import TensorReader

    out = []
    with TensorReader(in_memory) as reader:
        for key, info in sorted(infos.items()):
            nan, inf = count_non_finite(reader.get(info))
            if nan or inf:
                out.append(non_finite_finding(where, key, nan, inf, info.numel))
    return out
