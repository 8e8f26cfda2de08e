"""Unit tests of the merge planner (adapterfmt.merging.plan) and the output layout it decides
(adapterfmt.merging.output), from headers only, on the shipped tiny-llama checkpoints."""

from __future__ import annotations

import json

import pytest

import adapterfmt
from adapterfmt.base.reading import read_base
from adapterfmt.errors import MergeError
from adapterfmt.merging.output import changed_config, index_document, output_sizes, side_files
from adapterfmt.merging.plan import COPY, CONVERT, MERGE, REPLACE, LoraTerm, normalize_dtype, plan_merge

from _load_helpers import TESTDATA

BASE, LORA = TESTDATA / "tiny-llama", TESTDATA / "tiny-llama-lora"


@pytest.fixture(scope="module")
def base():
    return read_base(BASE)


@pytest.fixture(scope="module")
def lora():
    return adapterfmt.read_adapter(LORA)


def test_every_base_tensor_gets_one_action_in_the_base_layout(base, lora) -> None:
    plan = plan_merge(base, [lora])
    keys = [t.key for t in plan.tensors()]
    assert sorted(keys) == sorted(base.tensors) and len(keys) == len(set(keys))
    assert [s.name for s in plan.shards] == sorted(base.shards) and plan.indexed
    for shard in plan.shards:  # each key stays in its base shard
        assert {t.key for t in shard.tensors} == set(base.shard_keys[shard.name])
    merged = {t.key for t in plan.tensors() if t.action == MERGE}
    assert len(merged) == len(lora.lora) == plan.count(MERGE)
    assert all(isinstance(term, LoraTerm) for t in plan.tensors() if t.action == MERGE for term in t.terms)
    assert plan.count(REPLACE) == sum(len(c.tensors) for c in lora.full_copies.values())
    assert plan.count(COPY) + plan.count(MERGE) + plan.count(REPLACE) == len(base.tensors)
    assert plan.config is None  # nothing in config.json changes
    assert plan.files == ["config.json", "generation_config.json"]


def test_index_document_matches_the_base_index(base, lora) -> None:
    plan = plan_merge(base, [lora])
    doc = plan.index()
    shipped = json.loads((BASE / "model.safetensors.index.json").read_text())
    assert doc["weight_map"] == shipped["weight_map"]
    assert doc["metadata"]["total_size"] == plan.total_size == sum(t.nbytes for t in plan.tensors())
    assert index_document(plan.shards, {}) == {"metadata": {"total_size": plan.total_size}, "weight_map": doc["weight_map"]}


def test_output_dtype_converts_every_float_tensor_and_config(base, lora) -> None:
    plan = plan_merge(base, [lora], dtype="fp32")
    assert {t.dtype for t in plan.tensors()} == {"F32"}
    untouched = [t for t in plan.tensors() if t.action in (COPY, CONVERT)]
    assert len(untouched) == len(base.tensors) - plan.count(MERGE) - plan.count(REPLACE)
    for t in untouched:  # copied when already float32, converted otherwise
        assert t.action == (COPY if base.tensors[t.key].dtype == "F32" else CONVERT), t.key
    assert plan.config["dtype" if "dtype" in plan.config else "torch_dtype"] == "float32"


def test_max_shard_size_replans_with_huggingface_hub(base, lora) -> None:
    plan = plan_merge(base, [lora], max_shard_size=20000)
    assert len(plan.shards) > 3 and plan.indexed
    assert all(s.name.startswith("model-") for s in plan.shards)
    assert sorted(t.key for t in plan.tensors()) == sorted(base.tensors)
    with pytest.raises(MergeError, match="is not a size"):
        plan_merge(base, [lora], max_shard_size="lots")


def test_tied_head_is_untied_and_written_after_its_embedding() -> None:
    base = read_base(TESTDATA / "tiny-llama-tied")
    plan = plan_merge(base, [adapterfmt.read_adapter(TESTDATA / "tiny-llama-tied-lora")])
    keys = [t.key for t in plan.tensors()]
    assert plan.untied == ["lm_head.weight"]
    assert keys.index("lm_head.weight") == keys.index("model.embed_tokens.weight") + 1
    assert plan.config["tie_word_embeddings"] is False


def test_refusals_come_from_the_plan(base, lora) -> None:
    with pytest.raises(MergeError, match="no adapter"):
        plan_merge(base, [])
    with pytest.raises(MergeError):
        plan_merge(base, [lora], weights=[1.0, 2.0])
    with pytest.raises(MergeError, match="unknown output dtype"):
        plan_merge(base, [lora], dtype="int4")


def test_weights_scale_lora_terms(base, lora) -> None:
    plan = plan_merge(base, [lora], weights=[0.5])
    unweighted = {t.key: t for t in plan_merge(base, [lora]).tensors()}
    for t in plan.tensors():
        for term, ref in zip(t.terms, unweighted[t.key].terms):
            assert term.scaling == pytest.approx(0.5 * ref.scaling)


def test_dtype_spellings() -> None:
    assert [normalize_dtype(x) for x in ("bf16", "bfloat16", "BF16", "fp16", "half", "float32", None)] == ["BF16", "BF16", "BF16", "F16", "F16", "F32", None]


def test_layout_helpers(base) -> None:
    assert changed_config({}, untie=True, dtype="F16") is None
    doc = changed_config({"torch_dtype": "float32", "text_config": {"torch_dtype": "float32"}}, untie=True, dtype="F16")
    assert doc == {"torch_dtype": "float16", "tie_word_embeddings": False, "text_config": {"torch_dtype": "float16", "tie_word_embeddings": False}}
    assert changed_config({"a": 1}, untie=False, dtype=None) is None
    assert side_files(base) == ["config.json", "generation_config.json"]
    plan = plan_merge(base, [adapterfmt.read_adapter(LORA)])
    sizes = output_sizes(plan.shards, plan.base.directory, plan.files, plan.index())
    assert len(sizes) == len(plan.shards) + len(plan.files) + 1
    assert sizes[: len(plan.shards)] == [(BASE / s.name).stat().st_size for s in plan.shards]
