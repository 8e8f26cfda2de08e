"""adapterfmt.wrap against get_peft_model: same modules, names, initial values (same seed), trainability.

We test the matching rules (list = exact or dotted suffix, string = whole-name regex, exclude wins,
``all-linear``), rank/alpha patterns, DoRA, rsLoRA, lora_bias, the three init modes, full copies,
and the errors: a modules_to_save entry matching several modules, a module both targeted and saved
(or inside a saved module), nothing matched, an unsupported layer type — each leaving the model as it was.
"""

from __future__ import annotations

import pytest
import torch

import adapterfmt
from adapterfmt.errors import AmbiguousMatchError, InvalidConfigError, UnresolvedModulesError, UnsupportedFeatureError
from adapterfmt.layers.lora import LoraLayer

from _load_helpers import assert_same_structure, conv_embed_net, mlp_stack, tiny_gpt2

CONFIGS = {
    "regex": (mlp_stack, dict(target_modules=r".*\.(?!11)\d+\.fc1$")),
    "list-exclude-patterns-dora": (
        mlp_stack,
        dict(
            target_modules=["fc1", "fc2"],
            exclude_modules=["blocks.0.fc2", "blocks.1.fc1"],
            rank_pattern={"fc2": 2},
            alpha_pattern={"blocks.3.fc1": 4},
            modules_to_save=["head"],
            use_dora=True,
            use_rslora=True,
        ),
    ),
    "conv-embedding-gaussian": (
        conv_embed_net,
        dict(target_modules=["embed", "conv1", "conv2", "conv3", "head"], init_lora_weights="gaussian", lora_alpha=16),
    ),
    "conv-lora-bias-no-init": (
        conv_embed_net,
        dict(target_modules=["conv1", "conv2", "conv3", "head"], lora_bias=True, init_lora_weights=False, r=2),
    ),
    "conv-embedding-dora": (conv_embed_net, dict(target_modules=["embed", "conv2", "head"], use_dora=True, modules_to_save=["classify"])),
    "gpt2-all-linear": (tiny_gpt2, dict(target_modules="all-linear", r=2)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_wrap_matches_get_peft_model(name):
    from peft import LoraConfig, get_peft_model

    build, config = CONFIGS[name]
    ours, theirs = build(), build()
    torch.manual_seed(11)
    handle = adapterfmt.wrap(ours, **config)
    torch.manual_seed(11)
    ref = get_peft_model(theirs, LoraConfig(**config))
    assert_same_structure(ours, ref.base_model.model)
    assert handle.active == ["default"]
    layers = [m for m in ours.modules() if isinstance(m, LoraLayer)]
    assert layers and all(p.requires_grad for m in layers for p in m.adapter_parameters("default"))


def test_regex_and_exclude_select_exactly():
    model = mlp_stack()
    handle = adapterfmt.wrap(model, r".*\.(?!11)\d+\.fc1$", exclude_modules=["blocks.3.fc1"])
    targets = handle.adapters["default"].lora_modules
    assert targets == [f"blocks.{i}.fc1" for i in range(13) if i not in (3, 11)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target_modules=["fc1"], modules_to_save=["fc2"]), AmbiguousMatchError, "matches 13 modules"),
        (dict(target_modules=["head"], modules_to_save=["head"]), AmbiguousMatchError, "both a LoRA target and a module to save"),
        (dict(target_modules=["fc1"], modules_to_save=["blocks.0"]), AmbiguousMatchError, "both a LoRA target"),
        (dict(target_modules=["q_proj"]), UnresolvedModulesError, "matches no module"),
        (dict(target_modules=["fc1"], modules_to_save=["nothing"]), UnresolvedModulesError, "matches no module"),
        (dict(target_modules=["blocks.0"]), UnsupportedFeatureError, "is a Block"),
        (dict(), InvalidConfigError, "no per-architecture defaults"),
    ],
)
def test_wrap_errors_leave_the_model_untouched(kwargs, error, match):
    model = mlp_stack()
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(error, match=match):
        adapterfmt.wrap(model, **kwargs)
    assert [n for n, _ in model.named_modules()] == before
    assert not hasattr(model, "_adapterfmt")


def test_second_wrapped_adapter_is_added_inactive():
    model = mlp_stack()
    adapterfmt.wrap(model, ["fc1"])
    handle = adapterfmt.wrap(model, ["fc1", "fc2"], adapter_name="other", r=2)
    assert handle.active == ["default"]
    fc1 = model.blocks[0].fc1
    assert sorted(fc1.lora_A) == ["default", "other"] and fc1.active_adapters == ["default"]
    assert model.blocks[0].fc2.active_adapters == ["default"]  # created for "other", follows the model
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".other." in n
    }
