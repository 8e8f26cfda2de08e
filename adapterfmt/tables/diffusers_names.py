"""The older diffusers LoRA key spellings, renamed to PEFT's exactly as diffusers renames them (FORMAT §10.2).

Files written by diffusers' training scripts before its PEFT backend (~2023) name the UNet's
tensors ``<attn>.processor.to_q_lora.down.weight`` (attention processors) or
``<module>.lora.down.weight`` (``LoRACompatible`` layers), and the text encoders'
``<attn>.q_proj.lora_linear_layer.down.weight``. diffusers renames them by string replacement
with tables that ``scripts/gen_diffusers_tables.py`` copies from the pinned diffusers into
``adapterfmt/tables/diffusers_tables.json``; this module applies them the way diffusers'
``convert_state_dict`` does: each ``always_replace`` pattern first (``.processor.`` -> ``.``), then
the first pattern of a table (in its order) that occurs in the key, every occurrence, and no other.
A chain applies its tables in turn. The UNet has one chain; a text encoder's chain is chosen by
a marker any key of the component contains (``to_out_lora``, else ``lora_linear_layer``), as
diffusers infers the state dict type; with neither, diffusers refuses the component.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Optional

#: The table family each component's older spellings use (``transformer`` never had any).
FAMILIES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder"}

Chain = list[list[list[str]]]


@functools.lru_cache(maxsize=1)
def tables() -> dict[str, Any]:
    """The generated tables (``diffusers_tables.json`` in the package), read once."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "diffusers_tables.json"), encoding="utf-8") as f:
        return json.load(f)


def _chains(family: str) -> list[tuple[Optional[str], Chain]]:
    """``(marker, chain)`` per way diffusers may rename the family's keys (marker ``None``: always)."""
    return [(entry["marker"], entry["chain"]) for entry in tables()[family]]


def _convert(key: str, table: list[list[str]]) -> str:
    """diffusers' ``convert_state_dict`` on one key."""
    for pattern, replacement in tables()["always_replace"]:
        if pattern in key:
            key = key.replace(pattern, replacement)
    for pattern, replacement in table:
        if pattern in key:
            return key.replace(pattern, replacement)
    return key


def rename(key: str, chain: Chain) -> str:
    """``key`` as diffusers names it after applying each table of ``chain`` in turn."""
    for table in chain:
        key = _convert(key, table)
    return key


def candidate_renames(family: str, key: str) -> list[str]:
    """Every name one of the family's chains gives ``key`` (the key itself excluded)."""
    out = []
    for _, chain in _chains(family):
        new = rename(key, chain)
        if new != key and new not in out:
            out.append(new)
    return out


def component_chain(family: str, keys: list[str]) -> Optional[Chain]:
    """The chain diffusers applies to a component with these keys (its prefix removed); ``None``
    when diffusers cannot tell (a text encoder with neither marker: it refuses the component)."""
    for marker, chain in _chains(family):
        if marker is None or any(marker in k for k in keys):
            return chain
    return None
