"""PEFT LoRA adapter directories of diffusers components merged into (and checked against) single-file
checkpoints (BEHAVIOUR §7.6).

The adapters are saved by PEFT's own ``save_pretrained`` on the diffusers-named model (the module
tree of diffusers' converted state dict, so ``base_model.model.transformer_blocks.0.attn.to_q``
keys; a UNet and CLIP encoders built by diffusers / transformers for SDXL). Oracle: diffusers' own
single-file converter applied to the merged file equals PEFT's ``merge_and_unload`` on the
converted model, bit for bit: LoRAs on parts of fused tensors, ``rank_pattern`` /
``alpha_pattern`` / rsLoRA scaling, full copies (``modules_to_save``) and DoRA on whole tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from _flux_helpers import flux_state, module_tree, to_diffusers, write_flux
from safetensors.torch import load_file, save_file
from test_no_torch import run_and_report
from test_sdxl_single_file import _checkpoint as sdxl_checkpoint
from test_sdxl_single_file import _convert as sdxl_convert

PREFIX = "model.diffusion_model."


def _peft(state: dict[str, torch.Tensor], out_dir: str, seed: int = 3, **config) -> dict[str, torch.Tensor]:
    """A PEFT adapter (random factors, changed full copies) saved with ``save_pretrained`` on the module
    tree of the diffusers state dict ``state``; returns PEFT's ``merge_and_unload`` of it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(module_tree(state), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save.default." in name or "lora_magnitude_vector" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return {k: merged.get(k, v) for k, v in state.items()}


FLUX_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
                "transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp",
                "norm_out.linear"]


def _flux_base(tmp_path, prefix: str = PREFIX) -> tuple[str, dict[str, torch.Tensor]]:
    state = flux_state()
    return write_flux(str(tmp_path / "flux1-dev.safetensors"), state, prefix=prefix, metadata={"modelspec.title": "tiny flux"}), state


def _merged_diffusers(path: str, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    merged = load_file(path)
    return to_diffusers({k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)})


def test_peft_flux_adapter_into_single_file_equals_peft_merge(tmp_path, run_cli):
    """Fused parts, the swapped norm_out pair and whole tensors; rank_pattern, alpha_pattern and
    rsLoRA; a full copy of a whole tensor (x_embedder, BFL img_in)."""
    base, state = _flux_base(tmp_path)
    converted = to_diffusers(state)
    want = _peft(converted, str(tmp_path / "peft"), r=4, lora_alpha=8, use_rslora=True, target_modules=FLUX_TARGETS,
                 rank_pattern={"single_transformer_blocks.0.proj_mlp": 2}, alpha_pattern={"norm_out.linear": 3},
                 modules_to_save=["x_embedder"])
    before = Path(base).read_bytes()
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "peft", "-o", out, "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    assert doc["applied"] == [{"lora_modules": [7, 7], "full_copies": [1, 1], "base_tensors": [0, 0], "token_rows": [0, 0]}]
    assert set(load_file(str(out))) == set(load_file(base)) and Path(base).read_bytes() == before
    got = _merged_diffusers(str(out))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    changed = {k for k in want if not torch.equal(want[k], converted[k])}
    assert changed == {f"{m}.weight" for m in FLUX_TARGETS} | {"x_embedder.weight", "x_embedder.bias"}

    res = run_cli("check", "--adapter", tmp_path / "peft", "--base", base, "--json")
    assert res.exit_code == 0, res
    assert res.json()["ok"] is True
    res = run_cli("inspect", tmp_path / "peft", "--base", base, "--json")
    assert res.exit_code == 0, res
    assert '"ok": true' in json.dumps(res.json())
    for args in (("check", "--adapter", str(tmp_path / "peft"), "--base", base), ("inspect", str(tmp_path / "peft"), "--base", base)):
        code, loaded, stdout = run_and_report(*args)  # header-only: a fresh interpreter never imports torch
        assert code == 0 and stdout and loaded == [], (args, loaded)


