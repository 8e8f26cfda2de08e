"""kohya Flux names on a diffusers Flux transformer (fused LoRAs split as diffusers splits them), and
the refusals: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import IN, flux_state, peft_merged, to_diffusers, write_flux

R, ALPHA = 4, 2.0


def _kohya(path: str, state: dict, modules: dict[str, str], seed: int = 11, extra: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, own in modules.items():
        rows = state[f"{own}.weight"].shape[0]
        lora[f"lora_unet_{name}.lora_down.weight"] = torch.randn(R, IN, generator=g) * 0.1
        lora[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, R, generator=g) * 0.1
        lora[f"lora_unet_{name}.alpha"] = torch.tensor(ALPHA)
    lora.update(extra or {})
    save_file(lora, path)
    return lora


def _diffusers_dir(path, converted: dict) -> str:
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in converted.items()}, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1"}, f)
    return str(path)


def test_kohya_fused_names_split_onto_a_diffusers_transformer(tmp_path, run_cli):
    state = flux_state()
    converted = to_diffusers(state)
    base = _diffusers_dir(tmp_path / "transformer", converted)
    modules = {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv", "single_blocks_0_linear1": "single_blocks.0.linear1",
               "double_blocks_0_txt_attn_proj": "double_blocks.0.txt_attn.proj"}
    lora = _kohya(str(tmp_path / "k.safetensors"), state, modules)
    out = tmp_path / "merged"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "k.safetensors", "-o", out)
    assert res.exit_code == 0, res
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))

    # exact: up split by rows, down shared, alpha / rank on each part (PEFT's merge of those factors)
    parts = {"double_blocks_0_img_attn_qkv": [("transformer_blocks.0.attn.to_q", 0, 3072), ("transformer_blocks.0.attn.to_k", 3072, 6144),
                                              ("transformer_blocks.0.attn.to_v", 6144, 9216)],
             "single_blocks_0_linear1": [("single_transformer_blocks.0.attn.to_q", 0, 3072), ("single_transformer_blocks.0.attn.to_k", 3072, 6144),
                                         ("single_transformer_blocks.0.attn.to_v", 6144, 9216), ("single_transformer_blocks.0.proj_mlp", 9216, 21504)],
             "double_blocks_0_txt_attn_proj": [("transformer_blocks.0.attn.to_add_out", 0, None)]}
    factors = {}
    for name, split in parts.items():
        down, up = lora[f"lora_unet_{name}.lora_down.weight"], lora[f"lora_unet_{name}.lora_up.weight"]
        for module, a, b in split:
            factors[module] = (down, up[a:b])
    want = peft_merged(converted, factors, scaling=ALPHA / R)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    # diffusers' own converter of the kohya file, fused by PEFT (alpha baked into its factors)
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    f2 = {k[len("transformer."): -len(".lora_A.weight")]: (v, theirs[k.replace("lora_A", "lora_B")]) for k, v in theirs.items() if k.endswith("lora_A.weight")}
    assert set(f2) == set(factors)
    fused = peft_merged(converted, f2)
    for k in fused:
        torch.testing.assert_close(got[k], fused[k], rtol=1e-5, atol=1e-6)


def _refused(run_cli, tmp_path, base, adapter, *words):
    out = tmp_path / "out.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", adapter, "-o", out)
    assert res.exit_code == 2, res
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not os.path.exists(out)
    assert not [e for e in os.listdir(tmp_path) if "adapterfmt-tmp" in e]
    return lines[0]


def test_sdxl_unet_lora_on_a_flux_file_is_refused_naming_both(tmp_path, run_cli):
    base = write_flux(str(tmp_path / "flux.safetensors"), flux_state())
    save_file({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 4)},
              str(tmp_path / "sdxl.safetensors"))
    _refused(run_cli, tmp_path, base, tmp_path / "sdxl.safetensors", "Flux.1", "UNet")


def test_text_encoder_lora_on_a_flux_file_is_refused(tmp_path, run_cli):
    base = write_flux(str(tmp_path / "flux.safetensors"), flux_state())
    save_file({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4)}, str(tmp_path / "te.safetensors"))
    _refused(run_cli, tmp_path, base, tmp_path / "te.safetensors", "text_encoder", "CLIP text encoder", "Flux.1")


def test_uncovered_single_file_kind_is_named(tmp_path, run_cli):
    sdxl = str(tmp_path / "sd_xl_base.safetensors")
    save_file({"conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, sdxl)
    lora = str(tmp_path / "k.safetensors")
    _kohya(lora, flux_state(), {"double_blocks_0_img_attn_proj": "double_blocks.0.img_attn.proj"})
    _refused(run_cli, tmp_path, sdxl, lora, "Stable Diffusion XL")


def test_flux_lora_key_no_converter_knows(tmp_path, run_cli):
    state = flux_state()
    base = write_flux(str(tmp_path / "flux.safetensors"), state)
    lora = str(tmp_path / "k.safetensors")
    _kohya(lora, state, {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv"},
           extra={"lora_unet_double_blocks_0_img_attn_qkv.lokr_weird": torch.zeros(2)})
    _refused(run_cli, tmp_path, base, lora, "lokr_weird")
    lora2 = str(tmp_path / "k2.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_nothing.lora_down.weight": torch.zeros(4, IN),
               "lora_unet_double_blocks_0_img_attn_nothing.lora_up.weight": torch.zeros(8, 4)}, lora2)
    _refused(run_cli, tmp_path, base, lora2, "double_blocks_0_img_attn_nothing", "fit no tensor", "converter knows")


def test_truncated_single_file(tmp_path, run_cli):
    state = flux_state()
    base = write_flux(str(tmp_path / "flux.safetensors"), state)
    lora = str(tmp_path / "k.safetensors")
    _kohya(lora, state, {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv"})
    size = os.path.getsize(base)
    with open(base, "r+b") as f:
        f.truncate(size - 1000)
    _refused(run_cli, tmp_path, base, lora, "flux.safetensors")


def test_split_qkv_block_diagonal_file_as_diffusers_reads_it(tmp_path, run_cli):
    """sd-scripts' ``split_qkv`` files store a block-diagonal ``lora_up`` of 3× the trained rank with
    the trained alpha; diffusers scales by ``alpha / stored rank`` (and chunks ``lora_down``):
    adapterfmt does the same, on a single file (the product on the whole tensor) and on a diffusers
    base (``lora_up`` split by rows), equal to diffusers' fused model up to float rounding."""
    state = flux_state()
    g = torch.Generator().manual_seed(3)
    r = 2
    down = torch.randn(3 * r, IN, generator=g) * 0.1
    up = torch.zeros(3 * 3072, 3 * r)
    for j in range(3):
        up[j * 3072 : (j + 1) * 3072, j * r : (j + 1) * r] = torch.randn(3072, r, generator=g) * 0.1
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down, "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(float(r))}
    path = str(tmp_path / "split_qkv.safetensors")
    save_file(lora, path)
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    assert theirs["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape[0] == r  # diffusers chunked down
    converted = to_diffusers(state)
    f2 = {k[len("transformer."): -len(".lora_A.weight")]: (v, theirs[k.replace("lora_A", "lora_B")]) for k, v in theirs.items() if k.endswith("lora_A.weight")}
    fused = peft_merged(converted, f2)

    single = write_flux(str(tmp_path / "flux.safetensors"), state)
    assert run_cli("merge", "--base", single, "--adapter", path, "-o", tmp_path / "m.safetensors").exit_code == 0
    got = to_diffusers(load_file(str(tmp_path / "m.safetensors")))
    base = _diffusers_dir(tmp_path / "transformer", converted)
    assert run_cli("merge", "--base", base, "--adapter", path, "-o", tmp_path / "m2").exit_code == 0
    got2 = load_file(str(tmp_path / "m2" / "diffusion_pytorch_model.safetensors"))
    for k in fused:
        torch.testing.assert_close(got[k], fused[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got2[k], fused[k], rtol=1e-5, atol=1e-6)


def test_single_file_kind_override_and_convert_refusal(tmp_path, run_cli):
    state = flux_state()
    base = write_flux(str(tmp_path / "flux.safetensors"), state)
    lora = str(tmp_path / "k.safetensors")
    _kohya(lora, state, {"double_blocks_0_img_attn_proj": "double_blocks.0.img_attn.proj"})
    out = tmp_path / "o.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out, "--single-file-kind", "sd1")
    assert res.exit_code == 2 and "does not hold the tensors of a Stable Diffusion 1.x" in res.stderr and not out.exists(), res
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out, "--single-file-kind", "flux")
    assert res.exit_code == 0 and out.exists(), res
    for command in (("check", "--adapter", lora), ("inspect", lora)):  # check and inspect --base take the override too
        res = run_cli(*command, "--base", base, "--single-file-kind", "sd1")
        assert res.exit_code == 2 and "does not hold the tensors of a Stable Diffusion 1.x" in res.stderr, res
        res = run_cli(*command, "--base", base, "--single-file-kind", "flux", "--json")
        assert res.exit_code == 0 and json.dumps(res.json()).count('"ok": true') >= 1, res
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", tmp_path / "p.safetensors", "--dtype", "bf16")
    assert res.exit_code == 2 and "dtype does not apply" in res.stderr, res
    res = run_cli("convert", lora, "--to", "peft", "-o", tmp_path / "peft", "--base", base)
    assert res.exit_code == 2 and "single-file checkpoint" in res.stderr and not (tmp_path / "peft").exists(), res
