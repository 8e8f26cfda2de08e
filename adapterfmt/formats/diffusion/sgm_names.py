"""The SGM / LDM names of a diffusers UNet's modules, for kohya files written against SGM names.

sd-scripts trains SDXL on the original (SGM) UNet, so its files say
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` where the diffusers UNet has
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``. Rather than parsing such names,
every real module path of the diffusers UNet is given its SGM name (a function of the path and
``layers_per_block`` in the UNet's ``config.json``), and a kohya name that matches no module
directly is resolved against these aliases with the same exact rule (FORMAT §10.4):

* ``down_blocks.b.resnets.j`` / ``.attentions.j`` → ``input_blocks.{1 + b·(L+1) + j}.0`` / ``.1``;
  ``down_blocks.b.downsamplers.0.conv`` → ``input_blocks.{1 + b·(L+1) + L}.0.op``;
* ``mid_block.resnets.0`` / ``.attentions.0`` / ``.resnets.1`` → ``middle_block.0`` / ``.1`` / ``.2``;
* ``up_blocks.b.resnets.j`` / ``.attentions.j`` → ``output_blocks.{b·(L+1) + j}.0`` / ``.1`` (an up
  block has ``L + 1`` layers); ``up_blocks.b.upsamplers.0.conv`` →
  ``output_blocks.{b·(L+1) + L}.{2 if the block has attentions else 1}.conv``;
* inside a resnet: ``norm1``/``conv1``/``time_emb_proj``/``norm2``/``conv2``/``conv_shortcut`` →
  ``in_layers.0``/``in_layers.2``/``emb_layers.1``/``out_layers.0``/``out_layers.3``/``skip_connection``;
* ``conv_in`` → ``input_blocks.0.0``, ``time_embedding.linear_1``/``_2`` → ``time_embed.0``/``.2``,
  ``add_embedding.linear_1``/``_2`` → ``label_emb.0.0``/``.0.2``, ``conv_norm_out``/``conv_out`` → ``out.0``/``out.2``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _layers_per_block(config: dict[str, Any]) -> Optional[int]:
    lpb = config.get("layers_per_block")
    if isinstance(lpb, list) and lpb and all(x == lpb[0] for x in lpb):
        lpb = lpb[0]
    return lpb if isinstance(lpb, int) and not isinstance(lpb, bool) else None


def _inner(kind: str, rest: Optional[str]) -> Optional[str]:
    if rest is None:
        return ""
    if kind == "resnets":
        head, dot, tail = rest.partition(".")
        return _RESNET[head] + (dot + tail if dot else "") if head in _RESNET else None
    return rest


def sgm_name(path: str, lpb: int, up_with_attention: set[int]) -> Optional[str]:
    """The SGM name of the diffusers UNet module ``path``, ``None`` when it has none."""
    if path in _TOP:
        return _TOP[path]
    m = _MID.match(path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}.get((kind, j))
        inner = _inner(kind, rest)
        return None if index is None or inner is None else f"middle_block.{index}" + (f".{inner}" if inner else "")
    m = _BLOCK.match(path)
    if not m:
        return None
    side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    inner = _inner(kind, rest)
    if inner is None:
        return None
    if side == "down_blocks":
        if kind == "downsamplers":
            base, inner = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0", ("op" if inner == "conv" else None)
        else:
            base = f"input_blocks.{1 + b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}"
    elif kind == "upsamplers":
        base = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in up_with_attention else 1}"
    else:
        base = f"output_blocks.{b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}"
    if inner is None:
        return None
    return base + (f".{inner}" if inner else "")


def sgm_aliases(paths: Iterable[str], config: dict[str, Any]) -> dict[str, str]:
    """SGM name -> diffusers module path for every module of a diffusers UNet (``{}`` when its
    ``config.json`` does not give one ``layers_per_block``)."""
    paths = list(paths)
    lpb = _layers_per_block(config)
    if lpb is None:
        return {}
    up_with_attention = {int(p.split(".")[1]) for p in paths if p.startswith("up_blocks.") and ".attentions." in p}
    out = {}
    for p in paths:
        name = sgm_name(p, lpb, up_with_attention)
        if name is not None:
            out[name] = p
    return out
