"""``adapter_config.json``: parsing, per-module r/alpha/scaling as PEFT resolves them, errors."""

from __future__ import annotations

import json
import math

import pytest

from adapterfmt.checkpoint.config import overlapping_pattern_keys, parse_config, pattern_key, read_config
from adapterfmt.errors import CheckpointNotFoundError, InvalidConfigError
from conftest import TESTDATA

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.10.mlp.down_proj",
    "q_proj",
    "vision.q_proj",
]
PATTERNS = [
    {"down_proj": 4},
    {"q_proj": 4, "self_attn.q_proj": 6},
    {"self_attn.q_proj": 6, "q_proj": 4},
    {"^q_proj": 2, "layers.1.self_attn.q_proj": 3},
    {r"layers\.1\d*\..*": 12},
    {r"model.layers.0.mlp.down_proj": 5},
]


def test_real_configs():
    cfg = read_config(TESTDATA / "tiny-llama-lora" / "adapter_config.json")
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (8, 16.0, False)
    assert cfg.modules_to_save == ["lm_head"] and cfg.task_type == "CAUSAL_LM"
    assert cfg.rank_for("model.layers.0.mlp.down_proj") == 4 and cfg.alpha_for("model.layers.0.mlp.down_proj") == 8
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8 and cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2
    second = read_config(TESTDATA / "tiny-llama-multi" / "second" / "adapter_config.json")
    assert second.use_rslora and second.scaling_for("model.layers.0.self_attn.o_proj") == pytest.approx(4 / math.sqrt(2))


def test_defaults_equal_peft():
    import peft
    ours, theirs = parse_config({"peft_type": "LORA"}), peft.LoraConfig()
    for name in ("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "bias", "fan_in_fan_out", "init_lora_weights"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("patterns", PATTERNS, ids=str)
def test_pattern_lookup_equals_peft(patterns):
    from peft.utils.other import get_pattern_key

    cfg = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": patterns, "alpha_pattern": patterns})
    for m in MODULES:
        key = get_pattern_key(list(patterns), m)
        assert cfg.rank_for(m) == patterns.get(key, 8), m
        assert cfg.alpha_for(m) == patterns.get(key, 16), m
        assert pattern_key(patterns, m) == (key if key in patterns else None)


def test_scaling_uses_the_given_rank_and_rslora():
    cfg = parse_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True, "alpha_pattern": {"v": 4}})
    assert cfg.scaling_for("a.q") == pytest.approx(16 / math.sqrt(8))
    assert cfg.scaling_for("a.q", rank=4) == pytest.approx(8.0)
    assert cfg.scaling_for("a.v") == pytest.approx(4 / math.sqrt(8))


def test_overlapping_patterns_are_found():
    hits = overlapping_pattern_keys({"q_proj": 4, "self_attn.q_proj": 6}, MODULES)
    assert ("model.layers.0.self_attn.q_proj", "q_proj", "self_attn.q_proj") in hits
    assert overlapping_pattern_keys({"q_proj": 4, "self_attn.q_proj": 4}, MODULES) == []


def test_unsupported_features_are_named():
    cfg = parse_config({"peft_type": "LORA", "layer_replication": [[0, 2]], "init_lora_weights": "pissa_niter_4", "target_parameters": ["experts.gate_up_proj"]})
    # target_parameters is merged (FORMAT.md §3.9); only load refuses it, on its own.
    assert set(cfg.unsupported) == {"layer_replication", "init_lora_weights"}
    assert parse_config({"peft_type": "LORA", "init_lora_weights": "gaussian"}).unsupported == {}


def test_unknown_fields_are_kept():
    cfg = parse_config({"peft_type": "LORA", "some_future_field": 3})
    assert cfg.raw["some_future_field"] == 3


@pytest.mark.parametrize(
    ("doc", "key", "text"),
    [
        ([], None, "is not a JSON object"),
        ({}, "peft_type", "has no 'peft_type'"),
        ({"peft_type": "IA3"}, "peft_type", "LoRA adapters only"),
        ({"peft_type": "LORA", "r": 0}, "r", "must be > 0"),
        ({"peft_type": "LORA", "r": 2.5}, "r", "got 2.5"),
        ({"peft_type": "LORA", "r": True}, "r", "got True"),
        ({"peft_type": "LORA", "lora_alpha": -1}, "lora_alpha", "must be >= 0"),
        ({"peft_type": "LORA", "target_modules": "(q"}, "target_modules", "not a valid regular expression"),
        ({"peft_type": "LORA", "target_modules": [1, 2]}, "target_modules", "a list of strings"),
        ({"peft_type": "LORA", "exclude_modules": "[x"}, "exclude_modules", "not a valid regular expression"),
        ({"peft_type": "LORA", "rank_pattern": {"q": 0}}, "rank_pattern.q", "invalid value 0"),
        ({"peft_type": "LORA", "rank_pattern": {"(q": 2}}, "rank_pattern.(q", "not a valid regular expression"),
        ({"peft_type": "LORA", "alpha_pattern": ["q"]}, "alpha_pattern", "must be an object"),
        ({"peft_type": "LORA", "modules_to_save": "lm_head"}, "modules_to_save", "list of strings"),
        ({"peft_type": "LORA", "bias": "some"}, "bias", "'none', 'all' or 'lora_only'"),
    ],
)
def test_invalid_configs(doc, key, text):
    with pytest.raises(InvalidConfigError) as e:
        parse_config(doc, path="x/adapter_config.json")
    assert e.value.key == key and text in str(e.value)
    assert str(e.value).startswith("x/adapter_config.json: ")


def test_read_config_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        read_config(tmp_path / "adapter_config.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(InvalidConfigError, match="not valid JSON") as e:
        read_config(bad)
    assert e.value.path == str(bad)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"peft_type": "LORA", "pad": "x" * 10_000_001}))
    with pytest.raises(InvalidConfigError, match="larger than 10 MB"):
        read_config(big)
