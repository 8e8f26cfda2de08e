"""LoRA on parameters (PEFT's ``target_parameters``, ``ParamWrapper``): which parameter a saved
module adapts, and where its delta lands on disk (FORMAT.md §3.9).

PEFT wraps the module that owns a targeted parameter; the saved keys are named after the module:
``M.lora_A.weight`` / ``M.lora_B.weight``. Several targeted parameters of one module nest the
wrappers, the first registered parameter innermost, so its keys carry one ``.base_layer`` per
outer wrapper (``experts.base_layer.lora_A.weight`` is ``gate_up_proj`` when ``down_proj`` is
targeted too). Registration order is not in the file: the parameter is the one whose shapes fit,
and two that both fit are an ambiguity, reported, never guessed.

* A 2-D parameter ``(out, in)``: A ``(r, in)``, B ``(out, r)``, ``ΔW = s·B@A`` (a Linear's math).
* A 3-D parameter ``(E, out, in)`` (fused MoE experts, ``is_transposed`` false): A ``(r·E, in)``
  read as ``(E, r, in)``, B ``(out, r·E)`` read as ``(out, r, E)``;
  ``ΔW[e] = s · B[:, e::E] @ A[e·r:(e+1)·r]``. On disk transformers keeps one tensor per expert
  (and per concatenated piece, e.g. Mixtral ``w1``/``w3`` for ``gate_up_proj``); the architecture's
  conversion rules (:mod:`adapterfmt.tables.architectures`) give each piece's key, and each piece gets the
  rows of ``ΔW[e]`` it holds: a linear LoRA on slices of A and B (:class:`ExpertSlice`).

``r`` and ``α`` come from the config looked up with the parameter's key (``M.param``), as PEFT
does; the tensors give ``r·E``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..tables.architectures import checkpoint_key, fused_tensor
from .matching import matches_entry

if TYPE_CHECKING:  # pragma: no cover
    from .config import LoraConfig
    from .records import LoraModule

_WRAPPER = ".base_layer"


@dataclass(frozen=True)
class ParamTarget:
    """A saved LoRA module that adapts a parameter: the owning module, its wrapper depth, and the
    ``target_parameters`` names that module may hold (in config order)."""

    owner: str
    depth: int
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class ExpertSlice:
    """The part of a 3-D parameter LoRA that lands on one on-disk tensor: expert ``expert`` of
    ``experts``, rows ``rows`` of ``ΔW[expert]`` (A rows ``expert·rank …``, B columns ``expert::experts``)."""

    expert: int
    experts: int
    rank: int
    rows: tuple[int, int]


def param_target(cfg: "LoraConfig", path: str) -> Optional[ParamTarget]:
    """The parameter target a saved module path stands for, or None for a module LoRA."""
    entries = list(cfg.target_parameters or [])
    if not entries:
        return None
    owner, depth = path, 0
    while owner.endswith(_WRAPPER):
        owner, depth = owner[: -len(_WRAPPER)], depth + 1
    candidates = []
    for entry in entries:
        module, _, param = entry.rpartition(".")
        if param and (not module or matches_entry(owner, module)) and param not in candidates:
            candidates.append(param)
    return ParamTarget(owner, depth, tuple(candidates)) if candidates else None


def rank_and_scaling(cfg: "LoraConfig", key: str) -> tuple[int, float]:
    """PEFT's ``r`` and scaling for the parameter ``key`` (patterns looked up on the parameter key)."""
    r = cfg.rank_for(key)
    return r, cfg.scaling_for(key, r)


@dataclass(frozen=True)
class ParamBinding:
    """One on-disk tensor a parameter LoRA changes."""

    param_key: str  #: in-memory parameter key (``model.layers.0.mlp.experts.gate_up_proj``)
    base_key: str  #: on-disk tensor
    scaling: float
    slice: Optional[ExpertSlice]  #: None for a 2-D parameter (the whole delta)


def bind(m: "LoraModule", target: ParamTarget, cfg: "LoraConfig", base: Any, owner: str) -> tuple[list[ParamBinding], Optional[str]]:
    """The on-disk tensors the parameter LoRA ``m`` changes, or an error message.

    ``owner`` is ``target.owner`` after ``prefix_map``. Each candidate parameter is tried; exactly
    one must fit the shapes (with ``depth`` deciding among several only through the shapes).
    """
    a, b = m.tensors.get("lora_A"), m.tensors.get("lora_B")
    if a is None or b is None or len(a.shape) != 2 or len(b.shape) != 2:
        return [], f"'{m.path}': a parameter LoRA needs 2-D lora_A and lora_B"
    fits: list[list[ParamBinding]] = []
    reasons: list[str] = []
    for param in target.candidates:
        key = f"{owner}.{param}"
        found, why = _bind_param(key, tuple(a.shape), tuple(b.shape), cfg, base)
        if found:
            fits.append(found)
        else:
            reasons.append(f"{param}: {why}")
    if len(fits) == 1:
        return fits[0], None
    if len(fits) > 1:
        names = ", ".join(f.param_key.rpartition(".")[2] for f, *_ in fits)
        return [], f"'{m.path}': the LoRA fits several targeted parameters ({names}); the file does not say which (wrapper depth {target.depth})"
    return [], f"'{m.path}': fits no targeted parameter of '{owner}' ({'; '.join(reasons)})"


def _bind_param(key: str, a: tuple[int, ...], b: tuple[int, ...], cfg: "LoraConfig", base: Any) -> tuple[list[ParamBinding], str]:
    r, scaling = rank_and_scaling(cfg, key)
    tensors = base.tensors
    disk = checkpoint_key(base.config, key, tensors)
    info = tensors.get(disk)
    if info is not None:
        shape = tuple(info.shape)
        if len(shape) == 2:
            if a[0] != r or b[1] != r or shape != (b[0], a[1]):
                return [], f"LoRA A {list(a)} / B {list(b)} (r={r}) does not fit {disk} {list(shape)}"
            return [ParamBinding(key, disk, scaling, None)], ""
        return [], f"{disk} is stored fused {list(shape)}; only per-expert checkpoints are merged"
    fused = fused_tensor(base.config, key)
    if fused is None:
        return [], f"no tensor '{disk}' in the base"
    if not fused.supported or not fused.stacked or fused.concat_dim not in (None, 1):
        return [], f"'{key}' is stored through a conversion ({', '.join(op[0] for op in fused.operations)}) adapterfmt cannot invert"
    if a[0] % r or b[1] != a[0]:
        return [], f"LoRA A {list(a)} / B {list(b)} is not r·E = {r}·E"
    experts = a[0] // r
    bindings: list[ParamBinding] = []
    for e in range(experts):
        row = 0
        for part in fused.parts:
            pkey = part.replace("*", str(e), 1)
            pinfo = tensors.get(pkey)
            if pinfo is None:
                return [], f"expert {e} of {experts}: no tensor '{pkey}' in the base"
            pshape = tuple(pinfo.shape)
            if len(pshape) != 2 or pshape[1] != a[1]:
                return [], f"'{pkey}' {list(pshape)} does not take rows of a delta with {a[1]} inputs"
            bindings.append(ParamBinding(key, pkey, scaling, ExpertSlice(e, experts, r, (row, row + pshape[0]))))
            row += pshape[0]
        if row != b[0]:
            return [], f"the pieces of expert {e} hold {row} rows but lora_B gives {b[0]}"
    extra = fused.parts[0].replace("*", str(experts), 1)
    if extra in tensors:
        return [], f"the base has more experts than the LoRA's {experts} ('{extra}')"
    return bindings, ""
