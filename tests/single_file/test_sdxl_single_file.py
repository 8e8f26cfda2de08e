"""LoRAs merged into an SDXL single-file checkpoint (SGM UNet names, CLIP-L, OpenCLIP with its fused
``attn.in_proj_weight``).

The checkpoint has SDXL's structure (its UNet block layout, 1280-wide OpenCLIP attention) at
narrow widths elsewhere. Oracle: diffusers' own converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) applied to the merged file give
exactly PEFT's ``merge_and_unload`` on the converted components.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import peft_merged
from adapterfmt.tables.single_file_names import to_single_file

R, ALPHA = 4, 3.0
TE2 = "conditioner.embedders.1.model."


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(8, 16, 16),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 2, 2), cross_attention_dim=16, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4, norm_num_groups=4,
    )


def _to_single(component: str, state: dict) -> dict:
    """A diffusers component's tensors under the single file's names (rows of fused tensors concatenated)."""
    out: dict = {}
    parts: dict = {}
    for key, value in state.items():
        segs = to_single_file("sdxl", component, key)
        assert segs is not None, key
        if len(segs) == 1 and segs[0].end is None:
            out[segs[0].key] = value
        else:
            for seg in segs:
                parts.setdefault(seg.key, {})[seg.first] = value
    for key, pieces in parts.items():
        out[key] = torch.cat([pieces[a] for a in sorted(pieces)])
    return out


def _checkpoint():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = {k: v.detach().clone() for k, v in _sdxl_unet().state_dict().items()}
    torch.manual_seed(1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1, vocab_size=100))
    te1 = {"text_model." + k.removeprefix("text_model."): v.detach().clone() for k, v in te1.state_dict().items()}
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=32, num_attention_heads=20, num_hidden_layers=1,
                                                     vocab_size=100, projection_dim=1280))
    te2 = {k: v.detach().clone() for k, v in te2.state_dict().items() if k != "text_model.embeddings.position_ids"}
    single = {**_to_single("unet", unet), **_to_single("text_encoder", te1)}
    te2_single = {k: v for k, v in _to_single("text_encoder_2", {k: v for k, v in te2.items() if k != "text_projection.weight"}).items()}
    te2_single[TE2 + "text_projection"] = te2["text_projection.weight"].T.contiguous()
    single.update(te2_single)
    single["model_ema.decay"] = torch.tensor(0.9999)  # an EMA entry: copied untouched
    return single


def _convert(single: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    config = dict(_sdxl_unet().config)
    return {
        "unet": convert_ldm_unet_checkpoint(dict(single), config),
        "text_encoder": convert_ldm_clip_checkpoint({k: v for k, v in single.items() if k.startswith("conditioner.embedders.0.")}),
        "text_encoder_2": convert_open_clip_checkpoint(None, {k: v for k, v in single.items() if k.startswith(TE2)}, prefix=TE2),
    }


#: kohya name -> (component, diffusers module): SGM names for the UNet (as sd-scripts writes SDXL
#: files), diffusers names for the text encoders, parts of OpenCLIP's fused in_proj among them.
MODULES = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": ("unet", "mid_block.attentions.0.transformer_blocks.9.ff.net.2"),
    "lora_unet_output_blocks_0_0_emb_layers_1": ("unet", "up_blocks.0.resnets.0.time_emb_proj"),
    "lora_te1_text_model_encoder_layers_0_self_attn_v_proj": ("text_encoder", "text_model.encoder.layers.0.self_attn.v_proj"),
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": ("text_encoder_2", "text_model.encoder.layers.0.self_attn.k_proj"),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1"),
}


def test_kohya_sdxl_lora_into_sdxl_single_file(tmp_path, run_cli):
    single = _checkpoint()
    base = str(tmp_path / "sd_xl_base_1.0.safetensors")
    save_file(single, base, metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    converted = _convert(single)
    g = torch.Generator().manual_seed(7)
    lora, factors = {}, {c: {} for c in converted}
    for name, (component, module) in MODULES.items():
        rows, cols = converted[component][f"{module}.weight"].shape
        down, up = torch.randn(R, cols, generator=g) * 0.1, torch.randn(rows, R, generator=g) * 0.1
        lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"], lora[f"{name}.alpha"] = down, up, torch.tensor(ALPHA)
        factors[component][module] = (down, up)
    save_file(lora, str(tmp_path / "lora.safetensors"))

    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "lora.safetensors", "-o", out, "--json")
    assert res.exit_code == 0, res
    assert any("model_ema" in line for line in res.json()["copied"])
    merged = load_file(str(out))
    assert set(merged) == set(single) and torch.equal(merged["model_ema.decay"], single["model_ema.decay"])
    got = _convert(merged)
    for component, state in converted.items():
        want = peft_merged(state, factors[component], scaling=ALPHA / R)
        for k in want:
            assert torch.equal(got[component][k], want[k]), (component, k)
        changed = {k for k in want if not torch.equal(want[k], state[k])}
        assert changed == {f"{m}.weight" for m in factors[component]}

    res = run_cli("check", "--adapter", tmp_path / "lora.safetensors", "--base", base, "--json")
    assert res.exit_code == 0, res

    # OpenCLIP's text_projection is stored transposed: a LoRA on it is refused, naming the key
    save_file({"lora_te2_text_projection.lora_down.weight": torch.zeros(R, 1280), "lora_te2_text_projection.lora_up.weight": torch.zeros(1280, R)},
              str(tmp_path / "proj.safetensors"))
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "proj.safetensors", "-o", tmp_path / "p.safetensors")
    assert res.exit_code == 2 and "transposed" in res.stderr and "text_projection" in res.stderr, res
    assert not (tmp_path / "p.safetensors").exists()
