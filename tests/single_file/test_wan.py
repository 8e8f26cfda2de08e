"""Wan 2.1 / 2.2 video: ComfyUI Wan LoRA files (``diffusion_model.blocks.0.self_attn.q``, …) on a
diffusers ``WanTransformer3DModel`` folder, and Wan single files (Wan's own names, with or without
ComfyUI's ``model.diffusion_model.``) as bases.

Oracles: diffusers' own reading of the LoRA file (``WanPipeline.lora_state_dict``, which runs
``_convert_non_diffusers_wan_lora_to_diffusers``) loaded with ``load_lora_adapter`` and fused
(``fuse_lora``: PEFT's merge) into the model; for a single file, diffusers' converter
``convert_wan_transformer_to_diffusers`` applied to the merged file.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import peft_merged
from adapterfmt.tables.single_file_names import to_single_file
from conftest import assert_one_error_line

R = 4
PREFIX = "model.diffusion_model."
T2V = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, ffn_dim=32, text_dim=24, freq_dim=8, in_channels=4, out_channels=4)
I2V = dict(T2V, image_dim=12, added_kv_proj_dim=16)
#: Wan's own module names a ComfyUI LoRA adapts (``k_img`` / ``v_img`` on the I2V model only)
MODULES = ["blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.1.self_attn.v", "blocks.0.cross_attn.k", "blocks.1.cross_attn.o",
           "blocks.0.ffn.0", "blocks.1.ffn.2", "head.head", "time_projection.1", "text_embedding.0"]
I2V_MODULES = ["blocks.0.cross_attn.k_img", "blocks.1.cross_attn.v_img", "img_emb.proj.1"]


def _model(config: dict):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**config)


def _modules(config: dict) -> list[str]:
    return MODULES + (I2V_MODULES if "image_dim" in config else [])


def _comfy_lora(path, model, config: dict, *, alpha: float | None = None, seed: int = 1, modules: list[str] | None = None) -> str:
    """A ComfyUI Wan LoRA: ``diffusion_model.<Wan module>.lora_A/B.weight`` (+ ``.alpha``), shaped
    after the diffusers module each name is (Wan's original code has the same shapes)."""
    from adapterfmt.tables.single_file_names import tables

    names = tables()["kinds"]["wan"]["transformer"]["names"]  # only to size the factors
    own_to_diffusers = {}
    for d, own in names.items():
        if d.endswith(".weight"):
            own_to_diffusers[own[: -len(".weight")]] = d[: -len(".weight")]
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules or _modules(config):
        block = m.split(".")[1] if m.startswith("blocks.") else None
        template = m.replace(f"blocks.{block}.", "blocks.{i}.", 1) if block else m
        weight = model.get_submodule(own_to_diffusers[template].replace("{i}", block or "")).weight
        state[f"diffusion_model.{m}.lora_A.weight"] = torch.randn(R, weight.shape[1], generator=g) * 0.1
        state[f"diffusion_model.{m}.lora_B.weight"] = torch.randn(weight.shape[0], R, generator=g) * 0.1
        if alpha is not None:
            state[f"diffusion_model.{m}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return str(path)


def _diffusers_fused(config: dict, lora: str) -> dict[str, torch.Tensor]:
    """diffusers' reading of the ComfyUI file, fused into the model."""
    from diffusers import WanPipeline

    model = _model(config)
    model.load_lora_adapter(WanPipeline.lora_state_dict(lora), prefix="transformer")
    model.fuse_lora()
    model.unload_lora()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _transformer_dir(path, config: dict) -> tuple[str, dict[str, torch.Tensor]]:
    model = _model(config)
    model.save_pretrained(str(path))
    return str(path), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [T2V, I2V], ids=["t2v", "i2v"])
def test_comfy_wan_lora_on_a_diffusers_wan_transformer(tmp_path, run_cli, config):
    base, state = _transformer_dir(tmp_path / "transformer", config)
    lora = _comfy_lora(tmp_path / "wan_lora.safetensors", _model(config), config)

    res = run_cli("check", "--adapter", lora, "--base", base, "--json")
    assert res.exit_code == 0, res
    n = len(_modules(config))
    assert f'"resolved": {n}, "total": {n}' in json.dumps(res.json())

    out = tmp_path / "merged"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out)
    assert res.exit_code == 0, res
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    want = _diffusers_fused(config, lora)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    changed = {k for k in want if not torch.equal(want[k], state[k])}
    assert len(changed) == n


