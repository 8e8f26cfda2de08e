"""Typed configs: every field adapterfmt reads has the JSON type PEFT's LoraConfig declares."""

from __future__ import annotations

import dataclasses
import json

import pytest
from peft import LoraConfig as PeftLoraConfig

from adapterfmt.checkpoint.config import parse_config
from adapterfmt.checkpoint.config_types import FIELD_TYPES, check_field_types
from adapterfmt.errors import InvalidConfigError

#: PEFT's annotation (as written in its dataclass) for each field we check: the schema follows it.
PEFT_ANNOTATIONS = {
    "peft_type": "Optional[Union[str, PeftType]]",
    "task_type": "Optional[Union[str, TaskType]]",
    "base_model_name_or_path": "Optional[str]",
    "peft_version": "Optional[str]",
    "r": "int",
    "lora_alpha": "int",
    "lora_dropout": "float",
    "use_rslora": "bool",
    "use_dora": "bool",
    "lora_bias": "bool",
    "fan_in_fan_out": "bool",
    "use_qalora": "bool",
    "rank_pattern": "Optional[dict]",
    "alpha_pattern": "Optional[dict]",
    "target_modules": "Optional[Union[list[str], str]]",
    "exclude_modules": "Optional[Union[list[str], str]]",
    "modules_to_save": "Optional[list[str]]",
    "layers_to_transform": "Optional[Union[list[int], int]]",
    "layers_pattern": "Optional[Union[list[str], str]]",
    "bias": "Literal['none', 'all', 'lora_only']",
    "target_parameters": "Optional[list[str]]",
    "trainable_token_indices": "Optional[Union[list[int], dict[str, list[int]]]]",
    "layer_replication": "Optional[list[tuple[int, int]]]",
    "alora_invocation_tokens": "Optional[list[int]]",
    "use_bdlora": "Optional[BdLoraConfig]",
    "velora_config": "Optional[Union[VeloraConfig, dict]]",
    "kasa_config": "Optional[KasaConfig]",
    "monteclora_config": "Optional[MontecloraConfig]",
    "arrow_config": "Optional[ArrowConfig]",
}


def test_schema_follows_peft_declared_types():
    """Every checked field exists in PEFT's LoraConfig with the annotation the schema was written from."""
    declared = {f.name: str(f.type) for f in dataclasses.fields(PeftLoraConfig)}
    assert set(FIELD_TYPES) == set(PEFT_ANNOTATIONS) | {"init_lora_weights"}
    for name, annotation in PEFT_ANNOTATIONS.items():
        assert declared[name] == annotation, name
    assert declared["init_lora_weights"].startswith("bool | Literal[")


def _peft_doc(**kw: object) -> dict:
    """What PEFT writes to adapter_config.json for ``LoraConfig(**kw)``."""
    cfg = PeftLoraConfig(**kw)
    return json.loads(json.dumps(cfg.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


PEFT_CONFIGS = [
    {},
    {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    {"target_modules": r".*\.(q|v)_proj", "exclude_modules": ["lm_head"], "modules_to_save": ["score"]},
    {"target_modules": ["fc1"], "layers_to_transform": [0, 2], "layers_pattern": "layers"},
    {"target_modules": ["fc1"], "layers_to_transform": 1, "layers_pattern": ["h", "layers"]},
    {"target_modules": ["q"], "rank_pattern": {"q": 4}, "alpha_pattern": {"q": 2.5}, "use_dora": True},
    {"target_modules": ["q"], "lora_bias": True, "bias": "lora_only", "fan_in_fan_out": True, "lora_dropout": 0.1},
    {"target_modules": ["q"], "trainable_token_indices": [1, 2]},
    {"target_modules": ["q"], "trainable_token_indices": {"embed_tokens": [1, 2]}},
    {"target_modules": ["q"], "init_lora_weights": "gaussian", "task_type": "CAUSAL_LM"},
    {"target_modules": ["q"], "layer_replication": [[0, 2], [1, 3]]},
]


@pytest.mark.parametrize("kw", PEFT_CONFIGS, ids=str)
def test_what_peft_writes_passes(kw):
    doc = _peft_doc(**kw)
    check_field_types(doc)
    cfg = parse_config(doc)
    assert cfg.r == doc["r"] and cfg.fan_in_fan_out is doc["fan_in_fan_out"]


WRONG = [
    ("fan_in_fan_out", "false"),
    ("fan_in_fan_out", 0),
    ("use_rslora", "true"),
    ("use_dora", 1),
    ("lora_bias", "yes"),
    ("use_qalora", "false"),
    ("r", 8.0),
    ("r", "8"),
    ("r", True),
    ("lora_alpha", "16"),
    ("lora_alpha", False),
    ("lora_dropout", "0.1"),
    ("layers_pattern", 3),
    ("layers_pattern", ["layers", 3]),
    ("layers_to_transform", "0"),
    ("layers_to_transform", [0, "1"]),
    ("layers_to_transform", [0.0]),
    ("target_modules", 5),
    ("target_modules", {"q_proj": True}),
    ("exclude_modules", [None]),
    ("modules_to_save", "lm_head"),
    ("target_parameters", "experts"),
    ("trainable_token_indices", "1,2"),
    ("trainable_token_indices", {"embed": "1"}),
    ("init_lora_weights", None),
    ("init_lora_weights", 1),
    ("rank_pattern", ["q"]),
    ("alpha_pattern", "q=2"),
    ("task_type", 3),
    ("base_model_name_or_path", ["x"]),
    ("bias", None),
    ("layer_replication", [[0, "2"]]),
    ("alora_invocation_tokens", "12"),
    ("velora_config", "on"),
    ("arrow_config", True),
]


@pytest.mark.parametrize(("name", "value"), WRONG, ids=[f"{n}={v!r}" for n, v in WRONG])
def test_wrong_type_is_one_line_naming_field_and_file(name, value):
    doc = {"peft_type": "LORA", "target_modules": ["q"], name: value}
    with pytest.raises(InvalidConfigError) as e:
        parse_config(doc, path="dir/adapter_config.json")
    text = str(e.value)
    assert e.value.key == name and text.startswith(f"dir/adapter_config.json: '{name}': must be ") and "\n" not in text


@pytest.mark.parametrize(("name", "value"), [("rank_pattern", {"q": "4"}), ("rank_pattern", {"q": 4.0}), ("alpha_pattern", {"q": True})])
def test_pattern_values_are_named_by_pattern(name, value):
    with pytest.raises(InvalidConfigError) as e:
        parse_config({"peft_type": "LORA", name: value}, path="c.json")
    assert e.value.key == f"{name}.q" and "must be" in str(e.value)


def test_null_means_not_set_where_peft_defaults_to_none_or_false():
    cfg = parse_config({"peft_type": "LORA", "use_dora": None, "fan_in_fan_out": None, "rank_pattern": None, "layers_pattern": None})
    assert cfg.use_dora is False and cfg.fan_in_fan_out is False and dict(cfg.rank_pattern) == {}


def test_unknown_fields_of_any_type_are_kept_and_ignored():
    cfg = parse_config({"peft_type": "LORA", "future_flag": "false", "inference_mode": "yes", "megatron_core": 3})
    assert cfg.raw["future_flag"] == "false" and cfg.raw["megatron_core"] == 3
