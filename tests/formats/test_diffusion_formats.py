"""kohya / LyCORIS and diffusers LoRA files: detection, records, name resolution, inspect, delta math.

Oracles: files written by lycoris-lora 4.1.3 (its kohya network on a tiny diffusers UNet and CLIP
text encoders) and by diffusers' ``save_lora_weights``; the delta math is checked against
LyCORIS's forward pass (not its ``merge_to``, which applies alpha/rank twice).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfmt.errors import AmbiguousMatchError, InconsistentAdapterError
from adapterfmt.formats import detect_format, read_foreign
from adapterfmt.formats.diffusion.names import base_module_paths, resolve_names
from adapterfmt.deltas.lycoris import module_delta

from _diffusion_helpers import (
    lycoris_network,
    sd_lora_case,
    merged_copy,
    rel_err,
    save_component,
    save_lycoris,
    te_out,
    tiny_clip,
    tiny_unet,
    unet_out,
)

#: fp32 tolerance relative to the adapter's effect on the output.
TOL = 1e-4


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    """An SD-style kohya LoRA/LoCon file (UNet incl. 3x3 convs + one text encoder), alpha 2 != rank 4,
    conv rank 2 with alpha 3, and the LyCORIS forward outputs as the oracle."""
    case = sd_lora_case(str(tmp_path_factory.mktemp("sd_lora")))
    return {**case, "dir": __import__("pathlib").Path(case["pipe"])}


def _merge_in_memory(ckpt, component, model):
    """Every module of ``component`` applied with :func:`module_delta` onto a copy of ``model``."""
    sd = model.state_dict()
    mods = ckpt.component_modules(component)
    res = resolve_names(mods, base_module_paths(sd), component=component, flattened=ckpt.format == "kohya")
    assert res.ok, res.unresolved[:5]
    tensors = load_file(ckpt.file)
    new = dict(sd)
    for m in mods:
        w = sd[f"{m.path}.weight"]
        assert m.fits(tuple(w.shape)), m.path
        new[f"{m.path}.weight"] = w + module_delta(m.kind, {s: tensors[k] for s, k in m.keys.items()}, m.scaling, w.shape)
    return merged_copy(model, new)


def test_kohya_lora_records_alpha_and_conv(sd_lora):
    ckpt = read_foreign(sd_lora["file"])
    assert detect_format(sd_lora["file"]) == "kohya" and ckpt.format == "kohya"
    assert ckpt.components == ["unet", "text_encoder"] and ckpt.kinds == ["lora"]
    assert not ckpt.unknown_keys and not ckpt.findings
    by = {m.name: m for m in ckpt.modules}
    q = by["down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert (q.rank, q.alpha, q.scaling, q.layer_kind) == (4, 2.0, 0.5, "linear")
    conv = by["down_blocks_0_resnets_0_conv1"]
    assert (conv.rank, conv.alpha, conv.layer_kind) == (2, 3.0, "conv2d") and conv.scaling == pytest.approx(1.5)
    accounted = sorted(k for m in ckpt.modules for k in m.all_keys())
    assert accounted == sorted(load_file(sd_lora["file"]))  # every tensor of the file is accounted for


def test_kohya_lora_merge_math_matches_lycoris_forward(sd_lora):
    ckpt = read_foreign(sd_lora["file"])
    for comp, run in (("unet", unet_out), ("text_encoder", te_out)):
        merged = _merge_in_memory(ckpt, comp, sd_lora["base"][comp])
        assert rel_err(run(merged), sd_lora["out"][comp], sd_lora["ref"][comp]) < TOL


@pytest.mark.parametrize(
    "algo,kwargs,ranks",
    [
        ("lora", dict(use_tucker=True, conv_dim=2, conv_alpha=1), {2, 4}),  # LoCon with a Tucker core (lora_mid)
        ("loha", dict(), {4}),
        ("loha", dict(use_tucker=True), {4}),
        ("lokr", dict(factor=4), {4, None}),  # small halves stay full: rank null
        ("lokr", dict(factor=2, decompose_both=True, use_tucker=True), {4, None}),
        ("lokr", dict(factor=-1, full_matrix=True), {None}),
    ],
    ids=["locon-tucker", "loha", "loha-tucker", "lokr", "lokr-both-tucker", "lokr-full"],
)
def test_lycoris_kinds_match_lycoris_forward(tmp_path, algo, kwargs, ranks):
    unet, te = tiny_unet(), tiny_clip()
    base_u, base_t = copy.deepcopy(unet), copy.deepcopy(te)
    ref_u, ref_t = unet_out(unet), te_out(te)
    net = lycoris_network(te, unet, algo=algo, dim=4, alpha=3, **kwargs)
    out_u, out_t = unet_out(unet), te_out(te)
    ckpt = read_foreign(save_lycoris(net, str(tmp_path / f"{algo}.safetensors")))
    assert ckpt.kinds == [algo] and not ckpt.findings
    assert {m.rank for m in ckpt.modules} == ranks
    assert rel_err(unet_out(_merge_in_memory(ckpt, "unet", base_u)), out_u, ref_u) < TOL
    assert rel_err(te_out(_merge_in_memory(ckpt, "text_encoder", base_t)), out_t, ref_t) < TOL


def test_sdxl_two_text_encoders(tmp_path):
    """lora_te1_/lora_te2_ -> text_encoder / text_encoder_2; te2 is CLIPTextModelWithProjection
    (keeps ``text_model.``), te1 a flattened transformers-5 CLIPTextModel."""
    te1, te2, unet = tiny_clip(1), tiny_clip(2, projection=True), tiny_unet()
    base1, base2 = copy.deepcopy(te1), copy.deepcopy(te2)
    ref1, ref2 = te_out(te1), te_out(te2)
    net = lycoris_network([te1, te2], unet, algo="lora", dim=4, alpha=8)
    out1, out2 = te_out(te1), te_out(te2)
    ckpt = read_foreign(save_lycoris(net, str(tmp_path / "sdxl.safetensors")))
    assert ckpt.components == ["unet", "text_encoder", "text_encoder_2"]
    assert {k.split("_", 2)[1] for k in load_file(ckpt.file)} == {"unet", "te1", "te2"}
    names = {m.component: m.name for m in ckpt.modules if m.component != "unet"}
    assert names["text_encoder"].startswith("encoder_layers_0") and names["text_encoder_2"].startswith("text_model_encoder_layers_0")
    assert {m.scaling for m in ckpt.modules} == {2.0}
    assert rel_err(te_out(_merge_in_memory(ckpt, "text_encoder", base1)), out1, ref1) < TOL
    assert rel_err(te_out(_merge_in_memory(ckpt, "text_encoder_2", base2)), out2, ref2) < TOL


def _kohya_file(path, names, *, prefix="lora_te_", rank=2, in_f=16, out_f=16):
    tensors = {}
    for n in names:
        tensors[f"{prefix}{n}.lora_down.weight"] = torch.randn(rank, in_f)
        tensors[f"{prefix}{n}.lora_up.weight"] = torch.randn(out_f, rank)
        tensors[f"{prefix}{n}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return str(path)


def test_legacy_clip_names_resolve_against_flattened_and_nested_encoders(tmp_path):
    legacy = _kohya_file(tmp_path / "legacy.safetensors", ["text_model_encoder_layers_0_self_attn_q_proj"])
    modern = _kohya_file(tmp_path / "modern.safetensors", ["encoder_layers_0_self_attn_q_proj"])
    flat = base_module_paths(tiny_clip().state_dict())  # transformers 5 CLIPTextModel: encoder.layers.*
    nested = base_module_paths(tiny_clip(projection=True).state_dict())  # text_model.encoder.layers.*
    for file in (legacy, modern):
        for paths, want in ((flat, "encoder.layers.0.self_attn.q_proj"), (nested, "text_model.encoder.layers.0.self_attn.q_proj")):
            mods = read_foreign(file).modules
            assert resolve_names(mods, paths, component="text_encoder").resolved == {mods[0].name: want}
    # the alias is for text encoders only
    mods = read_foreign(legacy).modules
    assert resolve_names(mods, flat, component="unet").unresolved == [mods[0].name]
    # diffusers files: dotted names, the same alias (old files say text_encoder.text_model.encoder...)
    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 2)}, str(tmp_path / "d.safetensors"))
    mods = read_foreign(tmp_path / "d.safetensors").modules
    res = resolve_names(mods, flat, component="text_encoder", flattened=False)
    assert res.resolved == {"text_model.encoder.layers.0.self_attn.q_proj": "encoder.layers.0.self_attn.q_proj"}


def test_flattened_name_that_fits_two_modules_is_an_error_naming_both(tmp_path):
    file = _kohya_file(tmp_path / "amb.safetensors", ["blocks_0_attn_proj"], prefix="lora_unet_")
    paths = ["blocks.0.attn_proj", "blocks.0.attn.proj", "other"]
    with pytest.raises(AmbiguousMatchError) as e:
        resolve_names(read_foreign(file).modules, paths, component="unet")
    assert "blocks.0.attn_proj" in str(e.value) and "blocks.0.attn.proj" in str(e.value)


def test_mixed_kinds_in_one_module_and_unknown_keys(tmp_path):
    t = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.hada_w1_a": torch.zeros(4, 2)}
    save_file(t, str(tmp_path / "mix.safetensors"))
    with pytest.raises(InconsistentAdapterError):
        read_foreign(tmp_path / "mix.safetensors")
    t = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.diff": torch.zeros(4, 4), "lora_unet_b.alpha": torch.tensor(1.0)}
    save_file(t, str(tmp_path / "odd.safetensors"))
    ckpt = read_foreign(tmp_path / "odd.safetensors")
    assert sorted(ckpt.unknown_keys) == ["lora_unet_a.diff", "lora_unet_b.alpha"]
    assert [f.code for f in ckpt.findings] == ["orphan-lora", "unknown-key"]


@pytest.fixture(scope="module")
def sd3_diffusers(tmp_path_factory):
    """A diffusers-format LoRA file for a tiny SD3 transformer, written by diffusers, with its
    LoraConfig metadata (r=4, alpha 8, one module at rank 2 / alpha 6)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    d = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                               caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4).eval()
    save_component(tr, str(d / "transformer"))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                     rank_pattern={"^transformer_blocks.0.attn.to_k": 2}, alpha_pattern={"^transformer_blocks.0.attn.to_k": 6})
    tr.add_adapter(cfg)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    StableDiffusion3Pipeline.save_lora_weights(str(d / "lora"), transformer_lora_layers=get_peft_model_state_dict(tr),
                                               transformer_lora_adapter_metadata=cfg.to_dict())
    return d


