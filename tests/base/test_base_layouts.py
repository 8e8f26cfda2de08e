"""One base reader for every layout users have, built by the real libraries (docs/FORMAT.md §1.2).

Where a folder holds two candidate weight sets, the library's own loader is the oracle: the
tensors adapterfmt reads must be the ones ``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _layout_helpers import minilm_dir, move_shards, save_llama, save_pipeline, save_unet
from adapterfmt.base.reading import read_base
from adapterfmt.base.layouts import decide_layout
from adapterfmt.sources.file_tree import Tree
from adapterfmt.errors import CheckpointNotFoundError, ShardIndexError, UnsafeFileError, UnsupportedFeatureError
from conftest import write_base, write_header_only


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Each layout once per module (read-only: copy before changing)."""
    root = tmp_path_factory.mktemp("layouts")
    out = {
        "llama": save_llama(root / "llama"),
        "llama-sharded": save_llama(root / "llama-sharded", max_shard_size="20KB"),
        "unet": save_unet(root / "unet"),
        "unet-sharded": save_unet(root / "unet-sharded", max_shard_size="20KB"),
        "pipeline": save_pipeline(root / "pipeline"),
        "llama-other": save_llama(root / "llama-other", seed=1, max_shard_size="20KB"),
        "unet-other": save_unet(root / "unet-other", seed=1, max_shard_size="20KB"),
    }
    subfolder = root / "llama-subfolder"
    shutil.copytree(out["llama-sharded"], subfolder)
    move_shards(subfolder, "weights")
    out["llama-subfolder"] = subfolder
    return out


def _values(base) -> dict[str, torch.Tensor]:
    """The tensors of the files the reader chose."""
    out: dict[str, torch.Tensor] = {}
    for shard in base.shards:
        out.update(load_file(str(Path(base.directory) / shard)))
    return out


@pytest.mark.parametrize(
    "name,kind,weights,index",
    [
        ("llama", "transformers", ["model.safetensors"], None),
        ("llama-sharded", "transformers", None, "model.safetensors.index.json"),
        ("llama-subfolder", "transformers", None, "model.safetensors.index.json"),
        ("unet", "diffusers", ["diffusion_pytorch_model.safetensors"], None),
        ("unet-sharded", "diffusers", None, "diffusion_pytorch_model.safetensors.index.json"),
    ],
)
def test_each_library_layout_is_read(built, name, kind, weights, index):
    base = read_base(built[name])
    assert base.layout.kind == kind and base.layout.index == index and not base.findings
    if weights:
        assert base.shards == weights
    else:
        assert len(base.shards) > 1
    if name == "llama-subfolder":
        assert all(s.startswith("weights/") for s in base.shards)
    assert set(base.tensors) == set(_values(base))


def test_pipeline_needs_a_component_and_reads_it_with_subfolder(built):
    with pytest.raises(CheckpointNotFoundError, match="diffusers pipeline.*--base-subfolder.*: unet$"):
        read_base(built["pipeline"])
    base = read_base(built["pipeline"], subfolder="unet")
    assert base.layout.kind == "diffusers-pipeline" and base.layout.component == "unet"
    assert base.layout.library == "diffusers" and base.shards == ["diffusion_pytorch_model.safetensors"]
    assert Path(base.directory) == built["pipeline"] / "unet"
    copied = base.layout.files_to_copy(Tree(str(built["pipeline"])))
    assert "model_index.json" in copied and "scheduler/scheduler_config.json" in copied and "unet/config.json" in copied
    assert "unet/diffusion_pytorch_model.safetensors" not in copied


def test_sentence_transformers_dir_reads_the_transformer_and_copies_the_rest():
    base = read_base(minilm_dir())
    layout = base.layout
    assert layout.kind == "sentence-transformers" and layout.library == "transformers" and layout.component == ""
    assert base.shards == ["model.safetensors"] and "encoder.layer.0.attention.self.query.weight" in base.tensors
    copied = layout.files_to_copy(Tree(str(minilm_dir())))
    for name in ("1_Pooling/config.json", "modules.json", ".gitattributes", "README.md", "tokenizer.json", "config.json"):
        assert name in copied
    assert "model.safetensors" not in copied


