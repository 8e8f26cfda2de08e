"""adapterfmt.load refuses what it cannot load exactly, says why, and leaves the model untouched.

We test: modules missing from the model (with the prefix_map hint, and prefix_map fixing it, saving
back under the checkpoint's own names), a resized vocabulary (both shapes named), unsupported
config features, unknown tensors, DoRA flags that disagree with the tensors, incomplete full
copies, LoRA on a layer type it cannot wrap, and a pickle file without ``allow_pickle``.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import adapterfmt
from adapterfmt.constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE
from adapterfmt.errors import (
    InconsistentAdapterError,
    ShapeMismatchError,
    UnknownKeyError,
    UnresolvedModulesError,
    UnsafeFileError,
    UnsupportedFeatureError,
)

from _load_helpers import TESTDATA, assert_outputs_close, tiny_bert, tiny_llama

LORA = TESTDATA / "tiny-llama-lora"
IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


class Nested(nn.Module):
    """A wrapper that keeps the decoder under another name (``language_model.`` instead of ``model.``)."""

    def __init__(self, llama: nn.Module) -> None:
        super().__init__()
        self.language_model = llama.model
        self.lm_head = llama.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.language_model(ids).last_hidden_state)


def edited(tmp_path, src=LORA, tensors=None, config=None):
    """A copy of ``src`` with its tensor dict and/or config dict changed by the given functions."""
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    if tensors is not None:
        state = tensors(load_file(str(dst / ADAPTER_SAFETENSORS_FILE)))
        save_file(state, str(dst / ADAPTER_SAFETENSORS_FILE), metadata={"format": "pt"})
    if config is not None:
        doc = config(json.loads((dst / ADAPTER_CONFIG_FILE).read_text()))
        (dst / ADAPTER_CONFIG_FILE).write_text(json.dumps(doc))
    return dst


def _untouched(model: nn.Module, names: list[str]) -> bool:
    return [n for n, _ in model.named_modules()] == names and not hasattr(model, "_adapterfmt")


def test_nested_model_gets_a_prefix_hint_and_prefix_map_fixes_it(tmp_path):
    model = Nested(tiny_llama())
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(UnresolvedModulesError) as info:
        adapterfmt.load(model, LORA)
    err = info.value
    assert err.suggestion == ("model.", "language_model.")
    assert "prefix_map={'model.': 'language_model.'}" in str(err)
    assert "14 adapter module(s) not found in the Nested: 'model.layers.0.mlp.down_proj'" in str(err)
    assert len(err.unresolved) == 14 and err.key == "model.layers.0.mlp.down_proj"
    assert _untouched(model, names)

    adapterfmt.load(model, LORA, prefix_map={"model.": "language_model."})
    plain = tiny_llama()
    adapterfmt.load(plain, LORA)
    with torch.no_grad():
        assert_outputs_close(model(IDS), plain(IDS).logits)
    adapterfmt.save(model, tmp_path / "out")
    with safe_open(str(tmp_path / "out" / ADAPTER_SAFETENSORS_FILE), "pt") as a, safe_open(str(LORA / ADAPTER_SAFETENSORS_FILE), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())


def test_resized_vocabulary_names_both_shapes():
    model = tiny_llama()
    model.resize_token_embeddings(300)
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(ShapeMismatchError, match=r"\[256, 64\].*\[300, 64\]"):
        adapterfmt.load(model, LORA)
    assert _untouched(model, names)


def test_lora_shape_mismatch_names_both_shapes(tmp_path):
    bad = edited(
        tmp_path,
        tensors=lambda s: {
            k: (torch.zeros(8, 32) if k.endswith("layers.0.self_attn.q_proj.lora_A.weight") else v) for k, v in s.items()
        },
    )
    with pytest.raises(ShapeMismatchError, match=r"has shape \[8, 32\].*needs \[8, 64\]"):
        adapterfmt.load(tiny_llama(), bad)


@pytest.mark.parametrize("field, value", [("layer_replication", [[0, 1]]), ("use_qalora", True), ("init_lora_weights", "pissa")])
def test_unsupported_config_features(tmp_path, field, value):
    bad = edited(tmp_path, config=lambda c: {**c, field: value})
    with pytest.raises(UnsupportedFeatureError, match=field):
        adapterfmt.load(tiny_llama(), bad)


def test_unknown_tensor_is_refused(tmp_path):
    bad = edited(tmp_path, tensors=lambda s: {**s, "base_model.model.model.mystery.scale": torch.ones(3)})
    model = tiny_llama()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(UnknownKeyError, match="mystery"):
        adapterfmt.load(model, bad)
    assert _untouched(model, names)


def test_dora_flag_must_agree_with_tensors(tmp_path):
    bad = edited(tmp_path, src=TESTDATA / "tiny-llama-dora", config=lambda c: {**c, "use_dora": False})
    with pytest.raises(InconsistentAdapterError, match="DoRA magnitude but use_dora is False"):
        adapterfmt.load(tiny_llama(), bad)


def test_incomplete_full_copy_is_refused(tmp_path):
    bad = edited(
        tmp_path,
        src=TESTDATA / "tiny-bert-classifier",
        tensors=lambda s: {k: v for k, v in s.items() if k != "base_model.model.classifier.bias"},
    )
    model = tiny_bert()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(InconsistentAdapterError, match="full copy 'classifier' lacks bias"):
        adapterfmt.load(model, bad)
    assert _untouched(model, names)


def test_lora_on_an_unsupported_layer_is_refused(tmp_path):
    extra = {
        "base_model.model.model.norm.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.model.norm.lora_B.weight": torch.zeros(64, 8),
    }
    bad = edited(tmp_path, tensors=lambda s: {**s, **extra})
    with pytest.raises(UnsupportedFeatureError, match="is a LlamaRMSNorm"):
        adapterfmt.load(tiny_llama(), bad)


def test_pickle_adapter_needs_allow_pickle(tmp_path):
    dst = tmp_path / "bin-adapter"
    dst.mkdir()
    shutil.copy(LORA / ADAPTER_CONFIG_FILE, dst / ADAPTER_CONFIG_FILE)
    torch.save(load_file(str(LORA / ADAPTER_SAFETENSORS_FILE)), dst / "adapter_model.bin")
    model = tiny_llama()
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        adapterfmt.load(model, dst)
    adapterfmt.load(model, dst, allow_pickle=True)
    expected = tiny_llama()
    adapterfmt.load(expected, LORA)
    for k, v in expected.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