def test_diffusers_transformer_file_with_metadata(sd3_diffusers):
    path = str(sd3_diffusers / "lora")
    assert detect_format(path) == "diffusers"
    ckpt = read_foreign(path)
    assert ckpt.format == "diffusers" and ckpt.components == ["transformer"] and ckpt.kinds == ["lora"]
    by = {m.name: m for m in ckpt.modules}
    assert (by["transformer_blocks.0.attn.to_q"].rank, by["transformer_blocks.0.attn.to_q"].alpha, by["transformer_blocks.0.attn.to_q"].scaling) == (4, 8.0, 2.0)
    assert (by["transformer_blocks.0.attn.to_k"].rank, by["transformer_blocks.0.attn.to_k"].alpha, by["transformer_blocks.0.attn.to_k"].scaling) == (2, 6.0, 3.0)
    assert ckpt.configs["transformer"]["r"] == 4


def test_inspect_cli_json_detects_each_format(sd_lora, sd3_diffusers, run_cli, testdata):
    ckpt = read_foreign(sd_lora["file"])
    n_unet = len(ckpt.component_modules("unet"))
    doc = json.loads(run_cli("inspect", sd_lora["file"], "--json").stdout)
    assert doc["format"] == "kohya" and doc["components"] == {"unet": n_unet, "text_encoder": 6}
    rec = next(m for m in doc["modules"] if m["module"] == "down_blocks_0_resnets_0_conv1")
    assert (rec["component"], rec["rank"], rec["alpha"], rec["method"], rec["resolved"]) == ("unet", 2, 3.0, "lora", False)
    # with --base the real module names appear
    r = run_cli("inspect", sd_lora["file"], "--json", "--base", str(sd_lora["dir"] / "unet"), "--component", "unet")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["check"]["components"][0]["ok"] and doc["check"]["components"][0]["resolved"] == n_unet
    rec = next(m for m in doc["modules"] if m["name_in_file"] == "down_blocks_0_resnets_0_conv1")
    assert rec["module"] == "down_blocks.0.resnets.0.conv1" and rec["resolved"]
    # the wrong component: nothing resolves, reported like check (exit 1)
    r = run_cli("inspect", sd_lora["file"], "--json", "--base", str(sd_lora["dir"] / "text_encoder"), "--component", "unet")
    assert r.exit_code == 1 and json.loads(r.stdout)["check"]["components"][0]["unresolved_count"] == n_unet
    # several components and one component directory: --component is needed
    r = run_cli("inspect", sd_lora["file"], "--base", str(sd_lora["dir"] / "unet"))
    assert r.exit_code == 2 and "--component" in r.stderr
    doc = json.loads(run_cli("inspect", str(sd3_diffusers / "lora"), "--json", "--base", str(sd3_diffusers / "transformer")).stdout)
    assert doc["format"] == "diffusers" and doc["check"]["components"][0]["ok"]
    assert {m["component"] for m in doc["modules"]} == {"transformer"}
    assert json.loads(run_cli("inspect", testdata / "tiny-llama-lora", "--json").stdout)["format"] == "peft"
    text = run_cli("inspect", sd_lora["file"]).stdout
    assert "kohya" in text and "down_blocks.0.resnets.0.conv1*" in text and "not checked against a model" in text


