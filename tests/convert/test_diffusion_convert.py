"""convert --to peft|kohya|diffusers: PEFT, diffusers and LyCORIS load the results with the same outputs."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

from _diffusion_helpers import (
    diffusers_fused,
    lycoris_apply_file,
    lycoris_network,
    rel_err,
    save_component,
    save_lycoris,
    sd_lora_case,
    te_out,
    tiny_clip,
    tiny_unet,
    unet_out,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return sd_lora_case(str(tmp_path_factory.mktemp("sd_lora")))


def test_kohya_to_peft_loads_in_peft_like_diffusers(case, run_cli, tmp_path):
    from peft import PeftModel

    fused = diffusers_fused(case["file"], case["base"])
    for comp, run in (("unet", unet_out), ("text_encoder", te_out)):
        out = tmp_path / comp
        r = run_cli("convert", case["file"], "--to", "peft", "-o", out, "--base", case["pipe"], "--component", comp, "--json")
        assert r.exit_code == 0, r.stderr
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        if comp == "unet":  # linear rank 4 / alpha 2, convs rank 2 / alpha 3
            assert (cfg["r"], cfg["lora_alpha"]) == (4, 2.0) and set(cfg["rank_pattern"].values()) == {2}
            assert set(cfg["alpha_pattern"].values()) == {3.0}
        model = PeftModel.from_pretrained(copy.deepcopy(case["base"][comp]), str(out)).eval()
        assert rel_err(run(model), run(fused[comp]), case["ref"][comp]) < TOL
    # several components in the file, no --component
    r = run_cli("convert", case["file"], "--to", "peft", "-o", tmp_path / "x", "--base", case["pipe"])
    assert r.exit_code == 2 and "--component" in r.stderr and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def peft_unet(tmp_path_factory):
    """A PEFT LoRA adapter on the tiny UNet: alpha != r, an attention layer with its own alpha and
    rank (the case diffusers 0.42 loads wrong from a per-module-alpha kohya file), and 3x3 convs."""
    from peft import LoraConfig, get_peft_model

    d = tmp_path_factory.mktemp("peft_unet")
    unet = tiny_unet()
    base = copy.deepcopy(unet)
    base.save_pretrained(d / "unet")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                     rank_pattern={"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
                     alpha_pattern={"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 3, "^up_blocks.1.resnets.0.conv1": 1})
    model = get_peft_model(unet, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.eval()
    model.save_pretrained(d / "adapter")
    return {"dir": d, "base": base, "ref": unet_out(base), "out": unet_out(model)}


def test_peft_to_kohya_loads_in_diffusers_and_lycoris(peft_unet, run_cli):
    from diffusers import StableDiffusionPipeline

    d = peft_unet["dir"]
    out = d / "lora.safetensors"
    r = run_cli("convert", d / "adapter", "--to", "kohya", "-o", out, "--base", d / "unet", "--component", "unet", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["folded"] == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.1.resnets.0.conv1"]
    with safe_open(str(out), "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        assert alphas == {8.0} and all(k.startswith("lora_unet_") for k in f.keys())
    # diffusers: lora_state_dict (its kohya conversion) + load into the UNet
    sd, network_alphas = StableDiffusionPipeline.lora_state_dict(str(out))
    unet = copy.deepcopy(peft_unet["base"])
    StableDiffusionPipeline.load_lora_into_unet(sd, network_alphas, unet=unet)
    assert rel_err(unet_out(unet), peft_unet["out"], peft_unet["ref"]) < TOL
    # LyCORIS: its kohya loader and forward
    unet = copy.deepcopy(peft_unet["base"])
    lycoris_apply_file(str(out), unet)
    assert rel_err(unet_out(unet), peft_unet["out"], peft_unet["ref"]) < TOL


def test_peft_to_diffusers_file_loads_in_diffusers(peft_unet, run_cli):
    d = peft_unet["dir"]
    out = d / "pytorch_lora_weights.safetensors"
    r = run_cli("convert", d / "adapter", "--to", "diffusers", "-o", out, "--base", d / "unet", "--component", "unet")
    assert r.exit_code == 0, r.stderr
    from diffusers import StableDiffusionPipeline

    # what load_lora_weights does for the UNet: read the file with its LoraConfig metadata, load it
    sd, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    unet = copy.deepcopy(peft_unet["base"])
    StableDiffusionPipeline.load_lora_into_unet(sd, network_alphas, unet=unet, metadata=metadata)
    assert rel_err(unet_out(unet), peft_unet["out"], peft_unet["ref"]) < TOL
    # and adapterfmt reads its own file back
    doc = json.loads(run_cli("inspect", out, "--json", "--base", d / "unet").stdout)
    assert doc["format"] == "diffusers" and doc["check"]["components"][0]["ok"]
    # an existing output is refused without --overwrite
    r = run_cli("convert", d / "adapter", "--to", "diffusers", "-o", out, "--base", d / "unet", "--component", "unet")
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert os.path.isfile(out)


def test_kohya_loha_to_peft_loha_matches_lycoris_forward(tmp_path, run_cli):
    """A LyCORIS LoHa file (with Tucker cores on the 3x3 convs) converts to PEFT's LOHA; PEFT's
    forward equals LyCORIS's."""
    from peft import PeftModel

    unet, te = tiny_unet(), tiny_clip()
    base = copy.deepcopy(unet)
    ref = unet_out(unet)
    net = lycoris_network(te, unet, algo="loha", dim=4, alpha=3, use_tucker=True)
    out = unet_out(unet)
    file = save_lycoris(net, str(tmp_path / "loha.safetensors"))
    save_component(base, str(tmp_path / "unet"))
    r = run_cli("convert", file, "--to", "peft", "-o", tmp_path / "peft", "--base", tmp_path / "unet", "--component", "unet")
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["alpha"], cfg["use_effective_conv2d"]) == ("LOHA", 4, 3.0, True)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert rel_err(unet_out(model), out, ref) < TOL


