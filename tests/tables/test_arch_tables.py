"""adapterfmt/tables/arch_tables.json is exactly what scripts/gen_architecture_tables.py generates from the
pinned transformers (regenerate it with `python scripts/gen_architecture_tables.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_architecture_tables", REPO / "scripts" / "gen_architecture_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tables_match_the_pinned_transformers() -> None:
    shipped = (REPO / "adapterfmt" / "tables" / "arch_tables.json").read_text(encoding="utf-8")
    assert _generator().build() == shipped, "adapterfmt/tables/arch_tables.json is stale: run `python scripts/gen_architecture_tables.py`"


def test_tables_hold_the_rules_the_issue_names() -> None:
    from adapterfmt.tables.architectures import tables

    t = tables()
    mixtral = t["conversions"]["mixtral"]
    assert ["WeightRenaming", [".block_sparse_moe."], [".mlp."], []] in mixtral
    assert any(r[2] == [".experts.gate_up_proj"] and r[1] == [".experts.*.w1.weight", ".experts.*.w3.weight"] for r in mixtral)
    assert t["conversions"]["GPTNeoXForCausalLM"] == [["WeightRenaming", ["^embed_out\\."], ["lm_head."], []]]
    assert t["classes"]["T5ForConditionalGeneration"]["tied"]["lm_head.weight"] == "shared.weight"
    assert t["classes"]["OPTForCausalLM"]["tied"] == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    assert "t5" in t["tie_flag_reinterpreted"]