def test_inspect_of_a_foreign_file_is_header_only(sd_lora):
    """kohya inspect, with and without a pipeline base, imports neither torch nor the other heavy packages."""
    from test_no_torch import run_and_report

    for args in (("inspect", sd_lora["file"], "--json"), ("inspect", sd_lora["file"], "--base", str(sd_lora["dir"]))):
        code, loaded, stdout = run_and_report(*args)
        assert code == 0 and stdout and loaded == [], (args, loaded)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_loha_lokr_inspect_and_math_match_peft(kind, tmp_path, run_cli):
    """PEFT's own LOHA / LOKR adapters: inspect reads them (format peft, kind loha/lokr), and the
    shared delta math with PEFT's scale reproduces PEFT's merge_and_unload weight for weight."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    unet = tiny_unet()
    base = copy.deepcopy(unet)
    targets = ["to_q", "to_k", "conv1", "proj_in"]
    if kind == "loha":
        cfg = LoHaConfig(r=4, alpha=6, target_modules=targets, use_effective_conv2d=True, rank_pattern={"^down_blocks.0.resnets.0.conv1": 2})
    else:
        cfg = LoKrConfig(r=4, alpha=6, target_modules=targets, decompose_both=True, decompose_factor=2, alpha_pattern={"to_k": 3})
    model = get_peft_model(unet, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".hada_" in n or ".lokr_" in n:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "a")
    expected = model.merge_and_unload().state_dict()
    doc = json.loads(run_cli("inspect", tmp_path / "a", "--json").stdout)
    assert doc["format"] == "peft" and doc["methods"] == [kind] and doc["peft_type"] == kind.upper()
    base.save_pretrained(tmp_path / "unet")
    r = run_cli("inspect", tmp_path / "a", "--json", "--base", tmp_path / "unet")
    check = json.loads(r.stdout)["check"]["components"][0]
    assert r.exit_code == 0 and check["ok"] and check["resolved"] == check["total"] == len(doc["modules"])
    from adapterfmt.formats.peft.lycoris import read_peft_lycoris

    ckpt = read_peft_lycoris(tmp_path / "a")
    assert not ckpt.findings and len(ckpt.modules) == len(doc["modules"]) > 0
    tensors = load_file(ckpt.file)
    sd = base.state_dict()
    for m in ckpt.modules:
        w = sd[f"{m.path}.weight"]
        merged = w + module_delta(m.kind, {s: tensors[k] for s, k in m.keys.items()}, m.scaling, w.shape)
        effect = (expected[f"{m.path}.weight"] - w).abs().max()
        assert effect > 0 and (merged - expected[f"{m.path}.weight"]).abs().max() <= TOL * effect, m.path
    # the merge command: the one merge engine on the factor records equals PEFT's merge_and_unload
    r = run_cli("merge", "--base", tmp_path / "unet", "--adapter", tmp_path / "a", "-o", tmp_path / "merged")
    assert r.exit_code == 0, r.stderr
    ours = load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))
    for k, v in ours.items():
        effect = (expected[k] - sd[k]).abs().max()
        assert (v - expected[k]).abs().max() <= TOL * max(float(effect), 1e-30), k


def test_diffusers_transformer_file_merges_like_diffusers_fuse(sd3_diffusers, run_cli, tmp_path):
    """The SD3-style diffusers file merged into its transformer directory equals diffusers'
    load_lora_adapter (with the file's LoraConfig metadata) + fuse_lora."""
    from diffusers import SD3Transformer2DModel

    out = tmp_path / "merged"
    r = run_cli("merge", "--base", sd3_diffusers / "transformer", "--adapter", sd3_diffusers / "lora", "-o", out)
    assert r.exit_code == 0, r.stderr
    base = SD3Transformer2DModel.from_pretrained(sd3_diffusers / "transformer")
    fused = SD3Transformer2DModel.from_pretrained(sd3_diffusers / "transformer")
    fused.load_lora_adapter(str(sd3_diffusers / "lora"), prefix="transformer", use_safetensors=True)
    fused.fuse_lora()
    theirs = {k.replace(".base_layer.", "."): v for k, v in fused.state_dict().items() if "lora_" not in k}
    ours = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    before = base.state_dict()
    changed = 0
    for k, v in ours.items():
        effect = (theirs[k] - before[k]).abs().max()
        changed += bool(effect > 0)
        assert (v - theirs[k]).abs().max() <= TOL * max(float(effect), 1e-30), k
    assert changed == len(read_foreign(sd3_diffusers / "lora").modules)


def test_diffusers_transformer_file_loads_like_diffusers(sd3_diffusers):
    """adapterfmt.load of the SD3-style diffusers file (a folder holding pytorch_lora_weights.safetensors,
    per-module rank and alpha from its LoraConfig metadata) gives the outputs of diffusers'
    load_lora_adapter on the same transformer, with PEFT's names."""
    import adapterfmt
    from diffusers import SD3Transformer2DModel

    theirs = SD3Transformer2DModel.from_pretrained(sd3_diffusers / "transformer").eval()
    theirs.load_lora_adapter(str(sd3_diffusers / "lora"), prefix="transformer", use_safetensors=True)
    ours = SD3Transformer2DModel.from_pretrained(sd3_diffusers / "transformer").eval()
    plain = SD3Transformer2DModel.from_pretrained(sd3_diffusers / "transformer").eval()
    adapterfmt.load(ours, sd3_diffusers / "lora")
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([3]))
    with torch.no_grad():
        expected, got, base = theirs(**inputs).sample, ours(**inputs).sample, plain(**inputs).sample
    assert (expected - base).abs().max() > 0
    assert (got - expected).abs().max() <= TOL * (expected - base).abs().max()
    name = next(iter(theirs.peft_config))  # diffusers names its adapter default_0
    lora_keys = {k for k in ours.state_dict() if ".lora_" in k}
    assert lora_keys == {k.replace(f".{name}.", ".default.") for k in theirs.state_dict() if ".lora_" in k} and lora_keys