def test_peft_dora_on_whole_tensor_merges_and_on_fused_part_is_refused(tmp_path, run_cli):
    base, state = _flux_base(tmp_path, prefix="")
    converted = to_diffusers(state)
    want = _peft(converted, str(tmp_path / "dora"), r=4, lora_alpha=4, use_dora=True, target_modules=["transformer_blocks.0.attn.to_out.0", "proj_out"])
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "dora", "-o", out)
    assert res.exit_code == 0, res
    got = _merged_diffusers(str(out), prefix="")
    for k in want:
        assert torch.equal(got[k], want[k]), k

    _peft(converted, str(tmp_path / "dora_q"), r=4, lora_alpha=4, use_dora=True, target_modules=["transformer_blocks.0.attn.to_q"])
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "dora_q", "-o", tmp_path / "q.safetensors")
    assert res.exit_code == 2 and "DoRA" in res.stderr and "double_blocks.0.img_attn.qkv" in res.stderr, res
    assert not (tmp_path / "q.safetensors").exists()


def test_full_copy_on_part_of_fused_tensor_is_refused_naming_it(tmp_path, run_cli):
    base, state = _flux_base(tmp_path)
    _peft(to_diffusers(state), str(tmp_path / "peft"), r=4, target_modules=["transformer_blocks.0.attn.to_out.0"],
          modules_to_save=["transformer_blocks.0.attn.to_k"])
    for cmd in (("merge", "--base", base, "--adapter", tmp_path / "peft", "-o", tmp_path / "m.safetensors"),
                ("check", "--base", base, "--adapter", tmp_path / "peft")):
        res = run_cli(*cmd)
        assert res.exit_code == 2, res
        assert "transformer_blocks.0.attn.to_k.weight" in res.stderr and "fused" in res.stderr and "transformer_blocks.0.attn.to_k.weight (rows of model.diffusion_model.double_blocks.0.img_attn.qkv.weight)" in res.stderr, res
    assert not (tmp_path / "m.safetensors").exists()


def test_unresolved_and_other_family_refused(tmp_path, run_cli):
    base, _state = _flux_base(tmp_path)
    tree = {"down_blocks.0.attentions.0.proj_in.weight": torch.randn(8, 8)}
    _peft(tree, str(tmp_path / "unet"), r=2, target_modules=["proj_in"])
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "unet", "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 2 and "down_blocks.0.attentions.0.proj_in" in res.stderr and "Flux.1" in res.stderr, res
    assert not (tmp_path / "m.safetensors").exists()
    res = run_cli("check", "--base", base, "--adapter", tmp_path / "unet", "--json")
    assert res.exit_code == 1 and res.json()["ok"] is False, res
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "unet", "-o", tmp_path / "m.safetensors", "--dtype", "bf16")
    assert res.exit_code == 2 and "dtype" in res.stderr, res


