"""``combine``: several LoRA adapters as one, defined on their deltas (BEHAVIOUR §9.2).

The combined delta of a module is ``Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` over the sources that hold it, each with its
own scale (``lora_alpha`` / r, rsLoRA, ``rank_pattern`` / ``alpha_pattern``), never the A and B
stacks combined separately (which adds cross terms ``Bᵢ·Aⱼ``, peft #3004 / #3013):

* ``cat`` — ``[B₁ … B_k]`` and ``[w₁s₁A₁; …]``, exact at rank ``Σ rᵢ``; the same bits as PEFT's
  ``add_weighted_adapter(..., "cat")`` (``A·w·s`` in that order);
* ``linear`` — the same exact sum, coefficient ``wᵢ·sᵢ`` in one product; with ``--rank``, truncated
  by the exact SVD of the stacked factors (:mod:`.svd`), never the dense product;
* ``svd`` — the exact SVD of the stacked factors: factors ``U√S`` / ``√S·Vᵀ`` at ``Σ rᵢ`` (exact) or
  truncated to ``--rank``;
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` — PEFT's task-arithmetic rules
  (``peft.utils.merge_utils``) applied to each module's dense deltas ``sᵢ·Bᵢ·Aᵢ``, one module at a
  time, then factorized by a dense SVD to ``--rank`` (default ``Σ rᵢ``, at most ``min(m, n)``). DARE's masks come from a
  ``torch.Generator`` seeded from ``--seed``, the source's index and the module's path: the same
  on every run and machine, and independent of which other modules exist.

Every method writes its factors in the output dtype (``--dtype``, float32 by default: BEHAVIOUR §9)
and reports the error of the factors as stored. Modules held by some sources only combine those sources. Full copies, trainable tokens and saved
base tensors are carried when every source holds the same bytes, or from the one source named by
``copies_from``; otherwise refused. Sources must adapt the same base: a module whose delta shapes
differ is refused.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Optional, Sequence

import torch

from ..checkpoint.keys import parse_saved, render_saved
from ..checkpoint.records import AdapterCheckpoint, LoraModule
from ..errors import InvalidConfigError, ShapeMismatchError
from ..formats.peft.reading import read_adapter
from ..storage.header import TensorInfo
from ..storage.staging import check_output_path
from ..storage.tensor_source import TensorReader, TensorSource
from ..storage.torch_io import SAFETENSORS_DTYPES
from .modules import delta_shape, read_factors, refuse_unsupported, require_finite
from .output import DEFAULT_DTYPE, check_dtype, check_scales, numel, output_dtype, scale_one_config, write_peft_directory
from .parallel import map_modules
from .report import AlgebraReport, ModuleRow
from .svd import NonFiniteFactorError, compute_dtype, exact_product_error, factor_svd, stacked, thread_workspace, unflatten_factors

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def check_options(method: str, *, rank: Optional[int], density: Optional[float], majority_sign: str, weights: Sequence[float]) -> None:
    """Refuse a method, rank, density or weight that makes no sense, before anything is read.

    Raises:
        InvalidConfigError: an unknown method or sign rule; a density outside (0, 1], missing for
            ties / dare / magnitude_prune or given to another method; ``--rank`` with ``cat`` or below 1;
            a weight that is not finite.
    """
    if method not in METHODS:
        raise InvalidConfigError(f"unknown combine method {method!r}", key="method", hint=f"use one of {', '.join(METHODS)}")
    if majority_sign not in SIGN_METHODS:
        raise InvalidConfigError(f"unknown majority sign method {majority_sign!r}", key="majority_sign", hint="use total or frequency")
    if method in DENSE_METHODS:
        if density is None:
            raise InvalidConfigError(f"--method {method} needs --density", key="density", hint="the fraction of each delta kept, in (0, 1]")
        if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1):
            raise InvalidConfigError(f"--density must be in (0, 1], got {density!r}", key="density", hint="the fraction of each delta kept")
    elif density is not None:
        raise InvalidConfigError(f"--density applies to {', '.join(DENSE_METHODS)}, not {method}", key="density")
    if rank is not None:
        if method == "cat":
            raise InvalidConfigError("--rank does not apply to cat, which is exact at the sum of the ranks", key="rank",
                                     hint="use --method svd --rank N to truncate")
        if rank < 1:
            raise InvalidConfigError(f"--rank must be at least 1, got {rank}", key="rank")
    for w in weights:
        if not math.isfinite(w):
            raise InvalidConfigError(f"weight {w!r} is not a finite number", key="weight")


def combine(
    sources: Sequence[tuple[str, float]],
    output: "str | os.PathLike[str]",
    *,
    method: str,
    rank: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign: str = "total",
    seed: int = 0,
    copies_from: Optional[int] = None,
    overwrite: bool = False,
    dtype: str = DEFAULT_DTYPE,
) -> AlgebraReport:
    """Combine PEFT LoRA adapters (directories or Hub ids) with weights into one PEFT adapter.

    Args:
        sources: ``(path or Hub id, weight)`` per source.
        copies_from: index into ``sources`` of the one whose full copies / tokens / saved base
            tensors the output carries (otherwise they must be identical in every source).
        dtype: ``fp32`` (default), ``bf16``, ``fp16`` or ``source`` (the module's source factors'
            one dtype), the dtype of the combined factors; errors are measured as stored.

    Raises:
        InvalidConfigError: see :func:`check_options`; ``--rank`` above what the sources hold;
            differing full copies and no ``copies_from``; an unknown ``dtype``, or ``source``
            where a module's source factors differ in dtype.
        ShapeMismatchError: sources for different bases (a module's shapes differ).
        UnsupportedFeatureError: AdaLoRA, LoHa / LoKr, DoRA, ``lora_bias``, ``target_parameters``.
    """
    if not sources:
        raise InvalidConfigError("no source adapters given", hint="pass one or more ADAPTER[:WEIGHT]")
    check_options(method, rank=rank, density=density, majority_sign=majority_sign, weights=[w for _, w in sources])
    check_dtype(dtype)
    if copies_from is not None and not 0 <= copies_from < len(sources):
        raise InvalidConfigError(f"--copies-from {copies_from} names no source", key="copies_from", hint=f"give 0 to {len(sources) - 1}")
    ckpts = [read_adapter(spec) for spec, _ in sources]
    for ckpt, (spec, _) in zip(ckpts, sources):
        refuse_unsupported(ckpt, spec, allow_dora=False, allow_bias=False)
    plan = _plan(ckpts, sources)
    if method in DENSE_METHODS:  # the merged dense delta can have full rank min(m, n)
        most, what = max((min(delta_shape(p[0][1])[0], math.prod(delta_shape(p[0][1])[1:])) for p in plan.values()), default=0), "min(m, n)"
    else:
        most, what = max((sum(m.rank or 0 for _, m in present) for present in plan.values()), default=0), "the sum of their ranks"
    if rank is not None and rank > most:
        raise InvalidConfigError(f"--rank {rank} is above what the sources hold (at most {most} per module, {what})",
                                 key="rank", hint="pick a rank up to that")
    check_output_path(os.fspath(output), [c.directory for c in ckpts], overwrite=overwrite)  # before the work, not after
    extras, extras_doc = _extras(ckpts, sources, copies_from)
    how = {"method": method, "rank": rank, "density": density, "majority_sign": majority_sign if method in ("ties", "dare_ties") else None,
           "seed": seed if method.startswith("dare") else None, "dtype": dtype}
    report = AlgebraReport("combine", "", "peft", [{"path": s, "weight": float(w)} for s, w in sources], how)
    prefix = ckpts[copies_from or 0].prefix  # the LoRA keys spelled like the carried ones
    tensors: dict[str, Any] = dict(extras)
    ranks: dict[str, int] = {}
    readers = [TensorReader(c.tensors_in_memory) for c in ckpts]

    def one(item: tuple[str, list[tuple[int, LoraModule]]]) -> tuple[torch.Tensor, torch.Tensor, ModuleRow]:
        path, present = item
        return _combine_module(path, present, [sources[i][1] for i, _ in present], readers, method=method, rank=rank,
                               density=density, majority_sign=majority_sign, seed=seed, dtype=dtype)

    items = sorted(plan.items())
    try:
        # factor methods: small per-module work, modules side by side; dense methods: one module at a time
        results = map_modules(one, items) if method not in DENSE_METHODS else map(one, items)
        for (path, present), (b, a, row) in zip(items, results):
            first = present[0][1]
            out_b, out_a = unflatten_factors(b, a, tuple(first.tensors["lora_B"].shape), tuple(first.tensors["lora_A"].shape))
            tensors[render_saved(parse_saved(first.keys["lora_B"]), prefix=prefix)] = out_b
            tensors[render_saved(parse_saved(first.keys["lora_A"]), prefix=prefix)] = out_a
            ranks[path] = b.shape[1]
            report.rows.append(row)
    finally:
        for r in readers:
            r.close()
    report.carried = sorted(extras)
    report.params_before = sum(i.numel for c in ckpts for i in c.tensor_infos().values())
    report.params_after = sum(numel(t) for t in tensors.values())
    doc = dict(ckpts[copies_from or 0].config.raw)
    doc.update(extras_doc)
    doc.update({"target_modules": sorted(plan), "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
                "use_dora": False, "lora_bias": False})
    doc = scale_one_config(doc, ranks)
    check_scales(doc, ranks, sources[0][0])
    partial = sum(1 for present in plan.values() if len(present) < len(ckpts))
    if partial:
        report.notes.append(f"{partial} module(s) are held by some sources only: they combine those sources")
    report.notes.append("every module's scale is folded into its factors: lora_alpha = r per module, use_rslora false")
    report.output = write_peft_directory(os.fspath(output), inputs=[c.directory for c in ckpts], overwrite=overwrite, config=doc, tensors=tensors)
    return report


def _plan(ckpts: list[AdapterCheckpoint], sources: Sequence[tuple[str, float]]) -> dict[str, list[tuple[int, LoraModule]]]:
    """module path -> [(source index, module)], after checking that the sources fit one base."""
    plan: dict[str, list[tuple[int, LoraModule]]] = {}
    for i, c in enumerate(ckpts):
        for path, m in c.lora.items():
            plan.setdefault(path, []).append((i, m))
    fan = {bool(c.config.fan_in_fan_out) for c in ckpts}
    if len(fan) > 1:
        raise ShapeMismatchError("sources disagree on fan_in_fan_out (Conv1D layers): they adapt different bases",
                                 path=sources[0][0], hint="combine adapters of one base model")
    for path, present in plan.items():
        i0, m0 = present[0]
        for i, m in present[1:]:
            if delta_shape(m) != delta_shape(m0) or m.layer_kind != m0.layer_kind:
                raise ShapeMismatchError(
                    f"module's delta is {m.layer_kind} {delta_shape(m)} here but {m0.layer_kind} {delta_shape(m0)} in {sources[i0][0]}: "
                    "the sources adapt different bases", path=sources[i][0], key=path, hint="combine adapters of one base model",
                )
    return plan


def _extra_tensors(c: AdapterCheckpoint) -> dict[str, TensorInfo]:
    """Saved key -> tensor of everything that is not a LoRA factor: full copies, saved base tensors, token rows."""
    out: dict[str, TensorInfo] = {}
    for fc in c.full_copies.values():
        out.update({fc.keys[p]: t for p, t in fc.tensors.items()})
    out.update({c.base_override_keys[k]: t for k, t in c.base_overrides.items()})
    out.update({d.key: d.tensor for d in c.token_deltas.values()})
    return out


_EXTRA_FIELDS = ("modules_to_save", "trainable_token_indices")


def _extras(ckpts: list[AdapterCheckpoint], sources: Sequence[tuple[str, float]], copies_from: Optional[int]) -> tuple[dict[str, TensorInfo], dict[str, Any]]:
    """The non-LoRA tensors the output carries, and the config fields that describe them."""
    per = [_extra_tensors(c) for c in ckpts]
    if copies_from is not None:
        c = ckpts[copies_from]
        return per[copies_from], {f: c.config.raw.get(f) for f in _EXTRA_FIELDS}
    if not any(per):
        return {}, {f: None for f in _EXTRA_FIELDS}
    with TensorSource() as src:
        for i, extra in enumerate(per[1:], start=1):
            keys = set(extra) ^ set(per[0])
            differ = sorted(keys) or [k for k in sorted(extra) if not src.same_bytes(extra[k], per[0][k])]
            if differ:
                raise InvalidConfigError(
                    "full copies (modules_to_save), trainable tokens or saved base tensors differ between sources; they cannot be added",
                    path=sources[i][0], key=differ[0], hint="pass --copies-from N to take them from source N (0-based)",
                )
    return per[0], {f: ckpts[0].config.raw.get(f) for f in _EXTRA_FIELDS}


def _combine_module(
    path: str, present: list[tuple[int, LoraModule]], weights: list[float], readers: list[TensorReader], *, method: str,
    rank: Optional[int], density: Optional[float], majority_sign: str, seed: int, dtype: str,
) -> tuple[torch.Tensor, torch.Tensor, ModuleRow]:
    """The combined factors of one module (2-D, output dtype) and its report row."""
    dense = method in DENSE_METHODS
    ws = None if dense else thread_workspace()  # dense methods run on the main thread, one module at a time
    bs, as_, scales = [], [], []
    for j, (i, m) in enumerate(present):
        b, a, _, _ = read_factors(readers[i], m, ws, slot=str(j))
        if dense:
            require_finite(m, b, a)
        bs.append(b)
        as_.append(a)
        scales.append(m.scaling)
    m0 = present[0][1]
    out_dtype = output_dtype(dtype, {t.dtype for t in (*bs, *as_)}, path=m0.tensors["lora_A"].file, key=path)
    dtype_name = SAFETENSORS_DTYPES[out_dtype]
    cdtype = compute_dtype(*{t.dtype for t in (*bs, *as_)})
    total = sum(b.shape[1] for b in bs)
    indices = [i for i, _ in present]
    sb, sa = stacked(bs, as_, [w * s for w, s in zip(weights, scales)], workspace=ws)  # the exact weighted sum, rank Σrᵢ
    if method in ("cat", "linear") and (method == "cat" or rank is None):
        energy = _energy(sb, sa, present, bs, as_)
        if method == "cat":  # PEFT's bits: A·weight·scaling, B unchanged, computed in float32 (float64 for float64 sources)
            nb = torch.cat([b.to(cdtype) for b in bs], dim=1).to(out_dtype)
            na = torch.cat([a.to(cdtype) * w * s for a, w, s in zip(as_, weights, scales)], dim=0).to(out_dtype)
        else:
            nb, na = sb.to(out_dtype, copy=True), sa.to(out_dtype, copy=True)  # sb / sa live in the thread's workspace
        err = exact_product_error(sb, sa, nb, na, energy)
        return nb, na, ModuleRow(path, m0.layer_kind, total, total, 1.0, err, energy**0.5, sources=indices, dtype=dtype_name)
    if method in ("linear", "svd"):
        try:
            f = factor_svd(sb, sa, workspace=ws)
        except NonFiniteFactorError:
            _name_non_finite(present, bs, as_)
            raise
        k = min(rank or total, f.singular_values.shape[0])
        nb, na, err = f.truncate(k, out_dtype, ws)
        return nb, na, ModuleRow(path, m0.layer_kind, total, k, f.retained_energy(k), err, f.energy**0.5, sources=indices, dtype=dtype_name)
    # ties / dare / magnitude_prune: dense deltas of this module only
    deltas = [(b.to(cdtype) @ a.to(cdtype)) * s for b, a, s in zip(bs, as_, scales)]
    gens = [_generator(seed, i, path) for i in indices] if method.startswith("dare") else None
    merged = dense_merge(deltas, weights, method, density or 1.0, majority_sign, gens)
    exact = sb.to(cdtype) @ sa.to(cdtype)
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    k = min(rank or total, s.shape[0])
    root = s[:k].sqrt()
    nb, na = (u[:, :k] * root).to(out_dtype), (root[:, None] * vh[:k]).to(out_dtype)
    s64 = s.double()
    energy = float((s64**2).sum())
    kept = float((s64[:k] ** 2).sum()) / energy if energy else 1.0
    ref = float(torch.linalg.norm(exact.double()))
    err = float(torch.linalg.norm((nb.to(cdtype) @ na.to(cdtype) - exact).double()))
    row = ModuleRow(path, m0.layer_kind, total, k, kept, err / ref if ref else (0.0 if err == 0 else math.inf), ref, sources=indices,
                    method_error=math.sqrt(max(0.0, 1 - kept)), dtype=dtype_name)
    return nb, na, row


def _name_non_finite(present: list[tuple[int, LoraModule]], bs: list[torch.Tensor], as_: list[torch.Tensor]) -> None:
    """Raise :class:`NonFiniteValuesError` naming the first source tensor that holds NaN or Inf (if any)."""
    for (_, m), b, a in zip(present, bs, as_):
        require_finite(m, b, a)


def _energy(sb: torch.Tensor, sa: torch.Tensor, present: list[tuple[int, LoraModule]], bs: list[torch.Tensor], as_: list[torch.Tensor]) -> float:
    """``‖B·A‖²_F`` of the stacked float64 factors from their Grams; a NaN / Inf (seen on their
    diagonals) is named as the source tensor it is in."""
    gb, ga = sb.T @ sb, sa @ sa.T
    if not (bool(torch.isfinite(gb.diagonal()).all()) and bool(torch.isfinite(ga.diagonal()).all())):
        _name_non_finite(present, bs, as_)
    return max(float((gb * ga).sum()), 0.0)


def _generator(seed: int, source: int, module: str) -> torch.Generator:
    """A CPU generator for one source's mask in one module: seeded from ``seed``, the source's
    index and the module path (SHA-256), so every run on every machine draws the same mask."""
    digest = hashlib.sha256(f"{int(seed)}\0{source}\0{module}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def dense_merge(
    deltas: list[torch.Tensor], weights: Sequence[float], method: str, density: float, majority_sign: str,
    generators: Optional[list[torch.Generator]] = None,
) -> torch.Tensor:
    """PEFT's ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` (``peft.utils.merge_utils``)
    on dense deltas, with DARE's masks drawn from ``generators`` (one per delta) instead of the global RNG."""
    if method in ("ties", "magnitude_prune"):
        pruned = [_magnitude_prune(t, density) for t in deltas]
    else:
        assert generators is not None
        pruned = [_random_prune(t, density, g) for t, g in zip(deltas, generators)]
    stack = torch.stack(pruned, dim=0)
    w = torch.tensor(list(weights), dtype=stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
    weighted = stack * w
    if method in ("magnitude_prune", "dare_linear"):
        return weighted.sum(dim=0)
    sign = stack.sign()
    magnitude = stack.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    mask = sign == majority
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """The top ``int(density · numel)`` entries by magnitude (PEFT's ``magnitude_based_pruning``)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Each entry kept with probability ``density`` and rescaled by ``1 / density`` (DARE)."""
    if density >= 1:
        return t
    keep = torch.rand(t.shape, generator=generator, dtype=torch.float32) < density
    return t * keep / density