def test_stale_index_beside_single_file_reads_what_transformers_loads(built, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path / "m"
    shutil.copytree(built["llama"], d)
    for f in built["llama-other"].iterdir():  # a stale sharded set of other values next to model.safetensors
        if f.name != "config.json":
            shutil.copy(f, d / f.name)
    base = read_base(d)
    assert base.shards == ["model.safetensors"] and base.layout.index is None
    [finding] = base.findings
    assert finding.code == "shadowed-weights" and "model.safetensors.index.json" in finding.keys
    loaded = AutoModelForCausalLM.from_pretrained(str(d)).state_dict()
    ours = _values(base)
    assert all(torch.equal(loaded[k], v) for k, v in ours.items())
    assert set(base.layout.shadowed) >= {"model.safetensors.index.json", *json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()}


def test_diffusers_index_beside_single_file_reads_what_diffusers_loads(built, tmp_path):
    """diffusers looks for the index first (the opposite of transformers)."""
    from diffusers import UNet2DModel

    d = tmp_path / "u"
    shutil.copytree(built["unet"], d)
    for f in built["unet-other"].iterdir():
        if f.name != "config.json":
            shutil.copy(f, d / f.name)
    base = read_base(d)
    assert base.layout.index == "diffusion_pytorch_model.safetensors.index.json"
    assert base.findings[0].keys == ["diffusion_pytorch_model.safetensors"]
    loaded = UNet2DModel.from_pretrained(str(d)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in _values(base).items())


def test_bin_beside_safetensors_reads_safetensors_and_pickle_only_needs_allow_pickle(built, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(built["llama"], d)
    state = {k: torch.zeros_like(v) for k, v in load_file(str(d / "model.safetensors")).items()}
    torch.save(state, d / "pytorch_model.bin")
    base = read_base(d)
    assert base.shards == ["model.safetensors"] and base.findings[0].keys == ["pytorch_model.bin"]
    (d / "model.safetensors").unlink()
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin.*--allow-pickle"):
        read_base(d)
    base = read_base(d, allow_pickle=True)
    assert base.layout.pickle and set(base.tensors_in_memory) == set(state) and base.tensors.keys() == state.keys()


def test_diffusers_index_naming_a_subfolder_shard_is_refused_as_diffusers_does(built, tmp_path):
    d = tmp_path / "u"
    shutil.copytree(built["unet-sharded"], d)
    move_shards(d, "weights", index="diffusion_pytorch_model.safetensors.index.json")
    with pytest.raises(ShardIndexError, match="sub-folder, which diffusers refuses"):
        read_base(d)


def test_loose_file_of_any_name_gets_only_its_own_side_files(built, tmp_path):
    d = tmp_path / "downloads"
    d.mkdir()
    shutil.copy(built["llama"] / "model.safetensors", d / "llama-ft-v2.safetensors")
    shutil.copy(built["llama"] / "config.json", d / "config.json")
    (d / "holiday.jpg").write_bytes(b"\xff\xd8")
    (d / "other.safetensors").write_bytes(b"")
    base = read_base(d / "llama-ft-v2.safetensors")
    layout = base.layout
    assert layout.kind == "file" and layout.single_name == "model.safetensors" and base.shards == ["llama-ft-v2.safetensors"]
    assert layout.files_to_copy(Tree(str(d))) == ["config.json"]
    assert base.tied == {} and "lm_head.weight" in base.tensors


def test_base_and_adapter_in_one_folder_copies_no_adapter_file(built, tmp_path, testdata):
    d = tmp_path / "m"
    shutil.copytree(built["llama"], d)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(testdata / "tiny-llama-lora" / f, d / f)
    shutil.copytree(testdata / "tiny-llama-multi" / "second", d / "second")
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref")
    (d / ".gitattributes").write_text("*.safetensors filter=lfs")
    (d / "onnx").mkdir()
    (d / "onnx" / "model.onnx").write_bytes(b"stale export")
    copied = read_base(d).layout.files_to_copy(Tree(str(d)))
    assert copied == [".gitattributes", "config.json", "generation_config.json"]


def test_a_folder_with_only_a_loose_weights_file_names_it(tmp_path):
    write_header_only(tmp_path / "m" / "ft.safetensors", {"w": ("F32", [2, 2])})
    with pytest.raises(CheckpointNotFoundError, match="found ft.safetensors: give that file as the base"):
        read_base(tmp_path / "m")


@pytest.mark.parametrize(
    "config,tensors,method",
    [
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, {"q.weight": ("U8", [16, 1])}, "bitsandbytes 4-bit"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, {"q.qweight": ("I32", [4, 32])}, "gptq"),
        ({"quantization_config": {"quant_method": "awq"}}, {"q.qweight": ("I32", [4, 32])}, "awq"),
        ({"quantization_config": {"quant_method": "fp8"}}, {"q.weight": ("F8_E4M3", [32, 32])}, "fp8"),
        ({"quantization_config": {"quant_method": "compressed-tensors"}}, {"q.weight_packed": ("I32", [32, 4])}, "compressed-tensors"),
        ({}, {"q.qweight": ("I32", [4, 32]), "q.qzeros": ("I32", [1, 4])}, "GPTQ/AWQ"),
        ({}, {"q.weight": ("I8", [32, 32]), "q.SCB": ("F32", [32])}, "bitsandbytes 8-bit"),
        ({}, {"q.weight": ("F8_E4M3", [32, 32])}, "fp8 (F8_E4M3 weights)"),
    ],
)
def test_quantized_base_is_refused_naming_method_and_fix(tmp_path, config, tensors, method):
    write_base(tmp_path / "q", tensors, config=config)
    with pytest.raises(UnsupportedFeatureError) as info:
        read_base(tmp_path / "q")
    message = str(info.value)
    assert "\n" not in message and f"quantized base ({method}" in message
    assert "merge into the unquantized base model, then quantize" in message


def test_hub_listing_decides_like_the_local_folder(built):
    """The same decision from a file listing (how a Hub repo is seen) as from the folder."""
    root = built["pipeline"]
    local = decide_layout(Tree(str(root)), subfolder="unet")
    files = Tree(str(root)).walk()
    listed = decide_layout(Tree("hf://user/pipe@abc", files, lambda rel: (root / rel).read_bytes()), subfolder="unet")
    assert (listed.kind, listed.component, listed.weights, listed.index) == (local.kind, local.component, local.weights, local.index)
    assert listed.files_to_copy(Tree("hf://x", files)) == local.files_to_copy(Tree(str(root)))
    assert listed.directory == "hf://user/pipe@abc/unet"


def test_sharded_pickles_are_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-1.bin"}}))
    with pytest.raises(UnsupportedFeatureError, match="sharded pickle"):
        read_base(d, allow_pickle=True)


def test_header_only_read_changes_nothing(built):
    """read_base never writes: the folder is as it was, to the nanosecond."""
    before = {p: p.stat().st_mtime_ns for p in built["llama-subfolder"].rglob("*")}
    read_base(built["llama-subfolder"])
    assert {p: p.stat().st_mtime_ns for p in built["llama-subfolder"].rglob("*")} == before


def test_explicit_transformers_weights_in_config_wins(built, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(built["llama"], d)
    shutil.move(str(d / "model.safetensors"), str(d / "custom.safetensors"))
    save_file({"x": torch.zeros(1)}, str(d / "model.safetensors"))
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "transformers_weights": "custom.safetensors"}))
    base = read_base(d)
    assert base.shards == ["custom.safetensors"] and base.findings[0].keys == ["model.safetensors"]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(d)).state_dict()  # transformers loads custom.safetensors too
    assert all(torch.equal(loaded[k], v) for k, v in _values(base).items())


