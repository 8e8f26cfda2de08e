"""LoRAs merged into an SD3 / SD3.5 single-file checkpoint (SAI MMDiT names: ``joint_blocks.N.
{x_block,context_block}.attn.qkv`` etc., with and without ComfyUI's ``model.diffusion_model.``).

diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` hard-codes no width: it cuts
``attn.qkv`` into thirds and swaps the halves of ``final_layer.adaLN_modulation.1`` and of the
last block's ``context_block.adaLN_modulation.1`` whatever the size, so the checkpoints here are
tiny ``SD3Transformer2DModel``s (SD3-medium, SD3.5-large with RMS q/k norms, SD3.5-medium with
``attn2``) written under the single file's names. Oracle: diffusers' converter applied to the
merged file gives exactly the model that diffusers' ``load_lora_adapter`` + ``fuse_lora`` (PEFT's
merge) makes of the same LoRA file on the converted model.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterfmt.tables.single_file_names import to_single_file
from conftest import assert_one_error_line

R = 4
PREFIX = "model.diffusion_model."
#: tiny configurations of the three released layouts (two joint blocks: the second is the last,
#: ``context_pre_only``)
VARIANTS = {
    "sd3-medium": {},
    "sd3.5-large": {"qk_norm": "rms_norm"},
    "sd3.5-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)},
}
#: diffusers modules the LoRA adapts: thirds of both qkv tensors, renamed ones, the swapped pairs
#: (``norm_out.linear``, the last block's ``norm1_context.linear``) and a whole modulation
TARGETS = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1_context.linear",
    "transformer_blocks.1.attn.to_k", "transformer_blocks.1.norm1_context.linear", "norm_out.linear",
]


def _model(variant: str):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8, **VARIANTS[variant],
    )


def _targets(variant: str) -> list[str]:
    return TARGETS + (["transformer_blocks.0.attn2.to_v"] if "dual_attention_layers" in VARIANTS[variant] else [])


def _to_single(state: dict[str, torch.Tensor], last: int) -> dict[str, torch.Tensor]:
    """A diffusers SD3 state dict under the single file's names (equal parts of fused tensors put
    together in order); diffusers' converter checks the result in every test."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        segs = to_single_file("sd3", "transformer", key, last=last)
        assert segs is not None, key
        if segs[0].chunk is None:
            out[segs[0].key] = value
            continue
        for seg, piece in zip(segs, value.chunk(len(segs))):
            parts.setdefault(seg.key, {})[seg.chunk[0]] = piece
    for key, pieces in parts.items():
        out[key] = torch.cat([pieces[i] for i in sorted(pieces)])
    return out


def _convert(single: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in single.items()})


def _checkpoint(variant: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    state = {k: v.detach().clone() for k, v in _model(variant).state_dict().items()}
    single = _to_single(state, last=1)
    converted = _convert(single)
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)  # the file is what diffusers reads
    return state, single


