"""The placement table is diffusers' own conversion, regenerated from the pinned diffusers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adapterfmt.single_file.checkpoint import fused_parts, own_module_names
from adapterfmt.tables.single_file_names import diffusers_names_of, from_single_file, to_single_file

REPO = Path(__file__).resolve().parents[2]


def test_tables_match_the_pinned_diffusers() -> None:
    spec = importlib.util.spec_from_file_location("gen_single_file_tables", REPO / "scripts" / "gen_single_file_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (REPO / "adapterfmt" / "tables" / "single_file_tables.json").read_text(encoding="utf-8")
    assert module.build() == shipped, "adapterfmt/tables/single_file_tables.json is stale: run `python scripts/gen_single_file_tables.py`"


def test_lookups_both_ways_at_any_block() -> None:
    seg = to_single_file("flux", "transformer", "single_transformer_blocks.37.proj_mlp.weight")
    assert [tuple(s)[:4] for s in seg] == [("single_blocks.37.linear1.weight", 9216, 21504, 21504)]
    assert [tuple(s)[:4] for s in to_single_file("flux", "transformer", "norm_out.linear.weight")] == [
        ("final_layer.adaLN_modulation.1.weight", 3072, 6144, 6144), ("final_layer.adaLN_modulation.1.weight", 0, 3072, 6144)]
    assert to_single_file("flux", "transformer", "transformer_blocks.3.attn.to_out.0.weight")[0].key == "double_blocks.3.img_attn.proj.weight"
    assert to_single_file("flux", "transformer", "no.such.weight") is None
    assert [d for d, _a, _b in from_single_file("flux", "transformer", "double_blocks.18.txt_attn.qkv.weight")] == [
        "transformer_blocks.18.attn.add_q_proj.weight", "transformer_blocks.18.attn.add_k_proj.weight", "transformer_blocks.18.attn.add_v_proj.weight"]
    assert fused_parts("flux", "transformer", "final_layer.adaLN_modulation.1") == []  # a permutation is not a split
    own = own_module_names("flux", "transformer", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0"])
    assert own["double_blocks.0.img_attn.proj"] == ("transformer_blocks.0.attn.to_out.0", [])
    assert own["double_blocks.0.img_attn.qkv"][0] is None and len(own["double_blocks.0.img_attn.qkv"][1]) == 3


def test_sd3_equal_parts_and_its_last_block() -> None:
    """SD3's fused tensors are cut into equal parts at any width; the last joint block's
    ``context_block.adaLN_modulation.1`` has its halves swapped (diffusers' ``context_pre_only``
    block), the others are renamed whole."""
    assert [(s.key, s.chunk) for s in to_single_file("sd3", "transformer", "transformer_blocks.7.attn.add_v_proj.weight")] == [
        ("joint_blocks.7.context_block.attn.qkv.weight", (2, 3))]
    regular = to_single_file("sd3", "transformer", "transformer_blocks.7.norm1_context.linear.weight", last=23)
    assert [(s.key, s.chunk) for s in regular] == [("joint_blocks.7.context_block.adaLN_modulation.1.weight", None)]
    last = to_single_file("sd3", "transformer", "transformer_blocks.23.norm1_context.linear.weight", last=23)
    assert [(s.key, s.chunk) for s in last] == [("joint_blocks.23.context_block.adaLN_modulation.1.weight", (1, 2)),
                                                ("joint_blocks.23.context_block.adaLN_modulation.1.weight", (0, 2))]
    assert from_single_file("sd3", "transformer", "joint_blocks.2.x_block.attn.qkv.weight", rows=4608) == [
        ("transformer_blocks.2.attn.to_q.weight", 0, 1536), ("transformer_blocks.2.attn.to_k.weight", 1536, 3072),
        ("transformer_blocks.2.attn.to_v.weight", 3072, 4608)]
    assert from_single_file("sd3", "transformer", "joint_blocks.2.x_block.attn.qkv.weight", rows=4607) == []  # no equal thirds
    assert diffusers_names_of("sd3", "transformer", "joint_blocks.23.context_block.adaLN_modulation.1.weight", last=23) == [
        "transformer_blocks.23.norm1_context.linear.weight"]


def test_wan_single_file_names_and_lora_converter_names() -> None:
    """A Wan single file's tensors are renamed whole (``norm3`` is diffusers' ``norm2``); a ComfyUI
    LoRA name maps where diffusers' LoRA converter puts it, which has no ``norm3``."""
    assert [tuple(s)[:3] for s in to_single_file("wan", "transformer", "blocks.29.attn2.add_k_proj.weight")] == [
        ("blocks.29.cross_attn.k_img.weight", 0, None)]
    assert to_single_file("wan", "transformer", "blocks.3.norm2.weight")[0].key == "blocks.3.norm3.weight"
    own = own_module_names("wan", "transformer", ["blocks.12.attn1.to_out.0", "blocks.12.norm2", "proj_out", "condition_embedder.time_proj"])
    assert own == {"blocks.12.self_attn.o": ("blocks.12.attn1.to_out.0", []), "head.head": ("proj_out", []),
                   "time_projection.1": ("condition_embedder.time_proj", [])}
