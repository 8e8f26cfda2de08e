"""Module matching: ``is_lora_target`` agrees with PEFT's ``check_target_module_exists``; the
exact and the loose ``modules_to_save`` rules; ``select_targets`` errors."""

from __future__ import annotations

import itertools

import pytest

from adapterfmt.errors import AmbiguousMatchError, InvalidConfigError
from adapterfmt.checkpoint.matching import (
    full_copy_matches,
    is_lora_target,
    layer_index,
    matches_entry,
    matches_spec,
    module_names_from_keys,
    peft_full_copy_matches,
    select_targets,
)

NAMES = [
    "q",
    "a.q",
    "b.q",
    "xq",
    "a.xq",
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.11.mlp.fc1",
    "model.layers.1.mlp.experts.0.up_proj",
    "layers.3.q_proj",
    "transformer.h.2.attn.c_attn",
    "classifier",
    "pre_classifier",
    "head.classifier",
    "head.classifier.dense",
    "model.layers.0.x",
    "img_model.layers.0.x",
]

TARGET_SPECS = [
    ["q"],
    ["q_proj", "up_proj"],
    ["self_attn.q_proj"],
    ["model.layers.1.self_attn.q_proj"],
    ["classifier", "dense"],
    ["x"],
    "q",
    r".*\.q",
    r".*\.(?!11)\d+\..*",
    r".*(q_proj|c_attn)",
]
EXCLUDES = [None, ["b.q"], ["model.layers.1.self_attn.q_proj"], r"b\..*", r".*experts.*"]
SAVES = [None, ["classifier"], ["head"], ["layers.0.x"]]
LAYERS = [
    (None, None),
    ([1], None),
    ([0, 3], None),
    ([2], "h"),
    ([0], ["layers", "h"]),
]


def peft_targets(target, exclude, save, layers, pattern) -> list[str]:
    """The names of NAMES that PEFT's ``check_target_module_exists`` targets under this config."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    kwargs = {}
    if layers is not None:
        kwargs = {"layers_to_transform": layers, "layers_pattern": pattern}
    config = LoraConfig(target_modules=target, exclude_modules=exclude, modules_to_save=save, **kwargs)
    found = {n: check_target_module_exists(config, n) for n in NAMES}
    return [n for n, f in found.items() if f and not isinstance(f, _ExcludedModule)]


@pytest.mark.parametrize("target", TARGET_SPECS, ids=str)
def test_is_lora_target_agrees_with_peft(target):
    import peft  # noqa: F401  (an oracle: missing means failing, never skipping)
    for exclude, save, (layers, pattern) in itertools.product(EXCLUDES, SAVES, LAYERS):
        if layers is not None and isinstance(target, str):
            continue  # PEFT refuses layers_to_transform with a regex target
        ours = [
            n
            for n in NAMES
            if is_lora_target(n, target, exclude_modules=exclude, modules_to_save=save, layers_to_transform=layers, layers_pattern=pattern)
        ]
        assert ours == peft_targets(target, exclude, save, layers, pattern), (target, exclude, save, layers, pattern)


def test_list_entries_need_a_dot_boundary():
    assert matches_entry("a.q", "q") and matches_entry("q", "q")
    assert not matches_entry("xq", "q") and not matches_entry("a.xq", "q")
    assert matches_entry("model.layers.0.self_attn.q_proj", "self_attn.q_proj")


def test_a_string_is_a_full_regex_match():
    assert not any(matches_spec(n, "q") for n in ("a.q", "b.q"))
    assert matches_spec("q", "q")
    assert matches_spec("a.q", r".*\.q")


def test_modules_to_save_exact_vs_peft_endswith():
    assert full_copy_matches(NAMES, "classifier") == ["classifier", "head.classifier"]
    assert peft_full_copy_matches(NAMES, "classifier") == ["classifier", "pre_classifier", "head.classifier"]
    assert full_copy_matches(NAMES, "model.layers.0.x") == ["model.layers.0.x"]
    assert peft_full_copy_matches(NAMES, "model.layers.0.x") == ["model.layers.0.x", "img_model.layers.0.x"]


def test_layer_index_takes_the_first_numbered_segment():
    assert layer_index("model.layers.1.mlp.experts.0.up_proj") == 1
    assert layer_index("layers.3.q_proj") is None  # no segment before the list name
    assert layer_index("transformer.h.2.attn.c_attn", "h") == 2
    assert layer_index("transformer.h.2.attn.c_attn", "layers") is None


# ---------------------------------------------------------------------------------------------
# select_targets
# ---------------------------------------------------------------------------------------------

LLAMA_KEYS = [
    f"model.layers.{i}.{m}.weight"
    for i in range(2)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "input_layernorm")
] + ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]


def test_module_names_from_keys():
    names, leaves = module_names_from_keys(LLAMA_KEYS)
    assert "model" in names and "model.layers.0" in names and "model.layers.0.self_attn.q_proj" in names
    assert "model.layers.0" not in leaves and "lm_head" in leaves and "model.norm" in leaves


def test_select_targets_lists_targets_excluded_and_unused():
    names, leaves = module_names_from_keys(LLAMA_KEYS)
    sel = select_targets(
        names,
        target_modules=["q_proj", "o_proj"],
        exclude_modules=["model.layers.1.self_attn.q_proj"],
        modules_to_save=["lm_head"],
        lora_capable=leaves,
    )
    assert sel.lora_targets == ["model.layers.0.self_attn.q_proj"]
    assert sel.excluded == ["model.layers.1.self_attn.q_proj"]
    assert sel.unused_targets == ["o_proj"]
    assert sel.full_copies == {"lm_head": ["lm_head"]}
    assert sel.peft_divergence == {}


def test_select_targets_only_wraps_lora_capable_modules():
    names, leaves = module_names_from_keys(LLAMA_KEYS)
    sel = select_targets(names, target_modules=r"model\.layers\.0.*", lora_capable=leaves)
    assert "model.layers.0.self_attn" not in sel.lora_targets  # a container, no weight of its own
    assert "model.layers.0.self_attn.q_proj" in sel.lora_targets


def test_target_and_module_to_save_is_ambiguous():
    names, leaves = module_names_from_keys(LLAMA_KEYS)
    with pytest.raises(AmbiguousMatchError) as e:
        select_targets(names, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"], lora_capable=leaves)
    assert e.value.key == "lm_head"
    with pytest.raises(AmbiguousMatchError, match="both a LoRA target and a module to save"):
        select_targets(names, target_modules=["q_proj"], modules_to_save=["model.layers.0"], lora_capable=leaves)


def test_module_to_save_matching_several_modules_is_ambiguous():
    names, leaves = module_names_from_keys(LLAMA_KEYS)
    with pytest.raises(AmbiguousMatchError, match="matches 2 modules") as e:
        select_targets(names, target_modules=["up_proj"], modules_to_save=["q_proj"], lora_capable=leaves)
    assert e.value.key == "q_proj"


def test_peft_divergence_is_recorded():
    names = ["model.layers.0.x", "img_model.layers.0.x", "model.layers.0.q"]
    sel = select_targets(names, target_modules=["q"], modules_to_save=["model.layers.0.x"])
    assert sel.full_copies == {"model.layers.0.x": ["model.layers.0.x"]}
    assert sel.peft_divergence == {"model.layers.0.x": ["img_model.layers.0.x"]}


def test_all_linear_needs_module_types():
    with pytest.raises(InvalidConfigError, match="all-linear"):
        select_targets(["a.q"], target_modules="ALL-LINEAR")
