"""A Flux.1 single-file checkpoint at the released row counts of its fused tensors (narrow columns),
and the oracle: diffusers' own single-file converter plus PEFT's merge on the converted model.

diffusers' Flux converter hard-codes the 3072 width where it splits ``single_blocks.N.linear1``
(3072 · 3 + 12288 rows), and the generated table records those rows; the columns (the input
width) and every tensor that is only renamed can be small, so one double and one single block
stay a few MB.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import save_file

H, MLP = 3072, 12288
IN = 16  #: the narrow input width of every layer
SMALL = 32  #: rows of tensors diffusers only renames


def flux_state(seed: int = 0, dtype: torch.dtype = torch.float32, *, guidance: bool = True) -> dict[str, torch.Tensor]:
    """BFL names, one double and one single block."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}
    top = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "final_layer.linear"]
    if guidance:
        top += ["guidance_in.in_layer", "guidance_in.out_layer"]
    for name in top:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (SMALL, IN), (SMALL,)
    shapes["final_layer.adaLN_modulation.1.weight"], shapes["final_layer.adaLN_modulation.1.bias"] = (2 * H, IN), (2 * H,)
    d = "double_blocks.0."
    for s in ("img", "txt"):
        for name, rows in ((f"{s}_mod.lin", SMALL), (f"{s}_attn.qkv", 3 * H), (f"{s}_attn.proj", SMALL), (f"{s}_mlp.0", SMALL), (f"{s}_mlp.2", SMALL)):
            shapes[f"{d}{name}.weight"], shapes[f"{d}{name}.bias"] = (rows, IN), (rows,)
        for n in ("query", "key"):
            shapes[f"{d}{s}_attn.norm.{n}_norm.scale"] = (8,)
    b = "single_blocks.0."
    for name, rows in (("linear1", 3 * H + MLP), ("linear2", SMALL), ("modulation.lin", SMALL)):
        shapes[f"{b}{name}.weight"], shapes[f"{b}{name}.bias"] = (rows, IN), (rows,)
    for n in ("query", "key"):
        shapes[f"{b}norm.{n}_norm.scale"] = (8,)
    return {k: torch.randn(v, generator=g).to(dtype) for k, v in sorted(shapes.items())}


def write_flux(path: str, state: dict[str, torch.Tensor], *, prefix: str = "", extra: Optional[dict[str, torch.Tensor]] = None,
               metadata: Optional[dict[str, str]] = None) -> str:
    out = {prefix + k: v for k, v in state.items()}
    out.update(extra or {})
    save_file(out, path, metadata=metadata)
    return path


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own conversion of a single-file state dict (the oracle of every placement)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    return convert_flux_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in state.items()})


class _Tree(torch.nn.Module):
    pass


def module_tree(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module with an ``nn.Linear`` at every 2-D ``X.weight`` of ``state`` (PEFT injects into it)."""
    root = _Tree()
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if param != "weight" or value.dim() != 2:
            continue
        node = root
        parts = module.split(".")
        for p in parts[:-1]:
            if not hasattr(node, p):
                node.add_module(p, _Tree())
            node = getattr(node, p)
        lin = torch.nn.Linear(value.shape[1], value.shape[0], bias=f"{module}.bias" in state, dtype=value.dtype)
        with torch.no_grad():
            lin.weight.copy_(value)
            if lin.bias is not None:
                lin.bias.copy_(state[f"{module}.bias"])
        node.add_module(parts[-1], lin)
    return root


def peft_merged(state: dict[str, torch.Tensor], factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float = 1.0) -> dict[str, torch.Tensor]:
    """PEFT's ``merge_and_unload`` of LoRA ``{module: (A, B)}`` on the module tree of a diffusers state dict."""
    from peft import LoraConfig, get_peft_model

    model = module_tree(state)
    r = next(iter(factors.values()))[0].shape[0]
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=r * scaling, target_modules=sorted(factors), init_lora_weights=False))
    with torch.no_grad():
        for module, (a, b) in factors.items():
            layer = peft.base_model.model.get_submodule(module)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    merged = peft.merge_and_unload()
    out = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return {k: out.get(k, v) for k, v in state.items()}