def _lora_file(path, variant: str) -> str:
    """A diffusers SD3 LoRA file as diffusers' training scripts write it (PEFT's state dict of the
    adapted transformer, ``StableDiffusion3Pipeline.save_lora_weights``)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = _model(variant)
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(r=R, lora_alpha=R, target_modules=_targets(variant), init_lora_weights=False))
    StableDiffusion3Pipeline.save_lora_weights(str(path), transformer_lora_layers=get_peft_model_state_dict(model))
    return str(path / "pytorch_lora_weights.safetensors")


def _fused(variant: str, lora: str) -> dict[str, torch.Tensor]:
    """diffusers' reading of the LoRA file, fused (PEFT's merge) into the converted model."""
    model = _model(variant)
    model.load_lora_adapter(lora, prefix="transformer")
    model.fuse_lora()
    model.unload_lora()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("variant", "prefix"), [("sd3-medium", PREFIX), ("sd3.5-large", ""), ("sd3.5-medium", PREFIX)])
def test_diffusers_lora_into_sd3_single_file_equals_diffusers_fuse(tmp_path, run_cli, variant, prefix):
    state, single = _checkpoint(variant)
    extra = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.randn(8), "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4)}
    base = str(tmp_path / "sd3.safetensors")
    save_file({**{prefix + k: v for k, v in single.items()}, **extra}, base, metadata={"modelspec.architecture": "stable-diffusion-v3-medium"})
    lora = _lora_file(tmp_path / "lora", variant)
    before = open(base, "rb").read()

    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out, "--json")
    assert res.exit_code == 0, res
    assert any("text_encoders" in line for line in res.json()["copied"])
    merged = load_file(str(out))
    assert set(merged) == {prefix + k for k in single} | set(extra)
    for k in extra:
        assert torch.equal(merged[k], extra[k])
    got = _convert({k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix) and k not in extra})
    want = _fused(variant, lora)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    changed = {k for k in want if not torch.equal(want[k], state[k])}
    assert changed == {f"{m}.weight" for m in _targets(variant)}
    assert open(base, "rb").read() == before

    res = run_cli("check", "--adapter", lora, "--base", base, "--json")
    assert res.exit_code == 0, res
    text = json.dumps(res.json())
    n = len(_targets(variant))
    assert f'"resolved": {n}, "total": {n}' in text and "rows 16:32" in text, text  # to_k: the second third of a 48-row qkv
    res = run_cli("inspect", lora, "--base", base, "--json")
    assert res.exit_code == 0, res
    modules = res.json()["modules"]
    assert {m["module"] for m in modules} == set(_targets(variant)) and all(m["checked"] for m in modules)


def test_sd3_own_names_and_kind_override(tmp_path, run_cli):
    """A LoRA under the file's own names (sd-scripts' ``lora_unet_joint_blocks_0_x_block_attn_qkv``)
    adds its product to the whole fused tensor; ``--single-file-kind sd3`` is checked against the keys."""
    _state, single = _checkpoint("sd3-medium")
    base = str(tmp_path / "sd3.safetensors")
    save_file({PREFIX + k: v for k, v in single.items()}, base)
    g = torch.Generator().manual_seed(5)
    modules = {"joint_blocks_0_x_block_attn_qkv": "joint_blocks.0.x_block.attn.qkv", "joint_blocks_1_context_block_adaLN_modulation_1":
               "joint_blocks.1.context_block.adaLN_modulation.1"}
    lora = {}
    for name, own in modules.items():
        rows, cols = single[f"{own}.weight"].shape
        lora[f"lora_unet_{name}.lora_down.weight"] = torch.randn(R, cols, generator=g)
        lora[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, R, generator=g)
        lora[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    save_file(lora, str(tmp_path / "k.safetensors"))
    out = tmp_path / "m.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "k.safetensors", "-o", out, "--single-file-kind", "sd3")
    assert res.exit_code == 0, res
    merged = load_file(str(out))
    for name, own in modules.items():
        up, down = lora[f"lora_unet_{name}.lora_up.weight"], lora[f"lora_unet_{name}.lora_down.weight"]
        assert torch.equal(merged[f"{PREFIX}{own}.weight"], single[f"{own}.weight"] + (up @ down) * (2.0 / R)), own
    assert all(torch.equal(merged[PREFIX + k], v) for k, v in single.items() if k.rpartition(".")[0] not in modules.values())

    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "k.safetensors", "-o", tmp_path / "f.safetensors", "--single-file-kind", "flux")
    assert_one_error_line(res, "Flux")
    assert not (tmp_path / "f.safetensors").exists()


def test_sd3_refusals(tmp_path, run_cli):
    state, single = _checkpoint("sd3-medium")
    base = str(tmp_path / "sd3.safetensors")
    save_file(single, base)

    # a LoRA on a text encoder: this file holds the transformer only
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(R, 16),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(16, R)}
    save_file(te, str(tmp_path / "te.safetensors"))
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "te.safetensors", "-o", tmp_path / "o.safetensors")
    assert_one_error_line(res, "text_encoder", "Stable Diffusion 3", "holds transformer")
    assert not (tmp_path / "o.safetensors").exists()

    # a qkv that cannot be cut into thirds: refused naming the key, never re-cut
    bad = dict(single)
    bad["joint_blocks.0.x_block.attn.qkv.weight"] = torch.randn(47, 16)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(R, 16),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, R)}
    save_file(lora, str(tmp_path / "q.safetensors"))
    res = run_cli("merge", "--base", str(tmp_path / "bad.safetensors"), "--adapter", tmp_path / "q.safetensors", "-o", tmp_path / "o.safetensors")
    assert_one_error_line(res, "joint_blocks.0.x_block.attn.qkv.weight", "3 equal parts")
    assert not (tmp_path / "o.safetensors").exists()

    # a Flux LoRA on an SD3 file: no name fits, both families named
    flux = {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(R, 16),
            "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(16, R)}
    save_file(flux, str(tmp_path / "flux.safetensors"))
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "flux.safetensors", "-o", tmp_path / "o.safetensors")
    assert_one_error_line(res, "single_transformer_blocks.0.proj_mlp")
    assert not (tmp_path / "o.safetensors").exists()


def _clip(seed: int, hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=hidden, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
                                                      projection_dim=hidden, vocab_size=100))


def test_lora_on_transformer_and_both_clip_encoders(tmp_path, run_cli):
    """An SD3 file with its ``text_encoders.clip_l`` / ``clip_g`` (transformers' keys behind the
    prefix, ``convert_ldm_clip_checkpoint``) and ``t5xxl``: a diffusers LoRA on the transformer and
    both CLIP encoders merges into each; diffusers' converters of the merged file give PEFT's
    ``merge_and_unload`` of each component. CLIP-L's ``text_projection``, which diffusers' loader
    replaces by the identity, is refused."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    _state, single = _checkpoint("sd3-medium")
    encoders = {"text_encoder": ("text_encoders.clip_l.transformer.", _clip(1, 16)), "text_encoder_2": ("text_encoders.clip_g.transformer.", _clip(2, 24))}
    file = {PREFIX + k: v for k, v in single.items()}
    for prefix, model in encoders.values():
        file.update({prefix + k: v.detach().clone() for k, v in model.state_dict().items()})
    file["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(8, 8)
    base = str(tmp_path / "sd3_medium_incl_clips.safetensors")
    save_file(file, base)

    layers, want = {}, {}
    for component, (_prefix, model) in encoders.items():
        torch.manual_seed(7)
        peft = get_peft_model(model, LoraConfig(r=R, lora_alpha=R, target_modules=["q_proj", "v_proj", "out_proj", "fc1"], init_lora_weights=False))
        layers[f"{component}_lora_layers"] = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(peft).items()}
        want[component] = {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}
    transformer = _model("sd3-medium")
    torch.manual_seed(3)
    transformer.add_adapter(LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights=False))
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path / "lora"), transformer_lora_layers=get_peft_model_state_dict(transformer), **layers)
    lora = str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")

    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out, "--json")
    assert res.exit_code == 0, res
    merged = load_file(str(out))
    assert torch.equal(merged["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"],
                       file["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"])
    got = _convert({k[len(PREFIX):]: v for k, v in merged.items() if k.startswith(PREFIX)})
    fused = _fused("sd3-medium", lora)
    assert all(torch.equal(got[k], fused[k]) for k in fused)
    for component, (prefix, _unused) in encoders.items():
        converted = convert_ldm_clip_checkpoint({k: v for k, v in merged.items() if k.startswith(prefix)}, prefix)
        before = convert_ldm_clip_checkpoint({k: v for k, v in file.items() if k.startswith(prefix)}, prefix)
        assert set(converted) == set(want[component])
        for k, v in want[component].items():
            assert torch.equal(converted[k], v), (component, k)
        changed = {k for k in before if not torch.equal(before[k], converted[k])}
        assert changed == {f"text_model.encoder.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")}

    res = run_cli("check", "--adapter", lora, "--base", base, "--json")
    assert res.exit_code == 0, res

    proj = {"text_encoder.text_projection.lora_A.weight": torch.zeros(R, 16), "text_encoder.text_projection.lora_B.weight": torch.zeros(16, R)}
    save_file(proj, str(tmp_path / "proj.safetensors"))
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "proj.safetensors", "-o", tmp_path / "p.safetensors")
    assert_one_error_line(res, "text_encoders.clip_l.transformer.text_projection.weight", "identity")
    assert not (tmp_path / "p.safetensors").exists()
