"""Merging kohya / diffusers LoRA files into component and pipeline directories, against diffusers'
``load_lora_weights`` + ``fuse_lora`` (and LyCORIS's forward)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import adapterfmt
from _diffusion_helpers import assert_merged_like_fused, diffusers_fused, rel_err, sd_lora_case, te_out, unet_out

TOL = 1e-4


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return sd_lora_case(str(tmp_path_factory.mktemp("sd_lora")))


@pytest.fixture(scope="module")
def fused(case):
    return diffusers_fused(case["file"], case["base"])


def test_merge_component_directory_equals_diffusers_fuse(case, fused, run_cli, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "unet-merged"
    r = run_cli("merge", "--base", os.path.join(case["pipe"], "unet"), "--adapter", case["file"], "--component", "unet", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_merged_like_fused(str(out), fused["unet"], case["base"]["unet"])
    merged = UNet2DConditionModel.from_pretrained(out).eval()
    assert rel_err(unet_out(merged), unet_out(fused["unet"]), case["ref"]["unet"]) < TOL
    assert rel_err(unet_out(merged), case["out"]["unet"], case["ref"]["unet"]) < TOL  # LyCORIS forward too


def test_merge_pipeline_equals_load_lora_weights_and_fuse(case, run_cli, tmp_path):
    """The merged pipeline loads with DiffusionPipeline.from_pretrained and equals the base pipeline
    after diffusers' own load_lora_weights + fuse_lora, weight by weight."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "pipe-merged"
    r = run_cli("merge", "--base", case["pipe"], "--adapter", case["file"], "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(doc["components"]) == ["text_encoder", "unet"]
    assert doc["copied"] == ["model_index.json", "scheduler", "tokenizer", "vae"]
    merged = DiffusionPipeline.from_pretrained(out)
    oracle = DiffusionPipeline.from_pretrained(case["pipe"])
    oracle.load_lora_weights(case["file"])
    oracle.fuse_lora()
    for c in ("unet", "text_encoder"):
        assert_merged_like_fused(str(out / c), getattr(oracle, c), case["base"][c])
        assert rel_err(
            (unet_out if c == "unet" else te_out)(getattr(merged, c)), case["out"][c], case["ref"][c]
        ) < TOL  # and LyCORIS's forward
    assert torch.equal(merged.vae.decoder.conv_out.weight, oracle.vae.decoder.conv_out.weight)


def test_merge_refusals_write_nothing(case, run_cli, tmp_path):
    out = tmp_path / "x"
    # several components, one component directory, no --component
    r = run_cli("merge", "--base", os.path.join(case["pipe"], "unet"), "--adapter", case["file"], "-o", out)
    assert r.exit_code == 2 and "--component" in r.stderr
    # the wrong component: nothing resolves
    r = run_cli("merge", "--base", os.path.join(case["pipe"], "text_encoder"), "--adapter", case["file"], "--component", "unet", "-o", out)
    assert r.exit_code == 2 and "match no module" in r.stderr
    assert not out.exists()


def test_sdxl_style_file_merges_unet_and_both_text_encoders(tmp_path, run_cli):
    """lora_unet_ / lora_te1_ / lora_te2_ (LyCORIS on a UNet and two CLIP encoders, the second with
    projection) merged into a pipeline equals diffusers' SDXL loaders + fuse, component by component."""
    import copy

    from _diffusion_helpers import lycoris_network, save_component, save_lycoris, tiny_clip, tiny_unet

    unet, te1, te2 = tiny_unet(), tiny_clip(1), tiny_clip(2, projection=True)
    base = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te1), "text_encoder_2": copy.deepcopy(te2)}
    net = lycoris_network([te1, te2], unet, algo="lora", dim=4, alpha=1, conv_dim=2, conv_alpha=2)
    file = save_lycoris(net, str(tmp_path / "sdxl.safetensors"))
    pipe = tmp_path / "pipe"
    for c, m in base.items():
        save_component(m, str(pipe / c))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    r = run_cli("merge", "--base", pipe, "--adapter", file, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    assert sorted(json.loads(r.stdout)["components"]) == ["text_encoder", "text_encoder_2", "unet"]
    fused = diffusers_fused(file, base)
    for c in base:
        assert_merged_like_fused(str(tmp_path / "out" / c), fused[c], base[c])


def test_load_foreign_gives_diffusers_outputs(case):
    """adapterfmt.load of each component of the kohya file (adapterfmt.load(model, FILE, component=C)) gives
    the outputs of the pipeline's load_lora_weights, unfused."""
    import copy

    
    fused = diffusers_fused(case["file"], case["base"])
    for c, run in (("unet", unet_out), ("text_encoder", te_out)):
        model = copy.deepcopy(case["base"][c])
        handle = adapterfmt.load(model, case["file"], component=c)
        assert handle.active == ["default"] and len(handle.adapters) == 1
        assert rel_err(run(model), run(fused[c]), case["ref"][c]) < TOL


@pytest.mark.parametrize(
    "algo,kwargs",
    [("lora", dict(use_tucker=True, conv_dim=2, conv_alpha=1)), ("loha", dict(use_tucker=True)), ("lokr", dict(factor=2, decompose_both=True)),
     ("lokr", dict(full_matrix=True))],
    ids=["locon-tucker", "loha-tucker", "lokr", "lokr-full"],
)
def test_merge_lycoris_kinds_into_a_pipeline_equals_lycoris_forward(algo, kwargs, tmp_path, run_cli):
    """LoCon with Tucker cores, LoHa and LoKr files (which diffusers refuses) merged by the one merge
    engine into a pipeline: the merged UNet and text encoder give LyCORIS's forward outputs."""
    import copy

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from _diffusion_helpers import lycoris_network, save_component, save_lycoris, tiny_clip, tiny_unet

    unet, te = tiny_unet(), tiny_clip()
    base = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te)}
    ref = {"unet": unet_out(unet), "text_encoder": te_out(te)}
    net = lycoris_network(te, unet, algo=algo, dim=4, alpha=3, **kwargs)
    out = {"unet": unet_out(unet), "text_encoder": te_out(te)}
    file = save_lycoris(net, str(tmp_path / f"{algo}.safetensors"))
    for c, m in base.items():
        save_component(m, str(tmp_path / "pipe" / c))
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    r = run_cli("merge", "--base", tmp_path / "pipe", "--adapter", file, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    merged_unet = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet").eval()
    merged_te = CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").eval()
    assert rel_err(unet_out(merged_unet), out["unet"], ref["unet"]) < TOL
    assert rel_err(te_out(merged_te), out["text_encoder"], ref["text_encoder"]) < TOL
    # adapterfmt.load: LoHa / LoKr wrap the modules with PEFT's names and give LyCORIS's forward outputs;
    # a LoCon Tucker core has no PEFT form: refused in one line, the model untouched
    from adapterfmt.errors import UnsupportedFeatureError
    
    if algo == "lora":
        model = copy.deepcopy(base["unet"])
        keys = list(model.state_dict())
        with pytest.raises(UnsupportedFeatureError, match="Tucker"):
            adapterfmt.load(model, file, component="unet")
        assert list(model.state_dict()) == keys
        return
    loaded = {c: copy.deepcopy(m) for c, m in base.items()}
    for c, m in loaded.items():
        adapterfmt.load(m, file, component=c)
    slot = "hada_w1_a" if algo == "loha" else "lokr_w1"
    assert any(k.endswith(f".{slot}.default") for k in loaded["unet"].state_dict())
    assert rel_err(unet_out(loaded["unet"]), out["unet"], ref["unet"]) < TOL
    assert rel_err(te_out(loaded["text_encoder"]), out["text_encoder"], ref["text_encoder"]) < TOL


def test_sdxl_kohya_file_with_sgm_block_names(tmp_path, run_cli):
    """sd-scripts names SDXL modules after the SGM UNet (lora_unet_input_blocks_4_1_…): they resolve
    exactly through the SGM names of the diffusers UNet's own modules, and the merge equals
    diffusers' own SGM mapping (lora_state_dict with unet_config) + fuse_lora."""
    import copy

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    from adapterfmt.formats.diffusion.names import base_module_paths
    from adapterfmt.formats.diffusion.sgm_names import sgm_aliases
    from _diffusion_helpers import lycoris_network, save_lycoris, tiny_clip

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SDXL's block layout, tiny: no attention in the first down / last up block
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    base = copy.deepcopy(unet)
    net = lycoris_network(tiny_clip(), unet, algo="lora", dim=4, alpha=2, conv_dim=2, conv_alpha=1)
    diffusers_file = save_lycoris(net, str(tmp_path / "diffusers-names.safetensors"))
    # the same tensors under SGM names, as sd-scripts writes them
    to_sgm = {p.replace(".", "_"): s.replace(".", "_") for s, p in sgm_aliases(base_module_paths(base.state_dict()), base.config).items()}
    tensors = load_file(diffusers_file)
    renamed = {}
    for k, v in tensors.items():
        name, _, suffix = k[len("lora_unet_"):].partition(".")
        if k.startswith("lora_unet_"):
            renamed[f"lora_unet_{to_sgm[name]}.{suffix}"] = v
    for part in ("input_blocks_4_1_transformer_blocks", "input_blocks_3_0_op.", "skip_connection.", "emb_layers_1.", "in_layers_2.",
                 "out_layers_3.", "output_blocks_2_2_conv.", "middle_block_1_proj_in."):
        assert any(part in k for k in renamed), part
    sgm_file = str(tmp_path / "sgm.safetensors")
    save_file(renamed, sgm_file)
    base.save_pretrained(tmp_path / "unet")
    r = run_cli("merge", "--base", tmp_path / "unet", "--adapter", sgm_file, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(sgm_file, unet_config=base.config)
    fused = copy.deepcopy(base)
    StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet=fused)
    fused.fuse_lora()
    assert_merged_like_fused(str(tmp_path / "out"), fused, base)
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "out")
    assert rel_err(unet_out(merged), unet_out(unet), unet_out(base)) < TOL  # and LyCORIS's forward on the diffusers names
    
    loaded = copy.deepcopy(base)
    adapterfmt.load(loaded, sgm_file, component="unet")
    assert rel_err(unet_out(loaded), unet_out(unet), unet_out(base)) < TOL


def test_merge_subfolder_of_a_pipeline_merges_that_component_only(case, run_cli, tmp_path):
    """--subfolder unet keeps its meaning for a kohya file: the pipeline is written whole, its UNet
    merged and the text encoder copied unchanged (its LoRA part is not applied, as asked)."""
    import filecmp

    out = tmp_path / "pipe-unet"
    r = run_cli("merge", "--base", case["pipe"], "--subfolder", "unet", "--adapter", case["file"], "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert list(json.loads(r.stdout)["components"]) == ["unet"]
    te = "text_encoder/model.safetensors"
    assert filecmp.cmp(os.path.join(case["pipe"], te), out / te, shallow=False)
    assert not filecmp.cmp(os.path.join(case["pipe"], "unet", "diffusion_pytorch_model.safetensors"), out / "unet" / "diffusion_pytorch_model.safetensors", shallow=False)
