"""Load one component of a kohya / LyCORIS / diffusers LoRA file onto a model in memory (``adapterfmt.load``).

The component's modules are resolved against the model's own module names (FORMAT §10.4) and
become the checkpoint model's records (FORMAT §10.5: LoRA / LoCon as PEFT LoRA modules, LoHa and
LoKr as factor modules), which :func:`adapterfmt.load` hands to the loader every other adapter goes
through; tensors are read straight from the file. The result has PEFT's names
(``lora_A``/``lora_B``; ``hada_*`` / ``lokr_*``) and gives the outputs of diffusers'
``load_lora_weights`` on that component (LyCORIS's forward for LoHa / LoKr).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ..checkpoint.keys import KeyParts, Role, render_saved
from ..checkpoint.records import AdapterCheckpoint
from ..formats.detect import read_foreign
from ..formats.diffusion.components import pick_component
from ..formats.diffusion.names import resolve_names
from ..formats.diffusion.peft_view import component_adapter, refuse_for_load


def component_checkpoint(model: Any, path: "str | os.PathLike[str]", *, component: Optional[str] = None) -> AdapterCheckpoint:
    """The part of a foreign file that ``model`` (one component of the file's pipeline) takes, as
    the checkpoint model's records with names resolved against ``model``'s own modules.

    Args:
        model: the component as a module (a diffusers UNet / transformer, a CLIP text encoder).
        path: a kohya / LyCORIS or diffusers LoRA file (or a folder holding one).
        component: which part of the file; optional when the file adapts one component.

    Raises:
        AmbiguousMatchError, UnresolvedModulesError, UnknownKeyError, UnsupportedFeatureError
        (weight decomposition), InconsistentAdapterError.
    """
    from ..layers.full_copy import plain_module_names

    ckpt = read_foreign(path)
    name = pick_component(ckpt, component, type(model).__name__)
    paths = [n for n, _ in plain_module_names(model) if n]  # a model with adapters already: their modules, not the wrappers' insides
    aliases = None
    if ckpt.format == "kohya" and name == "unet":  # sd-scripts SDXL files name the SGM UNet's modules
        from ..formats.diffusion.sgm_names import sgm_aliases

        aliases = sgm_aliases(paths, dict(getattr(model, "config", None) or {}))
    modules = ckpt.component_modules(name)
    resolve_names(modules, paths, component=name, file=ckpt.file, flattened=ckpt.format == "kohya", aliases=aliases)
    for m in modules:  # the weight's shape checks a dora_scale's axis (the loader checks every factor's)
        weight = getattr(_submodule(model, m.path), "weight", None) if m.path is not None else None
        if weight is not None and hasattr(weight, "shape"):
            m.weight_shape = tuple(weight.shape)
    refuse_for_load(ckpt, [m for m in modules if m.path is not None])
    adapter = component_adapter(ckpt, name, base_modules=paths, factors=True)
    for module_path, m in adapter.lora.items():
        if m.factors is None:  # LoRA / LoCon: PEFT's own lora_A / lora_B (and lora_magnitude_vector), under the keys the loader renders from
            m.keys = {slot: render_saved(KeyParts(module_path, *_PEFT_ROLE[slot]), prefix="") for slot in m.tensors}
    return adapter


#: slot -> (role, param) of the PEFT saved key the loader reads it under
_PEFT_ROLE = {"lora_A": (Role.LORA_A, "weight"), "lora_B": (Role.LORA_B, "weight"), "lora_B.bias": (Role.LORA_B, "bias"),
              "magnitude": (Role.DORA_MAGNITUDE, None)}


def _submodule(model: Any, path: str) -> Any:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
