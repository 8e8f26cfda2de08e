"""Load one component of a kohya / diffusers LoRA file onto a model in memory (``adapterfmt.load``).

The component's modules are resolved against the model's own module names (FORMAT §10.4), turned
into PEFT's saved keys and config (FORMAT §10.5), and handed to :func:`adapterfmt.load` as a state
dict with its config — the loader every other adapter goes through. The result has PEFT's names
and gives the outputs of diffusers' ``load_lora_weights`` on that component.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from ..constants import DEFAULT_ADAPTER_NAME
from ..errors import NonFiniteValuesError
from .components import pick_component
from .detect import read_foreign
from .names import resolve_names
from .peft_view import component_adapter


def load_foreign(
    model: Any, path: "str | os.PathLike[str]", *, component: Optional[str] = None, adapter_name: str = DEFAULT_ADAPTER_NAME,
    is_trainable: bool = False,
) -> Any:
    """Wrap ``model`` (the component ``component`` of the file's pipeline) with the file's LoRA modules.

    Args:
        model: the component as a module (a diffusers UNet / transformer, a CLIP text encoder).
        path: a kohya / LyCORIS or diffusers LoRA file.
        component: which part of the file; optional when the file adapts one component.

    Returns:
        :func:`adapterfmt.load`'s handle.

    Raises:
        AmbiguousMatchError, UnresolvedModulesError, UnknownKeyError, UnsupportedFeatureError (LoHa,
        LoKr and Tucker cores are not loadable yet), InconsistentAdapterError, NonFiniteValuesError
        (a factor or ``alpha`` holds NaN or Inf).
    """
    from ..loading import load
    from ..tensor_source import TensorReader

    ckpt = read_foreign(path)
    name = pick_component(ckpt, component, type(model).__name__)
    paths = [n for n, _ in model.named_modules() if n]
    aliases = None
    if ckpt.format == "kohya" and name == "unet":  # sd-scripts SDXL files name the SGM UNet's modules
        from .sgm_names import sgm_aliases

        aliases = sgm_aliases(paths, dict(getattr(model, "config", None) or {}))
    resolve_names(ckpt.component_modules(name), paths, component=name, file=ckpt.file, flattened=ckpt.format == "kohya", aliases=aliases)
    adapter = component_adapter(ckpt, name, base_modules=paths)
    state, file_keys = {}, {}
    with TensorReader() as reader:
        for module_path, m in adapter.lora.items():
            for slot in ("lora_A", "lora_B"):
                key = f"{module_path}.{slot}.weight"
                state[key], file_keys[key] = reader.get(m.tensors[slot]), m.keys[slot]
    try:
        return load(model, state, adapter_name, is_trainable, config=dict(adapter.config.raw))
    except NonFiniteValuesError as e:  # name the file and its own key, not the rebuilt state dict's
        if e.key not in file_keys:
            raise
        raise NonFiniteValuesError(e.message, path=ckpt.file, key=file_keys[e.key], hint=e.hint) from None
