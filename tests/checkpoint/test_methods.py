"""The declared ``peft_type`` and the saved tensors agree, or every reader refuses (issue 22 item 2):
PEFT's own saves of each method (LoRA with DoRA and an embedding, AdaLoRA, LoHa, LoKr) agree with
their ``peft_type``; every other pairing is refused with one line naming ``peft_type`` and the
missing / unexpected tensors. A PEFT weights file without its config names the missing
``adapter_config.json`` (item 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from safetensors import safe_open

import adapterfmt
from adapterfmt.checkpoint.methods import METHODS, method_mismatch
from adapterfmt.errors import CheckpointNotFoundError, InconsistentAdapterError, UnknownKeyError
from adapterfmt.formats.detect import detect_format


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.q = torch.nn.Linear(8, 8)
        self.v = torch.nn.Linear(8, 8)


CONFIGS = {
    "LORA": lambda: LoraConfig(r=2, target_modules=["q", "v", "emb"], use_dora=False),
    "ADALORA": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q", "v"]),
    "LOHA": lambda: LoHaConfig(r=2, target_modules=["q", "v"]),
    "LOKR": lambda: LoKrConfig(r=2, target_modules=["q", "v"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for method, make in CONFIGS.items():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(method.lower())
        get_peft_model(Tiny(), make()).save_pretrained(str(d))
        out[method] = d
    return out


def _keys(d: Path) -> list[str]:
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def test_every_method_peft_saves_agrees_with_its_peft_type_and_no_other(saved: dict[str, Path]) -> None:
    for method, d in saved.items():
        assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == method
        assert method_mismatch(method, _keys(d)) is None, method
        for other in METHODS:
            if other != method:
                problem = method_mismatch(other, _keys(d))
                assert problem is not None and f"peft_type is {other}" in problem, (method, other)


def test_adalora_declared_over_lora_tensors_is_refused_by_every_reader(saved: dict[str, Path], tmp_path: Path) -> None:
    """The silent wrong merge of issue 22: ADALORA over plain lora_A / lora_B passed and merged as LoRA."""
    d = tmp_path / "adapter"
    shutil.copytree(saved["LORA"], d)
    doc = json.loads((d / "adapter_config.json").read_text())
    doc["peft_type"] = "ADALORA"
    (d / "adapter_config.json").write_text(json.dumps(doc))
    with pytest.raises(InconsistentAdapterError) as e:
        adapterfmt.read_adapter(d)
    assert e.value.key == "peft_type" and "q.lora_E" in e.value.message and "lora_A.weight" in e.value.message
    for method in ("LOHA", "LOKR"):
        doc["peft_type"] = method
        (d / "adapter_config.json").write_text(json.dumps(doc))
        with pytest.raises(InconsistentAdapterError, match=f"peft_type is {method}"):
            adapterfmt.read_adapter(d)


def test_peft_weights_without_config_name_the_missing_config(saved: dict[str, Path], tmp_path: Path) -> None:
    for method, src in saved.items():
        d = tmp_path / method
        shutil.copytree(src, d)
        (d / "adapter_config.json").unlink()
        for path in (d, d / "adapter_model.safetensors"):
            with pytest.raises(CheckpointNotFoundError) as e:
                detect_format(path)
            assert "adapter_config.json" in e.value.message and e.value.key is None, (method, e.value)


def test_a_file_of_no_grammar_blames_no_key(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2), "decoder.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnknownKeyError) as e:
        detect_format(tmp_path / "model.safetensors")
    assert e.value.key is None and "none of its 2 tensors" in e.value.message


def test_a_config_without_its_weights_names_what_the_folder_holds(saved: dict[str, Path], tmp_path: Path) -> None:
    """The other required piece of a PEFT adapter: weights saved under another name are named."""
    for method in ("LORA", "LOHA"):
        d = tmp_path / method
        shutil.copytree(saved[method], d)
        (d / "adapter_model.safetensors").rename(d / "model.safetensors")
        with pytest.raises(CheckpointNotFoundError) as e:
            adapterfmt.read_adapter(d)
        assert "adapter_model.safetensors" in e.value.message and "model.safetensors" in (e.value.hint or ""), e.value
        (d / "model.safetensors").unlink()
        with pytest.raises(CheckpointNotFoundError, match="adapter_model.safetensors"):
            adapterfmt.read_adapter(d)


def test_the_lora_fast_path_says_what_the_parse_says():
    """``methods_of`` tells ``X.lora_A.weight`` / ``X.lora_B.weight`` apart without parsing (a
    200k-tensor adapter); for every key built from these segments it answers as ``parse_saved`` does."""
    import itertools

    from adapterfmt.checkpoint.keys import Role, parse_saved
    from adapterfmt.checkpoint.methods import LORA, methods_of
    from adapterfmt.errors import UnknownKeyError

    segments = ["a", "base_model", "model", "lora_A", "lora_B", "weight", "", "default", "base_layer"]
    for n in range(1, 5):
        for combo in itertools.product(segments, repeat=n):
            for prefix in ("", "base_model.model.", ".", "base_model.model.."):
                key = prefix + ".".join(combo)
                try:
                    lora = parse_saved(key).role in (Role.LORA_A, Role.LORA_B, Role.DORA_MAGNITUDE)
                except UnknownKeyError:
                    lora = False
                assert (methods_of(key) == frozenset({LORA})) == lora, key