@pytest.mark.parametrize(
    "kwargs,convertible",
    [(dict(factor=4), False), (dict(factor=-1, decompose_both=True), True), (dict(factor=2, decompose_both=True, use_tucker=True), True),
     (dict(full_matrix=True), True), (dict(factor=-1, dim=2), True), (dict(factor=-1, dim=2, use_tucker=True), True)],
    ids=["factor4-refused", "both", "both-tucker", "full", "w2-whole-and-factored", "w2-whole-and-factored-tucker"],
)
def test_kohya_lokr_to_peft_lokr_matches_lycoris_forward(kwargs, convertible, tmp_path, run_cli):
    """LyCORIS LoKr files (full or factored halves, Tucker cores, full matrices with rank null;
    rank 2 on the tiny UNet: lokr_w2 whole where max(b, d) <= 4, factored where it is 8, convs
    included) convert to PEFT LOKR with a decompose_factor and per-module r that rebuild the same
    shapes, or are refused naming the module; converted ones give LyCORIS's outputs. (factor=4 on
    8/16-wide layers: LyCORIS splits 8 as 2x4 and 16 as 4x4, which no single PEFT
    decompose_factor reproduces.)"""
    from peft import PeftModel

    unet, te = tiny_unet(), tiny_clip()
    base = copy.deepcopy(unet)
    ref = unet_out(unet)
    kwargs = dict(kwargs)
    dim = kwargs.pop("dim", 4)
    net = lycoris_network(te, unet, algo="lokr", dim=dim, alpha=3, **kwargs)
    out = unet_out(unet)
    file = save_lycoris(net, str(tmp_path / "lokr.safetensors"))
    save_component(base, str(tmp_path / "unet"))
    r = run_cli("convert", file, "--to", "peft", "-o", tmp_path / "peft", "--base", tmp_path / "unet", "--component", "unet")
    if not convertible:
        assert r.exit_code == 2 and "decompose_factor" in r.stderr and not (tmp_path / "peft").exists()
        assert "lora_unet_" in r.stderr and "splits out" in r.stderr, r.stderr  # names the module and its split
        return
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LOKR"
    if dim == 2:  # the case of the report: both storages of w2 in one file, a factored 3x3 conv among them
        with safe_open(file, "pt") as f:
            keys = list(f.keys())
        assert any(k.endswith(".lokr_w2") for k in keys) and any(k.endswith(".lokr_w2_b") for k in keys)
        assert any("resnets" in k and "conv1" in k and k.endswith(".lokr_w2_b") for k in keys)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert rel_err(unet_out(model), out, ref) < TOL


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_loha_lokr_to_kohya_loads_in_lycoris(kind, tmp_path, run_cli):
    """PEFT LOHA / LOKR adapters (per-module alphas, a LoKr with full halves whose PEFT scale is
    alpha/r where LyCORIS uses 1) written as a kohya file: LyCORIS's loader and forward give PEFT's outputs."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    unet = tiny_unet()
    base = copy.deepcopy(unet)
    ref = unet_out(base)
    targets = ["to_q", "to_k", "conv1", "proj_in"]
    if kind == "loha":
        cfg = LoHaConfig(r=4, alpha=6, target_modules=targets, use_effective_conv2d=True, alpha_pattern={"to_k": 2})
    else:
        cfg = LoKrConfig(r=4, alpha=6, target_modules=targets, decompose_both=True, decompose_factor=2, alpha_pattern={"to_k": 3})
    model = get_peft_model(unet, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".hada_" in n or ".lokr_" in n:
                p.normal_(0, 0.3)
    model.eval()
    expected = unet_out(model)
    model.save_pretrained(tmp_path / "a")
    base.save_pretrained(tmp_path / "unet")
    out = tmp_path / "lyco.safetensors"
    r = run_cli("convert", tmp_path / "a", "--to", "kohya", "-o", out, "--base", tmp_path / "unet", "--component", "unet", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["folded"]  # the to_k modules' own alphas
    lyco = copy.deepcopy(base)
    lycoris_apply_file(str(out), lyco)
    assert rel_err(unet_out(lyco), expected, ref) < TOL


def test_kohya_lokr_peft_cannot_store_is_refused_naming_the_module(tmp_path, run_cli):
    """A LoKr module PEFT cannot store as the file does is refused, naming it and PEFT's rule:
    here one module of a decompose_both file has its w1 whole (the product of its factors, the same
    LyCORIS output) next to a w2 factored at rank 2, while PEFT, with decompose_both on for the other
    modules, factors w1 at any r < max(a, c) / 2. Nothing is written."""
    from safetensors.torch import load_file, save_file

    unet, te = tiny_unet(), tiny_clip()
    net = lycoris_network(te, unet, algo="lokr", dim=2, alpha=3, factor=-1, decompose_both=True)
    file = save_lycoris(net, str(tmp_path / "lokr.safetensors"))
    save_component(tiny_unet(), str(tmp_path / "unet"))
    tensors = load_file(file)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"
    assert {f"{name}.lokr_w1_a", f"{name}.lokr_w2_a"} <= set(tensors)
    tensors[f"{name}.lokr_w1"] = tensors.pop(f"{name}.lokr_w1_a") @ tensors.pop(f"{name}.lokr_w1_b")
    save_file(tensors, file)
    r = run_cli("convert", file, "--to", "peft", "-o", tmp_path / "peft", "--base", tmp_path / "unet", "--component", "unet")
    assert r.exit_code == 2 and not (tmp_path / "peft").exists(), r
    assert name in r.stderr and "decompose_both" in r.stderr and "max(a, c) / 2 = 4" in r.stderr, r.stderr


def test_kohya_lokr_tucker_core_missing_on_one_conv_is_refused_naming_it(tmp_path, run_cli):
    """PEFT's one use_effective_conv2d puts a Tucker core on every factored convolution with a
    kernel larger than 1x1: a file where one such convolution stores w2 as plain factors (no
    lokr_t2) while the others have cores is refused, naming that module and the rule."""
    from safetensors.torch import load_file, save_file

    unet, te = tiny_unet(), tiny_clip()
    net = lycoris_network(te, unet, algo="lokr", dim=2, alpha=3, factor=-1, use_tucker=True)
    file = save_lycoris(net, str(tmp_path / "lokr.safetensors"))
    save_component(tiny_unet(), str(tmp_path / "unet"))
    tensors = load_file(file)
    name = "lora_unet_up_blocks_0_resnets_0_conv1"
    t2 = tensors.pop(f"{name}.lokr_t2")
    b, d = tensors[f"{name}.lokr_w2_a"].shape[1], tensors[f"{name}.lokr_w2_b"].shape[1]
    tensors[f"{name}.lokr_w2_a"] = torch.randn(b, t2.shape[0])
    tensors[f"{name}.lokr_w2_b"] = torch.randn(t2.shape[0], d * t2.shape[2] * t2.shape[3])
    save_file(tensors, file)
    r = run_cli("convert", file, "--to", "peft", "-o", tmp_path / "peft", "--base", tmp_path / "unet", "--component", "unet")
    assert r.exit_code == 2 and not (tmp_path / "peft").exists(), r
    assert "up_blocks.0.resnets.0.conv1" in r.stderr and "has no Tucker core" in r.stderr and "use_effective_conv2d" in r.stderr, r.stderr