def _sharded_layouts(built, tmp_path) -> dict[str, tuple[Path, Path]]:
    """Each layout with a sharded index: (directory to verify, folder holding the index)."""
    out = {}
    for name in ("llama-sharded", "llama-subfolder", "unet-sharded"):
        shutil.copytree(built[name], tmp_path / name)
        out[name] = (tmp_path / name, tmp_path / name)
    pipe = tmp_path / "pipeline"
    shutil.copytree(built["pipeline"], pipe)
    shutil.rmtree(pipe / "unet")
    shutil.copytree(built["unet-sharded"], pipe / "unet")
    out["pipeline"] = (pipe, pipe / "unet")
    st = tmp_path / "sentence"
    st.mkdir()
    for f in minilm_dir().iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, st / f.name)
    shutil.copytree(minilm_dir() / "1_Pooling", st / "1_Pooling")
    for f in built["llama-sharded"].iterdir():
        if f.name != "config.json":
            shutil.copy(f, st / f.name)
    out["sentence-transformers"] = (st, st)
    return out


@pytest.mark.parametrize("layout", ["llama-sharded", "llama-subfolder", "unet-sharded", "pipeline", "sentence-transformers"])
def test_verify_reports_a_broken_index_in_every_layout(built, tmp_path, layout):
    from adapterfmt.reports.verify import verify_directory

    directory, folder = _sharded_layouts(built, tmp_path)[layout]
    assert verify_directory(directory) == []
    index = next(p for p in folder.iterdir() if p.name.endswith(".safetensors.index.json"))
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    (folder / shard).unlink()
    problems = verify_directory(directory)
    assert [p.code for p in problems] == ["missing-shard"] and shard in problems[0].message
    assert str(folder) in problems[0].message