def test_comfy_wan_lora_with_alpha(tmp_path, run_cli):
    """``alpha / rank`` scales each module: PEFT's merge of the file's factors at that scale, bit for
    bit; diffusers folds the scale into the factors before fusing (equal up to float rounding).
    (diffusers' converter reads an ``alpha`` only inside the blocks: on ``head.head`` it raises.)"""
    base, state = _transformer_dir(tmp_path / "transformer", T2V)
    model = _model(T2V)
    blocks = [m for m in MODULES if m.startswith("blocks.")]
    lora = _comfy_lora(tmp_path / "wan_lora.safetensors", model, T2V, alpha=2.0, modules=blocks)
    out = tmp_path / "merged"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out)
    assert res.exit_code == 0, res
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))

    from diffusers import WanPipeline

    converted = WanPipeline.lora_state_dict(lora)
    file = load_file(lora)
    ups = {m: file[f"diffusion_model.{m}.lora_B.weight"] for m in blocks}
    factors = {}
    for k, up in converted.items():  # diffusers folds alpha / rank = 0.5 into lora_A only: lora_B tells which module it is
        if k.endswith(".lora_B.weight"):
            own = next(m for m, u in ups.items() if u.shape == up.shape and torch.equal(u, up))
            factors[k[len("transformer."): -len(".lora_B.weight")]] = (file[f"diffusion_model.{own}.lora_A.weight"], ups[own])
    assert len(factors) == len(blocks)
    want = peft_merged(state, factors, scaling=2.0 / R)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    fused = _diffusers_fused(T2V, lora)
    for k in fused:
        torch.testing.assert_close(got[k], fused[k], rtol=1e-5, atol=1e-6)


def test_modules_diffusers_lora_converter_does_not_map_stay_unresolved(tmp_path, run_cli):
    """``blocks.0.norm3`` is diffusers' ``norm2`` in a single file, but its LoRA converter maps no
    LoRA on it: on a diffusers base the name stays unresolved, and merge refuses naming it."""
    base, _state = _transformer_dir(tmp_path / "transformer", T2V)
    lora = {"diffusion_model.blocks.0.norm3.lora_A.weight": torch.zeros(R, 16), "diffusion_model.blocks.0.norm3.lora_B.weight": torch.zeros(16, R),
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(R, 16),
            "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(16, R)}
    save_file(lora, str(tmp_path / "l.safetensors"))
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "l.safetensors", "-o", tmp_path / "out")
    assert_one_error_line(res, "blocks.0.norm3")
    assert not (tmp_path / "out").exists()


