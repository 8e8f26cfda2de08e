"""kohya / ComfyUI SD3 LoRAs under the single file's fused names on a diffusers SD3 transformer folder.

diffusers 0.42 has no converter for non-diffusers SD3 LoRAs (``lora_conversion_utils`` converts
kohya / XLabs Flux, Wan, ... but no ``joint_blocks``), so the split is the Flux rule: ``lora_up``
by rows in equal thirds onto ``to_q`` / ``to_k`` / ``to_v`` (``add_{q,k,v}_proj`` for a
``context_block``, ``attn2.to_{q,k,v}`` for SD3.5-medium's ``attn2``), ``lora_down`` shared, each
part with the module's ``alpha / rank``; renamed modules (``attn.proj`` -> ``attn.to_out.0``)
resolve to their diffusers module. Oracles: PEFT's ``merge_and_unload`` of the split factors on
the diffusers model (bit for bit), and the same file merged into the single file then converted
by diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import peft_merged
from conftest import assert_one_error_line
from test_sd3_single_file import PREFIX, R, _checkpoint, _convert, _model

#: own (single-file) module -> the diffusers modules it holds, in row order
FUSED = {
    "joint_blocks.0.x_block.attn.qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"],
    "joint_blocks.1.context_block.attn.qkv": ["transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.add_k_proj",
                                              "transformer_blocks.1.attn.add_v_proj"],
    "joint_blocks.0.x_block.attn2.qkv": ["transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v"],
}
RENAMED = {"joint_blocks.0.x_block.attn.proj": "transformer_blocks.0.attn.to_out.0"}
ALPHA = 2.0


def _lora(single: dict[str, torch.Tensor], style: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The fused-name file (kohya or ComfyUI keys) and its factors per own module."""
    g = torch.Generator().manual_seed(9)
    state, factors = {}, {}
    for own in list(FUSED) + list(RENAMED):
        rows, cols = single[f"{own}.weight"].shape
        down, up = torch.randn(R, cols, generator=g) * 0.1, torch.randn(rows, R, generator=g) * 0.1
        factors[own] = (down, up)
        name = f"lora_unet_{own.replace('.', '_')}" if style == "kohya" else f"diffusion_model.{own}"
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], state[f"{name}.alpha"] = down, up, torch.tensor(ALPHA)
    return state, factors


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_fused_sd3_names_on_diffusers_transformer(tmp_path, run_cli, style):
    state, single = _checkpoint("sd3.5-medium")
    model = _model("sd3.5-medium")
    model.save_pretrained(str(tmp_path / "transformer"))
    lora, factors = _lora(single, style)
    save_file(lora, str(tmp_path / "lora.safetensors"))

    res = run_cli("check", "--adapter", tmp_path / "lora.safetensors", "--base", tmp_path / "transformer", "--json")
    assert res.exit_code == 0, res
    out = tmp_path / "merged"
    res = run_cli("merge", "--base", tmp_path / "transformer", "--adapter", tmp_path / "lora.safetensors", "-o", out)
    assert res.exit_code == 0, res
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))

    split = {}  # lora_up by rows in thirds, lora_down shared
    for own, parts in FUSED.items():
        down, up = factors[own]
        for part, piece in zip(parts, up.chunk(3)):
            split[part] = (down, piece.contiguous())
    for own, d in RENAMED.items():
        split[d] = factors[own]
    want = peft_merged(state, split, scaling=ALPHA / R)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert {k for k in want if not torch.equal(want[k], state[k])} == {f"{m}.weight" for m in split}

    # the same file merged into the single file, converted by diffusers: the same model
    base = str(tmp_path / "sd35m.safetensors")
    save_file({PREFIX + k: v for k, v in single.items()}, base)
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res
    merged = load_file(str(tmp_path / "m.safetensors"))
    converted = _convert({k[len(PREFIX):]: v for k, v in merged.items()})
    for k in want:
        assert torch.equal(converted[k], got[k]), k


def test_fused_name_of_another_size_stays_unresolved(tmp_path, run_cli):
    """A qkv LoRA whose lora_up is not the three parts' rows is not re-cut: it resolves nowhere, refused, nothing written."""
    state, single = _checkpoint("sd3-medium")
    _model("sd3-medium").save_pretrained(str(tmp_path / "transformer"))
    lora = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(R, 16),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(47, R)}
    save_file(lora, str(tmp_path / "bad.safetensors"))
    res = run_cli("merge", "--base", tmp_path / "transformer", "--adapter", tmp_path / "bad.safetensors", "-o", tmp_path / "o")
    assert_one_error_line(res, "joint_blocks_0_x_block_attn_qkv", "match no module")
    assert not (tmp_path / "o").exists()