def test_bad_foreign_inputs_are_one_error_line(tmp_path, run_cli):
    from conftest import assert_one_error_line

    save_file({"model.layers.0.weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    assert_one_error_line(run_cli("inspect", tmp_path / "plain.safetensors"), "plain.safetensors")
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "unet.b.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "mixed.safetensors"))
    assert_one_error_line(run_cli("inspect", tmp_path / "mixed.safetensors"), "mixed.safetensors")
    t = {"lora_unet_a.lora_down.weight": torch.zeros(2, 4), "lora_unet_a.hada_w1_a": torch.zeros(4, 2)}
    save_file(t, str(tmp_path / "kinds.safetensors"))
    assert_one_error_line(run_cli("inspect", tmp_path / "kinds.safetensors", "--json"), "lora_unet_a.", "loha and lora")


def test_check_cli_on_a_foreign_file(sd_lora, run_cli):
    r = run_cli("check", "--base", str(sd_lora["dir"]), "--adapter", sd_lora["file"], "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["format"] == "kohya" and doc["ok"] and {c["component"] for c in doc["components"]} == {"unet", "text_encoder"}
    r = run_cli("check", "--base", str(sd_lora["dir"] / "text_encoder"), "--adapter", sd_lora["file"], "--component", "unet")
    assert r.exit_code == 1 and "FAILED" in r.stdout and "\n  down_blocks_0" in r.stdout