def _wan_single(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Wan state dict under Wan's own names; diffusers' converter checks the result."""
    out = {}
    for key, value in state.items():
        segs = to_single_file("wan", "transformer", key)
        assert segs is not None and len(segs) == 1 and segs[0].end is None, key
        out[segs[0].key] = value
    return out


def _convert(single: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers({k: v.clone() for k, v in single.items()})


@pytest.mark.parametrize(("config", "prefix"), [(T2V, PREFIX), (I2V, "")], ids=["t2v-comfy", "i2v-bare"])
def test_comfy_wan_lora_into_a_wan_single_file(tmp_path, run_cli, config, prefix):
    state = {k: v.detach().clone() for k, v in _model(config).state_dict().items()}
    single = _wan_single(state)
    assert all(torch.equal(v, state[k]) for k, v in _convert(single).items()) and set(_convert(single)) == set(state)
    base = str(tmp_path / "wan2.1_t2v_1.3B_fp16.safetensors")
    save_file({prefix + k: v for k, v in single.items()}, base)
    lora = _comfy_lora(tmp_path / "wan_lora.safetensors", _model(config), config)
    before = open(base, "rb").read()

    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out, "--json")
    assert res.exit_code == 0, res
    merged = load_file(str(out))
    assert set(merged) == {prefix + k for k in single}
    got = _convert({k[len(prefix):]: v for k, v in merged.items()})
    want = _diffusers_fused(config, lora)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert open(base, "rb").read() == before

    # the same LoRA under diffusers' names (diffusers' own conversion of the file) lands on the same tensors
    from diffusers import WanPipeline

    save_file(WanPipeline.lora_state_dict(lora), str(tmp_path / "diffusers_lora.safetensors"))
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "diffusers_lora.safetensors", "-o", tmp_path / "m2.safetensors")
    assert res.exit_code == 0, res
    again = load_file(str(tmp_path / "m2.safetensors"))
    assert all(torch.equal(again[k], merged[k]) for k in merged)

    res = run_cli("check", "--adapter", lora, "--base", base, "--single-file-kind", "wan", "--json")
    assert res.exit_code == 0, res


def test_wan_single_file_refusals(tmp_path, run_cli):
    state = {k: v.detach().clone() for k, v in _model(T2V).state_dict().items()}
    base = str(tmp_path / "wan.safetensors")
    save_file(_wan_single(state), base)
    sd3 = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(R, 16),
           "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, R)}
    save_file(sd3, str(tmp_path / "sd3.safetensors"))
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "sd3.safetensors", "-o", tmp_path / "o.safetensors")
    assert_one_error_line(res, "transformer_blocks.0.attn.to_q")
    assert not (tmp_path / "o.safetensors").exists()
    lora = _comfy_lora(tmp_path / "wan_lora.safetensors", _model(T2V), T2V)
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", tmp_path / "o.safetensors", "--single-file-kind", "sd3")
    assert_one_error_line(res, "Stable Diffusion 3")
    assert not (tmp_path / "o.safetensors").exists()


def test_musubi_tuner_wan_lora_on_a_diffusers_wan_transformer(tmp_path, run_cli):
    """musubi-tuner's Wan files are kohya-flattened (``lora_unet_blocks_0_self_attn_q``, with an
    ``alpha`` each): the same modules, flattened, resolve through the same table; merged, PEFT's
    merge of the file's factors at ``alpha / rank`` bit for bit, and diffusers'
    ``_convert_musubi_wan_lora_to_diffusers`` + ``fuse_lora`` up to float rounding."""
    from diffusers import WanPipeline

    base, state = _transformer_dir(tmp_path / "transformer", T2V)
    model = _model(T2V)
    g = torch.Generator().manual_seed(4)
    lora, factors = {}, {}
    for i in range(T2V["num_layers"]):
        for own, module in [*((f"self_attn_{p}", f"attn1.{d}") for p, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))),
                            *((f"cross_attn_{p}", f"attn2.{d}") for p, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))),
                            ("ffn_0", "ffn.net.0.proj"), ("ffn_2", "ffn.net.2")]:
            weight = model.get_submodule(f"blocks.{i}.{module}").weight
            down, up = torch.randn(R, weight.shape[1], generator=g) * 0.1, torch.randn(weight.shape[0], R, generator=g) * 0.1
            name = f"lora_unet_blocks_{i}_{own}"
            lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"], lora[f"{name}.alpha"] = down, up, torch.tensor(2.0)
            factors[f"blocks.{i}.{module}"] = (down, up)
    path = str(tmp_path / "musubi.safetensors")
    save_file(lora, path)
    out = tmp_path / "merged"
    res = run_cli("merge", "--base", base, "--adapter", path, "-o", out)
    assert res.exit_code == 0, res
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    want = peft_merged(state, factors, scaling=2.0 / R)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    theirs = _model(T2V)
    theirs.load_lora_adapter(WanPipeline.lora_state_dict(path), prefix="transformer")
    theirs.fuse_lora()
    theirs.unload_lora()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