def test_sdxl_unet_and_text_encoder_adapters(tmp_path, run_cli):
    """A UNet adapter and a CLIP adapter (diffusers names, OpenCLIP's fused in_proj among them) into one
    SDXL file. The CLIP adapter's names fit both text encoders: its shapes decide; where they
    cannot (a module of the same shape in both), the merge is refused naming --component."""
    single = sdxl_checkpoint()
    base = str(tmp_path / "sd_xl_base_1.0.safetensors")
    save_file(single, base)
    converted = sdxl_convert(single)
    want_unet = _peft(converted["unet"], str(tmp_path / "unet"), r=4, lora_alpha=2,
                      target_modules=["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "up_blocks.0.resnets.0.time_emb_proj"])
    want_te2 = _peft(converted["text_encoder_2"], str(tmp_path / "te2"), r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"])
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "unet", "--adapter", tmp_path / "te2", "-o", out)
    assert res.exit_code == 0, res
    got = sdxl_convert(load_file(str(out)))
    for component, want in (("unet", want_unet), ("text_encoder_2", want_te2), ("text_encoder", converted["text_encoder"])):
        for k in want:
            assert torch.equal(got[component][k], want[k]), (component, k)

    # the same module names in both encoders, and shapes that fit both: the user decides
    fake = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(1280, 1280)}
    same = {k: v for k, v in single.items() if not k.startswith("conditioner.embedders.0.")}
    for k, v in single.items():  # te1's q_proj as wide as te2's
        if k.startswith("conditioner.embedders.0.") and k.endswith("q_proj.weight"):
            same[k] = torch.randn(1280, 1280)
        elif k.startswith("conditioner.embedders.0."):
            same[k] = v
    save_file(same, str(tmp_path / "same.safetensors"))
    _peft(fake, str(tmp_path / "q"), r=2, target_modules=["q_proj"])
    res = run_cli("merge", "--base", tmp_path / "same.safetensors", "--adapter", tmp_path / "q", "-o", tmp_path / "q.safetensors")
    assert res.exit_code == 2 and "--component text_encoder" in res.stderr and "text_encoder_2" in res.stderr, res
    assert not (tmp_path / "q.safetensors").exists()
    res = run_cli("check", "--base", tmp_path / "same.safetensors", "--adapter", tmp_path / "q")
    assert res.exit_code == 2 and "--component text_encoder" in res.stderr, res
    res = run_cli("check", "--base", tmp_path / "same.safetensors", "--adapter", tmp_path / "q", "--component", "text_encoder_2", "--json")
    assert res.exit_code == 0 and res.json()["ok"] is True, res
    res = run_cli("inspect", tmp_path / "q", "--base", tmp_path / "same.safetensors", "--component", "text_encoder", "--json")
    assert res.exit_code == 0, res
    res = run_cli("merge", "--base", tmp_path / "same.safetensors", "--adapter", tmp_path / "q", "-o", tmp_path / "q.safetensors",
                  "--component", "text_encoder")
    assert res.exit_code == 0, res
    merged = load_file(str(tmp_path / "q.safetensors"))
    changed = sorted(k for k in merged if not torch.equal(merged[k], same[k]))
    assert changed == ["conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert os.path.getsize(tmp_path / "q.safetensors") == os.path.getsize(tmp_path / "same.safetensors")


def test_peft_adapter_saved_on_sd3_transformer(tmp_path, run_cli):
    """PEFT's ``get_peft_model`` + ``save_pretrained`` on a diffusers ``SD3Transformer2DModel`` (SD3.5-medium
    layout: thirds of ``attn.qkv`` and ``attn2.qkv``, the last block's swapped ``norm1_context``),
    merged into its single file with ComfyUI's prefix, equals PEFT's ``merge_and_unload``."""
    from peft import LoraConfig, get_peft_model
    from test_sd3_single_file import _checkpoint as sd3_checkpoint
    from test_sd3_single_file import _convert as sd3_convert
    from test_sd3_single_file import _model as sd3_model
    from test_sd3_single_file import _targets as sd3_targets

    variant = "sd3.5-medium"
    state, single = sd3_checkpoint(variant)
    base = str(tmp_path / "sd3.5_medium.safetensors")
    save_file({PREFIX + k: v for k, v in single.items()}, base)
    torch.manual_seed(4)
    model = get_peft_model(sd3_model(variant), LoraConfig(r=4, lora_alpha=2, target_modules=sd3_targets(variant), init_lora_weights=False,
                                                          alpha_pattern={"transformer_blocks.1.attn.to_k": 8}))
    model.save_pretrained(str(tmp_path / "peft"))
    want = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "peft", "-o", out)
    assert res.exit_code == 0, res
    got = sd3_convert({k[len(PREFIX):]: v for k, v in load_file(str(out)).items()})
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert {k for k in want if not torch.equal(want[k], state[k])} == {f"{m}.weight" for m in sd3_targets(variant)}


def test_sd1_peft_adapters_on_transformers_clip_and_diffusers_unet(tmp_path, run_cli):
    """PEFT's ``get_peft_model`` + ``save_pretrained`` on transformers 5's ``CLIPTextModel`` (module names
    without ``text_model.``, FORMAT §10.4's alias) and on diffusers' ``UNet2DConditionModel`` (a conv
    LoRA among them), both merged into one SD 1.x file with a weight each."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
    )
    from peft import LoraConfig, get_peft_model
    from test_sd1_single_file import _single as sd1_single
    from test_sd1_single_file import _unet as sd1_unet
    from transformers import CLIPTextConfig, CLIPTextModel

    def clip():
        torch.manual_seed(1)
        return CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2, vocab_size=100))

    te = {"text_model." + k: v.detach().clone() for k, v in clip().state_dict().items()}
    single = {**sd1_single("unet", {k: v.detach().clone() for k, v in sd1_unet().state_dict().items()}), **sd1_single("text_encoder", te)}
    base = str(tmp_path / "v1-5.safetensors")
    save_file(single, base)
    weights = {"unet": 0.5, "text_encoder": 2.0}
    want = {}
    for component, model, targets in (("unet", sd1_unet(), ["attn2.to_k", "down_blocks.0.resnets.0.conv1", "proj_in"]),
                                      ("text_encoder", clip(), ["q_proj", "fc2"])):
        torch.manual_seed(6)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False))
        peft.save_pretrained(str(tmp_path / component))
        for layer in peft.modules():  # a merge weight multiplies each module's scaling (as PEFT's own scale_layer)
            if hasattr(layer, "scale_layer") and hasattr(layer, "lora_A"):
                layer.scale_layer(weights[component])
        want[component] = {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "unet", "--adapter", tmp_path / "text_encoder", "--weight", "0.5",
                  "--weight", "2", "-o", out)
    assert res.exit_code == 0, res
    merged = load_file(str(out))
    got = {"unet": convert_ldm_unet_checkpoint(dict(merged), dict(sd1_unet().config)), "text_encoder": convert_ldm_clip_checkpoint(dict(merged))}
    before = {"unet": dict(sd1_unet().state_dict()), "text_encoder": {k: v for k, v in clip().state_dict().items()}}
    changed = 0
    for component, state in want.items():
        for k, v in state.items():
            mine = got[component][k if component == "unet" else "text_model." + k]
            assert torch.equal(mine, v), (component, k)
            changed += not torch.equal(v, before[component][k])
    assert changed > 10 and sum(not torch.equal(merged[k], single[k]) for k in single) == changed  # nothing else moved


def test_peft_adapter_saved_on_wan_transformer(tmp_path, run_cli):
    """PEFT on a diffusers ``WanTransformer3DModel`` (I2V: ``add_k_proj`` of the image attention among
    the targets; rsLoRA; a full copy of ``proj_out``) into a bare Wan single file."""
    from peft import LoraConfig, get_peft_model

    from test_wan import I2V
    from test_wan import _convert as wan_convert
    from test_wan import _model as wan_model
    from test_wan import _wan_single

    state = {k: v.detach().clone() for k, v in wan_model(I2V).state_dict().items()}
    single = _wan_single(state)
    base = str(tmp_path / "wan2.1_i2v.safetensors")
    save_file(single, base)
    torch.manual_seed(8)
    model = get_peft_model(wan_model(I2V), LoraConfig(r=4, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                                      target_modules=["to_q", "add_k_proj", "ffn.net.0.proj"], modules_to_save=["proj_out"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save.default." in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path / "peft"))
    want = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "peft", "-o", out)
    assert res.exit_code == 0, res
    got = wan_convert(load_file(str(out)))
    changed = {k for k in want if not torch.equal(want[k], state[k])}
    assert "proj_out.weight" in changed and "blocks.1.attn2.add_k_proj.weight" in changed
    for k in want:
        assert torch.equal(got[k], want[k]), k
