"""The placement table is diffusers' own conversion, regenerated from the pinned diffusers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adapterfmt.single_file.checkpoint import fused_parts, own_module_names
from adapterfmt.tables.single_file_names import from_single_file, to_single_file

REPO = Path(__file__).resolve().parents[2]


def test_tables_match_the_pinned_diffusers() -> None:
    spec = importlib.util.spec_from_file_location("gen_single_file_tables", REPO / "scripts" / "gen_single_file_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (REPO / "adapterfmt" / "tables" / "single_file_tables.json").read_text(encoding="utf-8")
    assert module.build() == shipped, "adapterfmt/tables/single_file_tables.json is stale: run `python scripts/gen_single_file_tables.py`"


def test_lookups_both_ways_at_any_block() -> None:
    seg = to_single_file("flux", "transformer", "single_transformer_blocks.37.proj_mlp.weight")
    assert [tuple(s) for s in seg] == [("single_blocks.37.linear1.weight", 9216, 21504, 21504)]
    assert [tuple(s) for s in to_single_file("flux", "transformer", "norm_out.linear.weight")] == [
        ("final_layer.adaLN_modulation.1.weight", 3072, 6144, 6144), ("final_layer.adaLN_modulation.1.weight", 0, 3072, 6144)]
    assert to_single_file("flux", "transformer", "transformer_blocks.3.attn.to_out.0.weight")[0].key == "double_blocks.3.img_attn.proj.weight"
    assert to_single_file("flux", "transformer", "no.such.weight") is None
    assert [d for d, _a, _b in from_single_file("flux", "transformer", "double_blocks.18.txt_attn.qkv.weight")] == [
        "transformer_blocks.18.attn.add_q_proj.weight", "transformer_blocks.18.attn.add_k_proj.weight", "transformer_blocks.18.attn.add_v_proj.weight"]
    assert fused_parts("flux", "transformer", "final_layer.adaLN_modulation.1") == []  # a permutation is not a split
    own = own_module_names("flux", "transformer", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0"])
    assert own["double_blocks.0.img_attn.proj"] == ("transformer_blocks.0.attn.to_out.0", [])
    assert own["double_blocks.0.img_attn.qkv"][0] is None and len(own["double_blocks.0.img_attn.qkv"][1]) == 3
