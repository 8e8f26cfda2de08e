"""A kohya LoRA merged into an SD 2.x single-file checkpoint: LDM UNet names and OpenCLIP ViT-H
(``cond_stage_model.model.``, q / k / v rows of the fused ``attn.in_proj_weight``). Oracle: diffusers'
``convert_ldm_unet_checkpoint`` / ``convert_open_clip_checkpoint`` of the merged file equal PEFT's
``merge_and_unload`` on the converted components, bit for bit."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import peft_merged
from adapterfmt.tables.single_file_names import to_single_file

R, ALPHA = 4, 2.0
TE = "cond_stage_model.model."


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8, 16, 16), attention_head_dim=2, cross_attention_dim=16,
                                norm_num_groups=4, use_linear_projection=True)


def _single(component: str, state: dict) -> dict:
    out, parts = {}, {}
    for key, value in state.items():
        segs = to_single_file("sd2", component, key)
        assert segs is not None, key
        if len(segs) == 1 and segs[0].end is None:
            out[segs[0].key] = value
        else:
            parts.setdefault(segs[0].key, {})[segs[0].first] = value
    out.update({k: torch.cat([p[a] for a in sorted(p)]) for k, p in parts.items()})
    return out


def test_kohya_lora_into_sd2_single_file(tmp_path, run_cli):
    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    unet = {k: v.detach().clone() for k, v in _unet().state_dict().items()}
    torch.manual_seed(1)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=32, num_attention_heads=16, num_hidden_layers=1, vocab_size=100))
    te = {"text_model." + k.removeprefix("text_model."): v.detach().clone() for k, v in te.state_dict().items() if "position_ids" not in k}
    single = {**_single("unet", unet), **_single("text_encoder", te), TE + "text_projection": torch.randn(1024, 1024)}
    base = str(tmp_path / "v2-1_768-ema-pruned.safetensors")
    save_file(single, base)

    def convert(s):
        return {"unet": convert_ldm_unet_checkpoint(dict(s), dict(_unet().config)),
                "text_encoder": convert_open_clip_checkpoint(None, {k: v for k, v in s.items() if k.startswith(TE)}, prefix=TE)}

    converted = convert(single)
    modules = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v": ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"),
               "lora_unet_up_blocks_1_attentions_0_proj_out": ("unet", "up_blocks.1.attentions.0.proj_out"),
               "lora_te_text_model_encoder_layers_0_self_attn_k_proj": ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj"),
               "lora_te_text_model_encoder_layers_0_self_attn_v_proj": ("text_encoder", "text_model.encoder.layers.0.self_attn.v_proj")}
    g = torch.Generator().manual_seed(2)
    lora, factors = {}, {"unet": {}, "text_encoder": {}}
    for name, (component, module) in modules.items():
        w = converted[component][f"{module}.weight"]
        down, up = torch.randn(R, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], R, generator=g) * 0.1
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(ALPHA)})
        factors[component][module] = (down, up)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "lora.safetensors", "-o", out)
    assert res.exit_code == 0, res
    got = convert(load_file(str(out)))
    for component, state in converted.items():
        want = peft_merged(state, factors[component], scaling=ALPHA / R)
        for k in want:
            assert torch.equal(got[component][k], want[k]), (component, k)