def test_verify_reports_shadowed_weights(built, tmp_path):
    from adapterfmt.reports.verify import verify_directory

    d = tmp_path / "m"
    shutil.copytree(built["llama"], d)
    torch.save({}, d / "pytorch_model.bin")
    assert [p.code for p in verify_directory(d)] == ["shadowed-weights"]


def test_check_cli_chooses_a_pipeline_component(built, tmp_path, run_cli, testdata):
    from peft import LoraConfig, get_peft_model

    from _layout_helpers import tiny_unet

    adapter = tmp_path / "unet-lora"
    get_peft_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q", "to_v"])).save_pretrained(str(adapter))
    ok = run_cli("check", "--base", built["pipeline"], "--base-subfolder", "unet", "--adapter", adapter)
    assert ok.exit_code == 0, ok
    assert ok.stdout.splitlines()[0].startswith("8/8 LoRA targets")
    from conftest import assert_one_error_line

    assert_one_error_line(run_cli("check", "--base", built["pipeline"], "--adapter", adapter), "model_index.json", "--base-subfolder", "unet")


def test_loose_diffusers_file_is_named_by_its_config(built, tmp_path):
    d = tmp_path / "dl"
    d.mkdir()
    shutil.copy(built["unet"] / "diffusion_pytorch_model.safetensors", d / "my-unet-ft.safetensors")
    shutil.copy(built["unet"] / "config.json", d / "config.json")
    layout = read_base(d / "my-unet-ft.safetensors").layout
    assert (layout.kind, layout.library, layout.single_name) == ("file", "diffusers", "diffusion_pytorch_model.safetensors")


def test_verify_checks_base_and_adapter_saved_into_one_folder(built, tmp_path, testdata):
    from adapterfmt.reports.verify import verify_directory

    d = tmp_path / "m"
    shutil.copytree(built["llama-sharded"], d)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(testdata / "tiny-llama-lora" / f, d / f)
    assert verify_directory(d) == []
    shard = sorted(p for p in d.iterdir() if p.name.startswith("model-"))[0]
    shard.unlink()
    assert [p.code for p in verify_directory(d)] == ["missing-shard"]


def test_verify_stale_index_beside_single_file_is_shadowed_not_unindexed(built, tmp_path):
    from adapterfmt.reports.verify import verify_directory

    d = tmp_path / "m"
    shutil.copytree(built["llama"], d)
    for f in built["llama-other"].iterdir():
        if f.name != "config.json":
            shutil.copy(f, d / f.name)
    problems = verify_directory(d)
    assert [p.code for p in problems] == ["shadowed-weights"]
    assert "transformers loads model.safetensors" in problems[0].message
