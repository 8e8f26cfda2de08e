"""Reading LoRA modules of the checkpoint model as factor pairs, and what algebra refuses.

A module's delta is ``scaling · B · A`` with ``B`` / ``A`` flattened (:mod:`.svd`); this reads the
factors of a :class:`~adapterfmt.checkpoint.records.LoraModule` through the one tensor reader, and
says which adapters have no such form (AdaLoRA's SVD triplets, LoHa / LoKr factors,
``target_parameters``) so that nothing half-right is written.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..checkpoint.adalora import is_adalora
from ..checkpoint.records import AdapterCheckpoint, LoraModule
from ..errors import InconsistentAdapterError, NonFiniteValuesError, UnsupportedFeatureError
from ..storage.tensor_source import TensorReader
from .svd import FactorSVD, NonFiniteFactorError, Workspace, factor_svd, flatten_factors


def refuse_unsupported(ckpt: AdapterCheckpoint, source: str, *, allow_dora: bool = True, allow_bias: bool = True) -> None:
    """Raise for an adapter whose modules are not plain ``s·B·A`` factor pairs (or, for combine,
    carry DoRA magnitudes or ``lora_B`` biases, which do not add)."""
    cfg = ckpt.config
    why: Optional[tuple[str, Optional[str]]] = None
    if is_adalora(cfg.raw):
        why = ("is an AdaLoRA adapter (SVD triplets with a budget); resize/combine take LoRA adapters", None)
    elif cfg.target_parameters:
        why = ("targets parameters (target_parameters), whose factors PEFT lays out per expert", None)
    elif ckpt.unknown_keys:
        why = ("holds a tensor adapterfmt does not understand", ckpt.unknown_keys[0])
    else:
        for path, m in sorted(ckpt.lora.items()):
            if m.factors is not None:
                why = (f"module is a {m.factors.upper()} module; resize/combine take LoRA factors", path)
            elif "lora_A" not in m.tensors or "lora_B" not in m.tensors:
                why = ("module lacks lora_A or lora_B", path)
            elif m.use_dora and not allow_dora:
                why = ("module is DoRA: magnitude vectors do not add, so DoRA adapters cannot be combined", path)
            elif m.lora_bias and not allow_bias:
                why = ("module has a lora_B bias (lora_bias); biases of different adapters do not combine as factors", path)
            if why:
                break
    if why:
        raise UnsupportedFeatureError(why[0], path=source, key=why[1])


def read_factors(
    reader: TensorReader, m: LoraModule, workspace: Optional[Workspace] = None, slot: str = "",
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """``(B, A, B's shape, A's shape)``: the module's factors as flattened 2-D matrices in their
    stored dtype, and the stored shapes to write new factors back in. With ``workspace``, file
    tensors are read into its byte buffers ``read.B{slot}`` / ``read.A{slot}`` (valid until reused)."""
    ia, ib = m.tensors["lora_A"], m.tensors["lora_B"]
    if workspace is None:
        a, b = reader.get(ia), reader.get(ib)
    else:
        a = reader.read(ia, into=workspace.raw(f"read.A{slot}", ia.nbytes) if ia.start >= 0 else None)
        b = reader.read(ib, into=workspace.raw(f"read.B{slot}", ib.nbytes) if ib.start >= 0 else None)
    check_factors(b, a, m.tensors["lora_A"].file, m.keys["lora_A"], m.keys["lora_B"])
    b2, a2 = flatten_factors(b, a)
    return b2, a2, tuple(b.shape), tuple(a.shape)


def check_factors(b: torch.Tensor, a: torch.Tensor, file: str, a_key: str, b_key: str) -> None:
    """Refuse factors that do not form a product ``B·A`` (ranks, layouts, non-float dtypes).

    Raises:
        InconsistentAdapterError: the shapes or dtypes do not fit.
    """
    if a.ndim < 2 or b.ndim < 2 or b.shape[1] != a.shape[0] or any(d != 1 for d in b.shape[2:]) or not (a.is_floating_point() and b.is_floating_point()):
        raise InconsistentAdapterError(
            f"A {tuple(a.shape)} {a.dtype} and B {tuple(b.shape)} {b.dtype} do not form a LoRA product", path=file, key=a_key,
            hint="the file is damaged; re-export the adapter",
        )


def require_finite(m: LoraModule, b: torch.Tensor, a: torch.Tensor) -> None:
    """Refuse a module whose factors hold NaN or Inf (one pass over each; ``resize`` finds them in its Grams instead).

    Raises:
        NonFiniteValuesError: naming the tensor.
    """
    for slot, t in (("lora_A", a), ("lora_B", b)):
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteValuesError("holds NaN or Inf values", path=m.tensors[slot].file, key=m.keys[slot],
                                       hint="the adapter diverged in training; nothing can be computed from it")


def exact_svd(b: torch.Tensor, a: torch.Tensor, scale: float, file: str, a_key: str, b_key: str,
              workspace: Optional[Workspace] = None) -> FactorSVD:
    """:func:`~.svd.factor_svd` of one module, a NaN / Inf in a factor named as the tensor it is in.

    Raises:
        NonFiniteValuesError: ``lora_A`` / ``lora_B`` (``a_key`` / ``b_key``) holds NaN or Inf.
    """
    try:
        return factor_svd(b, a, scale, workspace=workspace)
    except NonFiniteFactorError as e:
        raise NonFiniteValuesError("holds NaN or Inf values", path=file, key=a_key if e.which == "A" else b_key,
                                   hint="the adapter diverged in training; nothing can be computed from it") from None


def delta_shape(m: LoraModule) -> tuple[int, ...]:
    """The flattened delta's (out, in·kernel…) with the layer kind: what two sources must agree on."""
    a, b = m.tensors["lora_A"].shape, m.tensors["lora_B"].shape
    return (b[0], *a[1:])
