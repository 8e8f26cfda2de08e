"""A PEFT LoRA adapter of a diffusers component bound to a single-file checkpoint (headers only).

A PEFT adapter saved on a diffusers model (``FluxTransformer2DModel``, ``UNet2DConditionModel``,
``SD3Transformer2DModel``, a CLIP text encoder) names that model's modules
(``transformer_blocks.0.attn.to_q``). :func:`resolve_single_file` decides which component of the
file the adapter is (the one whose diffusers names hold every module it adapts; ``component``
when the user names it), binds every module as :func:`~adapterfmt.base.resolution.resolve` binds
it to a model directory (same shape rules, PEFT's scaling: ``rank_pattern``, ``alpha_pattern``,
rsLoRA, DoRA), but on a view of the component whose tensors are the diffusers tensors placed by
the generated tables, and then moves each binding to the file's tensor and rows
(:class:`~.checkpoint.Placement`). Refused: DoRA, ``lora_bias``, a full copy or a saved base
tensor on part of a fused tensor; ``target_parameters`` and trainable tokens.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..base.reading import BaseModel
from ..base.resolution import Resolution, resolve
from ..checkpoint.keys import param_key, weight_key
from ..checkpoint.records import AdapterCheckpoint
from ..errors import AdapterFormatError, AmbiguousMatchError, UnsupportedFeatureError
from ..storage.header import TensorInfo
from .checkpoint import Placement, SingleFileBase


def _wanted_keys(adapter: AdapterCheckpoint) -> list[str]:
    """The diffusers tensor keys the adapter changes (LoRA weights, full copies' parameters, saved base tensors)."""
    keys = [weight_key(p) for p in adapter.lora]
    keys += [param_key(p, param) for p, c in adapter.full_copies.items() for param in c.tensors]
    keys += list(adapter.base_override_keys)
    return keys


#: FORMAT §10.4's one alias, for text encoders: transformers 5's ``CLIPTextModel`` has dropped the
#: ``text_model.`` its ``CLIPTextModelWithProjection`` (and the tables, diffusers' names) keep.
_TEXT_MODEL = "text_model."


def _place(view: SingleFileBase, key: str) -> Optional[Placement]:
    """Where the adapter's diffusers ``key`` lies in ``view``'s component: as written, else (a text
    encoder only) with a leading ``text_model.`` dropped, or added."""
    place = view.place_key(key)
    if place is None and view.component.startswith("text_encoder"):
        alias = key[len(_TEXT_MODEL):] if key.startswith(_TEXT_MODEL) else _TEXT_MODEL + key
        place = view.place_key(alias)
    return place


def _holds(view: SingleFileBase, keys: list[str]) -> bool:
    """Whether ``view``'s component has every one of ``keys`` (a placement that raises is there: refused later)."""
    for key in keys:
        try:
            if _place(view, key) is None:
                return False
        except AdapterFormatError:
            continue
    return True


def candidate_components(adapter: AdapterCheckpoint, model: SingleFileBase, component: Optional[str] = None) -> list[str]:
    """The components of ``model`` the PEFT ``adapter`` may be for: ``[component]`` if given (one the
    file holds), else those whose diffusers names hold every module the adapter changes (or, when
    none does, the one that holds the most, whose binding then names what it lacks).

    Raises:
        UnsupportedFeatureError: ``component`` is not one the file holds.
    """
    held = model.components
    if component is not None:
        if component not in held:
            raise UnsupportedFeatureError(f"has no component {component!r} ({model.description}: {', '.join(held)})", path=model.file,
                                          key=component, hint=f"--component is one of {', '.join(held)}")
        return [component]
    keys = _wanted_keys(adapter)
    fits = [c for c in held if _holds(model.view(c), keys)]
    return fits or [max(held, key=lambda c: sum(1 for k in keys if _holds(model.view(c), [k])))]


def _view(model: SingleFileBase, keys: list[str]) -> tuple[BaseModel, dict[str, Placement]]:
    """A base model whose tensors are the diffusers tensors ``keys`` where the file has them, shaped as
    diffusers cuts them, and each one's placement."""
    tensors: dict[str, TensorInfo] = {}
    placed: dict[str, Placement] = {}
    for key in keys:
        place = _place(model, key)
        if place is None:
            continue
        info = model.tensors[place.key]
        tensors[key] = info._replace(key=key, shape=place.shape)
        placed[key] = place
    view = BaseModel(directory=model.directory, config={}, tensors=tensors, shards=list(model.shards), shard_keys={}, findings=list(model.findings))
    return view, placed


def _bind(adapter: AdapterCheckpoint, view: SingleFileBase, keys: list[str]) -> tuple[Resolution, dict[str, Placement]]:
    """:func:`resolve` on the view of ``keys`` in ``view``'s component, and their placements."""
    base, placed = _view(view, keys)
    return resolve(adapter, base), placed


def resolve_single_file(adapter: AdapterCheckpoint, model: SingleFileBase, component: Optional[str] = None) -> tuple[str, Resolution]:
    """The component of ``model`` the PEFT ``adapter`` is for and its binding to the file's tensors and rows.

    Unresolved names and shape errors are in the :class:`~adapterfmt.base.resolution.Resolution`, as
    :func:`~adapterfmt.base.resolution.resolve` leaves them.

    Raises:
        AmbiguousMatchError: the names fit several components and the shapes do not pick one (pass ``component``).
        UnsupportedFeatureError: see :func:`candidate_components`; a LoRA on a module the file
            stores transposed or diffusers does not read.
        UnsupportedFeatureError: DoRA or ``lora_bias`` on part of a fused tensor; a full copy or saved
            base tensor on part of one (named); ``target_parameters``; trainable tokens.
        ShapeMismatchError: a fused tensor of another size than diffusers cuts.
    """
    if adapter.token_deltas:
        raise UnsupportedFeatureError("has trainable tokens, which no single-file checkpoint component adapterfmt places holds",
                                      path=adapter.directory, key=next(iter(adapter.token_deltas)), hint="merge into the diffusers folder of the model instead")
    candidates = candidate_components(adapter, model, component)
    keys = _wanted_keys(adapter) + [param_key(p, "bias") for p, m in adapter.lora.items() if m.lora_bias]
    bound = {c: _bind(adapter, model.view(c), keys) for c in candidates}
    if len(bound) > 1:  # the names fit several components (SDXL's two CLIP encoders): the shapes may decide
        fitting = [c for c, (res, _p) in bound.items() if res.ok]
        if len(fitting) != 1:
            raise AmbiguousMatchError(
                f"the PEFT adapter's module names fit the components {' and '.join(bound)} of {model.file} ({model.description})"
                f"{', and its shapes fit both' if fitting else ', and its shapes fit neither'}",
                path=adapter.directory, key=next(iter(adapter.lora), None), hint=f"pass --component {' or --component '.join(fitting or bound)}",
            )
        bound = {fitting[0]: bound[fitting[0]]}
    (c, (res, placed)), = bound.items()
    if res.param_lora:
        raise UnsupportedFeatureError("adapts parameters (target_parameters), which adapterfmt does not place in a single-file checkpoint",
                                      path=adapter.directory, key=next(iter(res.param_lora)), hint="merge into the diffusers folder of the model instead")
    for path, r in list(res.lora.items()):
        place = placed[r.base_key]
        if place.rows is not None and (r.module.use_dora or r.bias_key is not None):
            what = "DoRA" if r.module.use_dora else "lora_bias"
            raise UnsupportedFeatureError(
                f"{what} on {path!r}, part of the fused tensor {place.key} of {model.file}: adapterfmt does not merge {what} on part of a fused tensor",
                path=adapter.directory, key=path, hint="merge into the diffusers folder of the model instead",
            )
        bias = None
        if r.bias_key is not None:
            bias_place = placed.get(r.bias_key)
            if bias_place is None or bias_place.rows is not None:
                raise UnsupportedFeatureError(f"lora_bias on {path!r}, whose bias is not a whole tensor of {model.file}",
                                              path=adapter.directory, key=path, hint="merge into the diffusers folder of the model instead")
            bias = bias_place.key
        res.lora[path] = replace(r, base_key=place.key, bias_key=bias, rows=place.rows, shape=place.shape if place.rows is not None else None)
    parts = [f"{path}.{param}" for path, bound in res.full_copies.items() for param, key in bound.items() if placed[key].rows is not None]
    parts += [key for key in res.overrides if placed[key].rows is not None]
    parts.sort()
    if parts:
        listed = ", ".join(f"{p} (rows of {placed[p].key})" for p in parts[:4])
        raise UnsupportedFeatureError(
            f"{len(parts)} full-copy or saved base tensor(s) are part of a fused tensor of {model.file}: {listed}{' ...' if len(parts) > 4 else ''}; "
            "replacing part of a fused tensor would change the other modules it holds, so adapterfmt does not merge it",
            path=adapter.directory, key=parts[0], hint="drop them from modules_to_save, or merge into the diffusers folder of the model instead",
        )
    res.full_copies = {path: {param: placed[key].key for param, key in bound.items()} for path, bound in res.full_copies.items()}
    res.overrides = {placed[key].key: saved for key, saved in res.overrides.items()}
    return c, res


__all__ = ["candidate_components", "resolve_single_file"]
