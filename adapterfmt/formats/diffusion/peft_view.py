"""One component of a foreign file as the checkpoint model's own :class:`~adapterfmt.formats.peft.reading.AdapterCheckpoint`.

A kohya / LyCORIS LoRA (LoCon) module is PEFT's LoRA under other names: ``lora_down`` is
``lora_A`` and ``lora_up`` is ``lora_B``, with the same shapes for Linear and Conv layers, and
its scale ``alpha / rank`` is PEFT's. So once its names are resolved (:mod:`.names`), a
component's LoRA modules become :class:`~adapterfmt.formats.peft.reading.LoraModule` records whose tensors
are the foreign file's byte ranges, under a config rebuilt like a wrapped checkpoint's (§9.2):
``r`` / ``rank_pattern`` from the tensors, and each module's effective alpha
(``scale · rank``; alpha = rank where the file has none) as ``lora_alpha`` / ``alpha_pattern``.
The merge engine, the loader and the converter then treat it like any PEFT adapter.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Optional

from ...checkpoint.config import parse_config
from ...checkpoint.config_rebuild import exact_pattern, rebuild_config
from ...checkpoint.records import AdapterCheckpoint, LoraModule
from ...errors import (
    InconsistentAdapterError,
    InvalidConfigError,
    NonFiniteValuesError,
    UnknownKeyError,
    UnresolvedModulesError,
    UnsupportedFeatureError,
)
from ...storage.header import TensorInfo
from .records import DIFF, LOKR, LORA, ForeignCheckpoint, ForeignModule

_LAYER_KIND = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}


def effective_alpha(m: ForeignModule) -> float:
    """The ``lora_alpha`` that gives PEFT's scale ``alpha / r`` the module's own scale."""
    rank = m.rank or 1
    return m.scaling * rank


def refuse_unusable(ckpt: ForeignCheckpoint, modules: list[ForeignModule], *, lora_only: bool) -> None:
    """Raise for anything of ``modules`` (one component) that cannot be applied exactly.

    Raises:
        UnknownKeyError: the file has keys its grammar does not explain (never dropped silently).
        UnresolvedModulesError: a module name did not resolve against the base.
        InconsistentAdapterError: a module lacks a factor.
        NonFiniteValuesError: a module's ``alpha`` scalar is NaN or infinite (its factors are
            checked where they are read: merge and load refuse them the same way).
        UnsupportedFeatureError: LyCORIS ``dora_scale``, diffusers DoRA / ``lora_B`` biases; with
            ``lora_only`` also LoHa, LoKr and LoCon Tucker cores (PEFT's LoRA has no place for them).
    """
    if ckpt.unknown_keys:
        raise UnknownKeyError(
            f"{len(ckpt.unknown_keys)} tensor(s) fit no rule of the {ckpt.format} grammar", path=ckpt.file, key=ckpt.unknown_keys[0],
            hint="adapterfmt applies every tensor of a file or none; remove them from the file",
        )
    unresolved = [m.name for m in modules if m.path is None]
    if unresolved:
        raise UnresolvedModulesError(
            f"{len(unresolved)} of {len(modules)} {modules[0].component} module names match no module of the base",
            path=ckpt.file, key=unresolved[0], hint="is this the base the adapter was trained on? `adapterfmt inspect FILE --base DIR` lists them",
        )
    for m in modules:
        key = next(iter(m.keys.values()), m.name)
        if m.problem is not None:
            raise InconsistentAdapterError(m.problem, path=ckpt.file, key=key, hint="the file is damaged or incomplete; re-export it")
        if m.alpha is not None and not math.isfinite(m.alpha):
            raise NonFiniteValuesError(
                f"alpha is {m.alpha}; applying the module would corrupt the model", path=ckpt.file, key=m.alpha_key or key,
                hint="the adapter is broken (`adapterfmt inspect --scan` lists every such tensor)",
            )
        if m.alpha is not None and m.alpha < 0:
            raise InvalidConfigError(
                f"alpha is {m.alpha:g}; a negative alpha flips the adapter's sign, which adapterfmt does not apply", path=ckpt.file,
                key=m.alpha_key or key, hint="the file is damaged, or was written with a sign convention adapterfmt does not know",
            )
        if m.dora_scale is not None:
            why = dora_scale_problem(m, lora_only=lora_only)
            if why:
                raise UnsupportedFeatureError(why, path=ckpt.file, key=m.dora_scale.key,
                                              hint="merge it (adapterfmt merge applies the output-axis form exactly, as PEFT's use_dora)" if lora_only else None)
        if "magnitude" in m.tensors or "lora_up.bias" in m.tensors:
            raise UnsupportedFeatureError(
                "weight decomposition (DoRA) and lora_B biases in diffusers files are not supported", path=ckpt.file, key=key
            )
        if lora_only and (m.kind == DIFF or "diff_b" in m.tensors):
            raise UnsupportedFeatureError(
                "a ComfyUI full delta (.diff / .diff_b) has no PEFT LoRA form (adapterfmt.load and convert need one)",
                path=ckpt.file, key=m.keys.get("diff", m.keys.get("diff_b", key)), hint="merge it instead (adapterfmt merge adds it as it is)",
            )
        if lora_only and (m.kind != LORA or "lora_mid" in m.tensors):
            what = "a LoCon Tucker core (lora_mid)" if m.kind == LORA else m.kind.upper()
            raise UnsupportedFeatureError(
                f"{what} has no PEFT LoRA form (adapterfmt.load and convert to LoRA need one)",
                path=ckpt.file, key=key, hint="merge it instead, or convert it to PEFT's own LOHA/LOKR (docs/BEHAVIOUR.md §7.4)",
            )
    if lora_only:
        refuse_mixed_dora(ckpt, modules)


def refuse_for_load(ckpt: ForeignCheckpoint, modules: list[ForeignModule]) -> None:
    """What ``adapterfmt.load`` has no PEFT layer for (LoHa / LoKr it loads as PEFT's own): ComfyUI's
    full deltas, and ``dora_scale`` outside the output-axis form on Linear LoRA modules of every module.

    Raises:
        UnsupportedFeatureError: naming the key.
    """
    for m in modules:
        if m.kind == DIFF or "diff_b" in m.tensors:
            raise UnsupportedFeatureError(
                "a ComfyUI full delta (.diff / .diff_b) has no PEFT layer (adapterfmt.load needs one)", path=ckpt.file,
                key=m.keys.get("diff", m.keys.get("diff_b", m.name)), hint="merge it instead (adapterfmt merge adds it as it is)",
            )
        if m.dora_scale is not None and m.kind == LORA:
            why = dora_scale_problem(m, lora_only=True)
            if why:
                raise UnsupportedFeatureError(why, path=ckpt.file, key=m.dora_scale.key,
                                              hint="merge it (adapterfmt merge applies the output-axis form exactly, as PEFT's use_dora)")
    refuse_mixed_dora(ckpt, modules)


def refuse_mixed_dora(ckpt: ForeignCheckpoint, modules: list[ForeignModule]) -> None:
    """PEFT's ``use_dora`` is one flag for every LoRA module of an adapter: a file whose ``dora_scale``
    covers some LoRA modules only has no PEFT form (merge applies it module by module).

    Raises:
        UnsupportedFeatureError: naming a module with and one without ``dora_scale``.
    """
    lora = [m for m in modules if m.kind == LORA and "lora_mid" not in m.tensors]
    with_dora = [m for m in lora if m.dora_scale is not None]
    if with_dora and len(with_dora) != len(lora):
        without = next(m for m in lora if m.dora_scale is None)
        raise UnsupportedFeatureError(
            f"dora_scale on some LoRA modules only ({with_dora[0].name!r} has one, {without.name!r} none): PEFT's use_dora applies to "
            "every module of an adapter, so adapterfmt.load and convert have no exact form for it",
            path=ckpt.file, key=with_dora[0].dora_scale.key,  # type: ignore[union-attr]
            hint="merge it instead (adapterfmt merge applies dora_scale module by module)",
        )


def dora_scale_problem(m: ForeignModule, *, lora_only: bool) -> Optional[str]:
    """Why a LyCORIS ``dora_scale`` cannot be applied, or ``None``.

    LyCORIS' output-axis form (``wd_on_out``, its default since 2025-04: shape ``(out, 1, ...)``)
    is PEFT's ``lora_magnitude_vector``: at multiplier 1 the merged weight is
    ``m · (W + s·B·A) / ‖W + s·B·A‖`` per output row. The old input-axis form ``(1, in, ...)``
    normalises over the other axis, which PEFT's DoRA has no form for.
    """
    assert m.dora_scale is not None
    shape = tuple(m.dora_scale.shape)
    if m.kind != LORA or "lora_mid" in m.tensors:
        return f"dora_scale on a {m.kind.upper() if m.kind != LORA else 'LoCon Tucker'} module is not supported"
    if lora_only and len(m.tensors["lora_down"].shape) != 2:
        return ("dora_scale on a convolution: adapterfmt.load and convert map it to PEFT's lora_magnitude_vector for Linear "
                "layers only (merge applies it)")
    out = m.weight_shape[0] if m.weight_shape else None
    if len(shape) >= 2 and shape[0] == 1 and (out is None or out != 1) and any(d != 1 for d in shape[1:]):
        return (f"dora_scale {list(shape)} is LyCORIS' old input-axis form (wd_on_out=False): it normalises over the output "
                "axis, which PEFT's DoRA does not; re-export with a LyCORIS that writes the output-axis form (out, 1)")
    if not shape or (out is not None and shape[0] != out) or any(d != 1 for d in shape[1:]):
        return f"dora_scale {list(shape)} fits no output axis of the weight {list(m.weight_shape or ())}"
    return None


def component_adapter(
    ckpt: ForeignCheckpoint,
    component: Optional[str],
    *,
    base_modules: "list[str]" = (),  # type: ignore[assignment]
    name: str = "default",
    factors: bool = False,
) -> AdapterCheckpoint:
    """The modules of ``component`` as an :class:`AdapterCheckpoint` (names must be resolved).

    Args:
        base_modules: every module path of the component (keeps ``target_modules`` exact, §9.2).
        factors: also take LoHa, LoKr and Tucker LoCon modules, as factor modules
            (:attr:`LoraModule.factors`), which the merge engine merges and nothing else reads.

    Raises:
        see :func:`refuse_unusable` (``lora_only`` unless ``factors``).
    """
    modules = ckpt.component_modules(component)
    if not modules:
        raise UnresolvedModulesError(f"has no modules for component {component!r}", path=ckpt.file, hint=f"it adapts {', '.join(ckpt.components)}")
    refuse_unusable(ckpt, modules, lora_only=not factors)
    entries = (ckpt.configs[""].get("modules_to_save") or []) if ckpt.format == "peft" else []  # PEFT LoHa / LoKr (vetted when read)
    lora = [m for m in modules if m.kind == LORA and "lora_mid" not in m.tensors]
    use_dora = bool(lora) and all(m.dora_scale is not None for m in lora)  # PEFT's one flag (mixed files: merge only)
    doc = peft_config_document(modules, base_modules=list(base_modules), modules_to_save=list(entries), use_dora=use_dora)
    config = parse_config(doc, path=f"{ckpt.file}[{component}]")
    adapter = AdapterCheckpoint(
        name=name, directory=os.path.abspath(ckpt.file), config=config, weights_file=ckpt.file, prefix="",
        metadata=dict(ckpt.metadata),
        # PEFT LoHa / LoKr only (FORMAT §10.6): full copies and saved base tensors
        full_copies=dict(ckpt.full_copies), base_overrides=dict(ckpt.base_overrides), base_override_keys=dict(ckpt.base_override_keys),
    )
    for m in modules:
        assert m.path is not None
        if m.split is not None and m.kind == DIFF:  # a full delta on a fused name: its rows (and bias rows) per part
            for part, first, end in m.split:
                tensors = {("lora_B.bias" if slot == "diff_b" else slot): row_slice(info, first, end) for slot, info in m.tensors.items()}
                adapter.lora[part] = _diff_module(m, part, config, tensors)
            continue
        if m.split is not None:  # a fused single-file name on a diffusers base: one LoRA per part
            down, up = m.tensors["lora_down"], m.tensors["lora_up"]
            for part, first, end in m.split:
                adapter.lora[part] = LoraModule(
                    path=part, layer_kind="linear", rank=m.rank, config_rank=config.rank_for(part), alpha=config.alpha_for(part),
                    scaling=m.scaling, use_dora=False, lora_bias=False, tensors={"lora_A": down, "lora_B": row_slice(up, first, end)},
                    keys={"lora_A": m.keys["lora_down"], "lora_B": m.keys["lora_up"]},
                )
                _add_diff_b(adapter.lora[part], m, (first, end))
            continue
        if m.kind == DIFF:
            adapter.lora[m.path] = _diff_module(m, m.path, config, {("lora_B.bias" if slot == "diff_b" else slot): info for slot, info in m.tensors.items()})
            continue
        if m.kind != LORA or "lora_mid" in m.tensors:
            adapter.lora[m.path] = LoraModule(
                path=m.path, layer_kind=m.layer_kind or "unknown", rank=m.rank, config_rank=config.rank_for(m.path),
                alpha=config.alpha_for(m.path), scaling=m.scaling, use_dora=False, lora_bias=False,
                tensors=dict(m.tensors), keys=dict(m.keys), factors=m.kind, peft_kron=m.kind == LOKR and ckpt.format == "peft",
            )
            continue
        down, up = m.tensors["lora_down"], m.tensors["lora_up"]
        tensors, keys = {"lora_A": down, "lora_B": up}, {"lora_A": m.keys["lora_down"], "lora_B": m.keys["lora_up"]}
        if m.dora_scale is not None:  # output-axis dora_scale = PEFT's magnitude vector (out,), the same bytes
            tensors["magnitude"], keys["magnitude"] = m.dora_scale._replace(shape=(m.dora_scale.shape[0],)), m.dora_scale.key
        adapter.lora[m.path] = LoraModule(
            path=m.path, layer_kind=_LAYER_KIND.get(len(down.shape), "unknown"), rank=m.rank, config_rank=config.rank_for(m.path),
            alpha=config.alpha_for(m.path), scaling=m.scaling, use_dora=m.dora_scale is not None, lora_bias=False, tensors=tensors, keys=keys,
        )
        _add_diff_b(adapter.lora[m.path], m, None)
    return adapter


def _diff_module(m: ForeignModule, path: str, config: "object", tensors: "dict[str, TensorInfo]") -> LoraModule:
    """A ComfyUI full delta as a factor module of kind ``diff``: the ``.diff`` added to the weight and
    the ``.diff_b`` to the bias (``lora_B.bias``, ``lora_bias``), both as they are (scale 1)."""
    keys = {("lora_B.bias" if slot == "diff_b" else slot): key for slot, key in m.keys.items()}
    return LoraModule(
        path=path, layer_kind=m.layer_kind or "linear", rank=None, config_rank=config.rank_for(path), alpha=config.alpha_for(path),  # type: ignore[attr-defined]
        scaling=1.0, use_dora=False, lora_bias="lora_B.bias" in tensors, tensors=tensors, keys=keys, factors=DIFF, bias_scaling=1.0,
    )


def _add_diff_b(module: LoraModule, m: ForeignModule, rows: "Optional[tuple[int, int]]") -> None:
    """A ComfyUI ``.diff_b`` beside a LoRA's factors: PEFT's ``lora_B.bias`` (``lora_bias``), added
    with weight 1 whatever the LoRA's ``alpha / rank`` (diffusers' Wan converter folds the alpha
    into the factors and keeps the bias as it is; ComfyUI adds it as it is)."""
    if "diff_b" not in m.tensors:
        return
    info = m.tensors["diff_b"]
    module.tensors["lora_B.bias"] = row_slice(info, *rows) if rows is not None else info
    module.keys["lora_B.bias"] = m.keys["diff_b"]
    module.lora_bias, module.bias_scaling = True, 1.0


def row_slice(info: TensorInfo, first: int, end: int) -> TensorInfo:
    """Rows ``first:end`` of a stored tensor, as the byte range they occupy (rows are contiguous)."""
    row = info.nbytes // info.shape[0]
    return TensorInfo(info.key, info.file, info.dtype, (end - first, *info.shape[1:]), info.start + first * row, info.start + end * row)


def _module_paths(modules: list[ForeignModule]) -> list[tuple[ForeignModule, str]]:
    """``(module, path)`` for every adapter module a foreign module becomes (a split one: one per part)."""
    return [(m, p) for m in modules if m.path is not None for p in ([s[0] for s in m.split] if m.split else [m.path])]


def peft_config_document(
    modules: list[ForeignModule], *, base_modules: "list[str]", peft_type: str = "LORA", modules_to_save: "list[str]" = (),  # type: ignore[assignment]
    use_dora: bool = False,
) -> dict:
    """``adapter_config.json`` for resolved modules: exact targets, ranks and per-module alphas,
    and the adapter's own ``modules_to_save`` entries (a PEFT LoHa / LoKr adapter's); ``use_dora``:
    every LoRA module carries LyCORIS' output-axis ``dora_scale`` (PEFT's ``lora_magnitude_vector``)."""
    ranks = {p: int(m.rank or 1) for m, p in _module_paths(modules)}
    alphas = {p: effective_alpha(m) for m, p in _module_paths(modules)}
    counts = Counter(alphas.values())
    lora_alpha: Optional[float] = min(counts, key=lambda a: (-counts[a], a)) if counts else None
    doc = rebuild_config(ranks, full_copies=list(modules_to_save), use_dora=use_dora, lora_bias=False, fan_in_fan_out=False, base_modules=base_modules, alpha=lora_alpha)
    doc["alpha_pattern"] = {exact_pattern(p): a for p, a in sorted(alphas.items()) if a != lora_alpha}
    doc["peft_type"] = peft_type
    return doc
