"""Merging into every base layout gives the same kind of directory, which the library's own loader
loads with PEFT's ``merge_and_unload`` results (docs/FORMAT.md §1.3).

Tolerance as in test_merge_parity: linear LoRA merges are bit-identical to PEFT's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import adapterfmt
from _layout_helpers import minilm_dir, move_shards, save_llama, save_pipeline, save_unet, tiny_llama, tiny_unet
from _merge_helpers import read_dir, tree_digest, unequal

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj"]


def _random_b(model: torch.nn.Module, seed: int = 3) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()


def _adapter(model: torch.nn.Module, targets: list[str], directory: Path) -> Path:
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    _random_b(peft_model)
    peft_model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory) -> Path:
    return _adapter(tiny_llama(0), ["q_proj", "v_proj", "down_proj"], tmp_path_factory.mktemp("a") / "llama-lora")


@pytest.fixture(scope="module")
def unet_adapter(tmp_path_factory) -> Path:
    return _adapter(tiny_unet(0), UNET_TARGETS, tmp_path_factory.mktemp("a") / "unet-lora")


def _llama_reference(base: Path, adapter: Path):
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).merge_and_unload().eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _names(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def test_transformers_shards_in_a_subfolder(tmp_path, llama_adapter):
    from transformers import AutoModelForCausalLM

    base = save_llama(tmp_path / "base", max_shard_size="20KB")
    move_shards(base, "weights")
    before = tree_digest(base, llama_adapter)
    out = tmp_path / "out"
    adapterfmt.merge_to_directory(base, llama_adapter, out, verify=True)
    assert tree_digest(base, llama_adapter) == before
    assert _names(out) == _names(base)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    ref = _llama_reference(base, llama_adapter)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(out))), _logits(ref))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_diffusers_model_directory(tmp_path, unet_adapter, sharded):
    from diffusers import UNet2DModel

    base = save_unet(tmp_path / "base", max_shard_size="20KB" if sharded else None)
    out = tmp_path / "out"
    adapterfmt.merge_to_directory(base, unet_adapter, out, verify=True)
    assert _names(out) == _names(base)
    ref = PeftModel.from_pretrained(UNet2DModel.from_pretrained(str(base)), str(unet_adapter)).merge_and_unload().eval()
    ours = UNet2DModel.from_pretrained(str(out)).eval()
    assert unequal(ours.state_dict(), ref.state_dict()) == []
    sample = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(sample, 3).sample, ref(sample, 3).sample)


def test_pipeline_component_writes_the_whole_pipeline(tmp_path, unet_adapter, run_cli):
    from diffusers import DiffusionPipeline, UNet2DModel

    base = save_pipeline(tmp_path / "pipe")
    out = tmp_path / "out"
    result = run_cli("merge", "--base", base, "--subfolder", "unet", "--adapter", unet_adapter, "-o", out, "--quiet", "--verify")
    assert result.exit_code == 0, result
    assert _names(out) == _names(base)
    assert (out / "scheduler" / "scheduler_config.json").read_bytes() == (base / "scheduler" / "scheduler_config.json").read_bytes()
    pipe = DiffusionPipeline.from_pretrained(str(out))
    ref = PeftModel.from_pretrained(UNet2DModel.from_pretrained(str(base / "unet")), str(unet_adapter)).merge_and_unload()
    assert unequal(pipe.unet.state_dict(), ref.state_dict()) == []


def test_sentence_transformers_directory(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    adapter = _adapter(AutoModel.from_pretrained(str(minilm_dir())), ["query", "value"], tmp_path / "st-lora")
    out = tmp_path / "out"
    adapterfmt.merge_to_directory(minilm_dir(), adapter, out, verify=True)
    assert _names(out) == _names(minilm_dir())
    texts = ["a merged sentence encoder", "base layouts as users have them"]
    ref = SentenceTransformer(str(minilm_dir()), device="cpu")
    ref[0].auto_model = PeftModel.from_pretrained(ref[0].auto_model, str(adapter)).merge_and_unload()
    ours = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in ref]
    assert torch.equal(ours.encode(texts, convert_to_tensor=True), ref.encode(texts, convert_to_tensor=True))


def test_loose_file_becomes_the_standard_name_with_only_its_side_files(tmp_path, llama_adapter):
    from transformers import AutoModelForCausalLM

    saved = save_llama(tmp_path / "saved")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copy(saved / "model.safetensors", downloads / "llama-ft-v2.safetensors")
    shutil.copy(saved / "config.json", downloads / "config.json")
    (downloads / "holiday.jpg").write_bytes(b"\xff\xd8")
    out = tmp_path / "out"
    adapterfmt.merge_to_directory(downloads / "llama-ft-v2.safetensors", llama_adapter, out)
    assert _names(out) == ["config.json", "model.safetensors"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(out))), _logits(_llama_reference(saved, llama_adapter)))


def test_base_and_adapter_in_one_folder(tmp_path, llama_adapter):
    from transformers import AutoModelForCausalLM

    base = save_llama(tmp_path / "both")
    for f in llama_adapter.iterdir():
        shutil.copy(f, base / f.name)
    out = tmp_path / "out"
    adapterfmt.merge_to_directory(base, base, out)
    assert not [n for n in _names(out) if n.startswith("adapter_")]
    clean = save_llama(tmp_path / "clean")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(out))), _logits(_llama_reference(clean, llama_adapter)))


def test_stale_index_is_neither_read_nor_copied(tmp_path, llama_adapter, run_cli):
    base = save_llama(tmp_path / "base")
    stale = save_llama(tmp_path / "stale", seed=1, max_shard_size="20KB")
    for f in stale.iterdir():
        if f.name != "config.json":
            shutil.copy(f, base / f.name)
    out = tmp_path / "out"
    result = run_cli("merge", "--base", base, "--adapter", llama_adapter, "-o", out)
    assert result.exit_code == 0, result
    assert "shadowed-weights" in result.stderr
    assert _names(out) == ["config.json", "generation_config.json", "model.safetensors"]
    clean = save_llama(tmp_path / "clean")
    assert unequal(read_dir(out), _llama_reference(clean, llama_adapter).state_dict()) == []


def test_pickle_base_with_allow_pickle_is_written_as_safetensors(tmp_path, llama_adapter, run_cli):
    from transformers import AutoModelForCausalLM

    saved = save_llama(tmp_path / "saved")
    base = tmp_path / "bin"
    base.mkdir()
    shutil.copy(saved / "config.json", base / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(str(saved)).state_dict(), base / "pytorch_model.bin")
    refused = run_cli("merge", "--base", base, "--adapter", llama_adapter, "-o", tmp_path / "no")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
    out = tmp_path / "out"
    result = run_cli("merge", "--base", base, "--adapter", llama_adapter, "-o", out, "--allow-pickle", "--quiet")
    assert result.exit_code == 0, result
    assert _names(out) == ["config.json", "model.safetensors"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(str(out))), _logits(_llama_reference(saved, llama_adapter)))


def test_diffusers_pickle_and_reshard_keep_the_diffusers_names(tmp_path, unet_adapter):
    from diffusers import UNet2DModel

    base = tmp_path / "base"
    base.mkdir()
    saved = save_unet(tmp_path / "saved")
    shutil.copy(saved / "config.json", base / "config.json")
    torch.save(UNet2DModel.from_pretrained(str(saved)).state_dict(), base / "diffusion_pytorch_model.bin")
    out = tmp_path / "out"
    adapterfmt.merge_to_directory(base, unet_adapter, out, allow_pickle=True)
    assert _names(out) == ["config.json", "diffusion_pytorch_model.safetensors"]
    ref = PeftModel.from_pretrained(UNet2DModel.from_pretrained(str(saved)), str(unet_adapter)).merge_and_unload()
    assert unequal(UNet2DModel.from_pretrained(str(out)).state_dict(), ref.state_dict()) == []
    resharded = tmp_path / "resharded"
    adapterfmt.merge_to_directory(saved, unet_adapter, resharded, max_shard_size="20KB")
    names = _names(resharded)
    assert "diffusion_pytorch_model.safetensors.index.json" in names
    assert [n for n in names if n.endswith(".safetensors")][0].startswith("diffusion_pytorch_model-00001-of-")
    assert unequal(UNet2DModel.from_pretrained(str(resharded)).state_dict(), ref.state_dict()) == []


def test_quantized_base_is_refused_in_one_line(tmp_path, llama_adapter, run_cli):
    from conftest import assert_one_error_line

    base = save_llama(tmp_path / "q")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    for command in (("check", "--base", base, "--adapter", llama_adapter), ("merge", "--base", base, "--adapter", llama_adapter, "-o", tmp_path / "o")):
        assert_one_error_line(run_cli(*command), "bitsandbytes 4-bit", "merge into the unquantized base model, then quantize")
    assert not (tmp_path / "o").exists()
