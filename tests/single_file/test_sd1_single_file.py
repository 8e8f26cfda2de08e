"""A kohya LoRA (diffusers module names, as sd-scripts writes SD 1.x files) merged into an SD 1.x
single-file checkpoint (LDM names). Oracle: diffusers' ``convert_ldm_unet_checkpoint`` /
``convert_ldm_clip_checkpoint`` of the merged file equal PEFT's ``merge_and_unload`` on the
converted components, bit for bit; the EMA copies are copied untouched."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import peft_merged
from adapterfmt.tables.single_file_names import to_single_file

R, ALPHA = 4, 1.0


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # SD 1.x's block layout (the class defaults) at narrow widths
    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 16, 16), attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4)


def _single(component: str, state: dict) -> dict:
    out = {}
    for key, value in state.items():
        segs = to_single_file("sd1", component, key)
        assert segs is not None and len(segs) == 1 and segs[0].end is None, key
        out[segs[0].key] = value
    return out


def test_kohya_lora_into_sd1_single_file(tmp_path, run_cli):
    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint

    unet = {k: v.detach().clone() for k, v in _unet().state_dict().items()}
    torch.manual_seed(1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2, vocab_size=100))
    te = {"text_model." + k.removeprefix("text_model."): v.detach().clone() for k, v in te.state_dict().items()}
    single = {**_single("unet", unet), **_single("text_encoder", te)}
    ema = {"model_ema." + k.replace("model.diffusion_model.", "").replace(".", ""): v.clone() for k, v in list(single.items())[:3]}
    single.update(ema)
    base = str(tmp_path / "v1-5-pruned.safetensors")
    save_file(single, base)

    def convert(s):
        return {"unet": convert_ldm_unet_checkpoint(dict(s), dict(_unet().config)), "text_encoder": convert_ldm_clip_checkpoint(dict(s))}

    converted = convert(single)
    modules = {"lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k": ("unet", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"),
               "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0": ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0"),
               "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
               "lora_te_text_model_encoder_layers_1_self_attn_out_proj": ("text_encoder", "text_model.encoder.layers.1.self_attn.out_proj")}
    g = torch.Generator().manual_seed(2)
    lora, factors = {}, {"unet": {}, "text_encoder": {}}
    for name, (component, module) in modules.items():
        w = converted[component][f"{module}.weight"]
        down, up = torch.randn(R, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], R, generator=g) * 0.1
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)})
        factors[component][module] = (down, up)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "lora.safetensors", "-o", out, "--json")
    assert res.exit_code == 0, res
    merged = load_file(str(out))
    assert all(torch.equal(merged[k], v) for k, v in ema.items())
    got = convert(merged)
    for component, state in converted.items():
        want = peft_merged(state, factors[component], scaling=ALPHA / R)
        for k in want:
            assert torch.equal(got[component][k], want[k]), (component, k)
