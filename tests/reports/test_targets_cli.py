"""``adapterfmt targets``: the preview equals the modules PEFT wraps; errors and warnings."""

from __future__ import annotations

import pytest

from conftest import TESTDATA, assert_one_error_line, write_base

FC1_REGEX = r".*\.(?!11)\d+\.fc1$"


def targets(run_cli, *args) -> list[str]:
    result = run_cli("targets", *args, "--json")
    assert result.exit_code == 0, result
    return [t["module"] for t in result.json()["lora_targets"]]


def peft_targets(model, **config) -> list[str]:
    """Names of the modules PEFT puts a LoRA layer on, for ``LoraConfig(**config)``."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    wrapped = inject_adapter_in_model(LoraConfig(r=2, **config), model)
    return [name for name, m in wrapped.named_modules() if isinstance(m, LoraLayer)]


@pytest.fixture
def llama():
    """A fresh tiny Llama built from ``testdata/tiny-llama/config.json`` (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TESTDATA / "tiny-llama"))


@pytest.mark.parametrize(
    ("args", "config"),
    [
        (["--target-modules", "q_proj", "--target-modules", "v_proj"], {"target_modules": ["q_proj", "v_proj"]}),
        (["--target-modules", "q_proj,self_attn.o_proj"], {"target_modules": ["q_proj", "self_attn.o_proj"]}),
        (["--target-regex", r".*\.1\..*_proj"], {"target_modules": r".*\.1\..*_proj"}),
        (
            ["--target-modules", "q_proj,k_proj", "--exclude-modules", "model.layers.0.self_attn.k_proj"],
            {"target_modules": ["q_proj", "k_proj"], "exclude_modules": ["model.layers.0.self_attn.k_proj"]},
        ),
        (
            ["--target-regex", r".*mlp\..*_proj", "--exclude-regex", r".*down_proj"],
            {"target_modules": r".*mlp\..*_proj", "exclude_modules": r".*down_proj"},
        ),
        (["--target-modules", "gate_proj", "--layers-to-transform", "1"], {"target_modules": ["gate_proj"], "layers_to_transform": [1]}),
        (
            ["--target-modules", "model.layers.0.mlp.up_proj,down_proj", "--layers-to-transform", "1"],
            {"target_modules": ["model.layers.0.mlp.up_proj", "down_proj"], "layers_to_transform": [1]},
        ),
    ],
)
def test_preview_equals_peft(run_cli, llama, args, config):
    ours = targets(run_cli, "--base", TESTDATA / "tiny-llama", *args)
    assert ours  # every case selects something
    assert sorted(ours) == sorted(peft_targets(llama, **config))


def test_regex_with_negative_lookahead_on_thirteen_layers(run_cli, tmp_path):
    """``.*\\.(?!11)\\d+\\.fc1$``: every fc1 but layer 11 (and neither fc2 nor the norms)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 8)
            self.fc2 = torch.nn.Linear(8, 4)
            self.norm = torch.nn.LayerNorm(4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block() for _ in range(13))
            self.fc1 = torch.nn.Linear(4, 4)  # top-level: no layer index

    model = Net()
    base = write_base(tmp_path / "base", {k: ("F32", tuple(v.shape)) for k, v in model.state_dict().items()})
    ours = targets(run_cli, "--base", base, "--target-regex", FC1_REGEX)
    assert ours == [f"layers.{i}.fc1" for i in range(13) if i != 11]
    assert sorted(ours) == sorted(peft_targets(model, target_modules=FC1_REGEX))


def test_table_and_full_copies(run_cli):
    result = run_cli("targets", "--base", TESTDATA / "tiny-llama", "--target-modules", "q_proj", "--modules-to-save", "lm_head")
    assert result.exit_code == 0, result
    assert "model.layers.0.self_attn.q_proj  64x64" in result.stdout
    assert "full copy 'lm_head': lm_head" in result.stdout
    assert "2 modules would get LoRA, 1 would be saved in full" in result.stdout


def test_tied_head_can_be_targeted(run_cli):
    result = run_cli("targets", "--base", TESTDATA / "tiny-llama-tied", "--target-modules", "lm_head", "--json")
    assert result.exit_code == 0, result
    assert result.json()["lora_targets"] == [{"module": "lm_head", "shape": [256, 64], "dtype": "F32", "tied_to": "model.embed_tokens"}]


def test_excluded_modules_are_listed(run_cli):
    doc = run_cli(
        "targets", "--base", TESTDATA / "tiny-llama", "--target-modules", "q_proj", "--exclude-modules", "layers.1.self_attn.q_proj", "--json"
    ).json()
    assert [t["module"] for t in doc["lora_targets"]] == ["model.layers.0.self_attn.q_proj"]
    assert doc["excluded"] == ["model.layers.1.self_attn.q_proj"]


def test_peft_endswith_divergence_warns(run_cli, tmp_path):
    base = write_base(
        tmp_path / "base",
        {"model.layers.0.x.weight": ("F32", (4, 4)), "img_model.layers.0.x.weight": ("F32", (4, 4)), "model.layers.0.q.weight": ("F32", (4, 4))},
    )
    result = run_cli("targets", "--base", base, "--target-modules", "q", "--modules-to-save", "model.layers.0.x", "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    assert doc["full_copies"] == {"model.layers.0.x": ["model.layers.0.x"]}
    assert [(w["code"], w["keys"]) for w in doc["warnings"]] == [("full-copy-suffix", ["img_model.layers.0.x"])]


def test_nothing_matched_exits_1(run_cli):
    result = run_cli("targets", "--base", TESTDATA / "tiny-llama", "--target-modules", "qkv_proj")
    assert result.exit_code == 1
    assert "warning[unused-target]" in result.stderr and "'qkv_proj'" in result.stderr


def test_unused_exclude_warns(run_cli):
    doc = run_cli("targets", "--base", TESTDATA / "tiny-llama", "--target-modules", "q_proj", "--exclude-modules", "k_proj", "--json").json()
    assert [w["code"] for w in doc["warnings"]] == ["unused-exclude"]


# ---------------------------------------------------------------------------------------------
# errors: exit 2
# ---------------------------------------------------------------------------------------------


def test_target_and_module_to_save_is_an_error(run_cli):
    result = run_cli("targets", "--base", TESTDATA / "tiny-llama", "--target-modules", "q_proj,lm_head", "--modules-to-save", "lm_head")
    assert_one_error_line(result, "'lm_head'", "both a LoRA target and a module to save")


def test_ambiguous_module_to_save_is_an_error(run_cli):
    result = run_cli("targets", "--base", TESTDATA / "tiny-llama", "--target-modules", "q_proj", "--modules-to-save", "v_proj")
    assert_one_error_line(result, "'v_proj'", "matches 2 modules")


def test_all_linear_needs_module_types(run_cli):
    assert_one_error_line(run_cli("targets", "--base", TESTDATA / "tiny-llama", "--target-modules", "all-linear"), "all-linear")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--target-modules", "q_proj", "--target-regex", ".*"], "exactly one of --target-modules and --target-regex"),
        ([], "exactly one of --target-modules and --target-regex"),
        (["--target-modules", r".*q_proj"], "--target-regex"),
        (["--target-regex", "(unclosed"], "not a valid regular expression"),
        (["--target-modules", "q_proj", "--layers-to-transform", "one"], "not layer indices"),
    ],
)
def test_usage_errors(run_cli, args, text):
    result = run_cli("targets", "--base", TESTDATA / "tiny-llama", *args)
    assert result.exit_code == 2
    assert text in result.stderr


def test_missing_base(run_cli, tmp_path):
    missing = tmp_path / "nothing"
    assert_one_error_line(run_cli("targets", "--base", missing, "--target-modules", "q_proj"), str(missing))
