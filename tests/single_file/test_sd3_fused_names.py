"""kohya / ComfyUI SD3 LoRAs under the MMDiT names (``lora_unet_joint_blocks_0_x_block_attn_qkv``,
``diffusion_model.joint_blocks.0.x_block.attn.qkv``) merged into a diffusers SD3 transformer directory.

diffusers 0.42 has no converter of such files for SD3 (``SD3LoraLoaderMixin.lora_state_dict``
converts nothing), so the fused ``qkv`` is split as the Flux case is: ``lora_up`` by rows onto
``to_q`` / ``to_k`` / ``to_v`` (``add_{q,k,v}_proj`` for the context block) in the equal thirds
``convert_sd3_transformer_checkpoint_to_diffusers`` cuts, ``lora_down`` shared, each part with
the module's ``alpha / r``. Oracles: PEFT's ``merge_and_unload`` of the split factors, bit for
bit; and merging the same file into the SD3 single file, then diffusers' converter (bit for bit too).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import peft_merged
from test_sd3_single_file import _checkpoint, _convert, _model

R, ALPHA = 4, 2.0
#: own module -> the diffusers modules of its thirds, or one renamed module
MODULES = {
    "joint_blocks.0.x_block.attn.qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"],
    "joint_blocks.0.context_block.attn.qkv": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
                                              "transformer_blocks.0.attn.add_v_proj"],
    "joint_blocks.1.x_block.attn.qkv": ["transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_v"],
    "joint_blocks.0.x_block.attn.proj": ["transformer_blocks.0.attn.to_out.0"],
}


def _lora(state: dict[str, torch.Tensor], style: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The fused file and the split factors (PEFT's modules, ``up`` rows, ``down`` shared)."""
    g = torch.Generator().manual_seed(11)
    lora, factors = {}, {}
    for own, parts in MODULES.items():
        rows = sum(state[f"{p}.weight"].shape[0] for p in parts)
        down = torch.randn(R, state[f"{parts[0]}.weight"].shape[1], generator=g) * 0.1
        up = torch.randn(rows, R, generator=g) * 0.1
        name = f"lora_unet_{own.replace('.', '_')}" if style == "kohya" else f"diffusion_model.{own}"
        lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"], lora[f"{name}.alpha"] = down, up, torch.tensor(ALPHA)
        for p, piece in zip(parts, up.chunk(len(parts))):
            factors[p] = (down, piece.contiguous())
    return lora, factors


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_sd3_fused_names_on_diffusers_transformer(tmp_path, run_cli, style):
    state, single = _checkpoint("sd3-medium")
    _model("sd3-medium").save_pretrained(str(tmp_path / "transformer"))
    lora, factors = _lora(state, style)
    save_file(lora, str(tmp_path / "lora.safetensors"))

    res = run_cli("check", "--base", tmp_path / "transformer", "--adapter", tmp_path / "lora.safetensors", "--json")
    assert res.exit_code == 0 and res.json()["ok"] is True, res
    out = tmp_path / "merged"
    res = run_cli("merge", "--base", tmp_path / "transformer", "--adapter", tmp_path / "lora.safetensors", "-o", out)
    assert res.exit_code == 0, res
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    want = peft_merged(state, factors, scaling=ALPHA / R)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert {k for k in want if not torch.equal(want[k], state[k])} == {f"{p}.weight" for p in factors}

    # the same file into the single file, read by diffusers' converter
    save_file(single, str(tmp_path / "sd3.safetensors"))
    res = run_cli("merge", "--base", tmp_path / "sd3.safetensors", "--adapter", tmp_path / "lora.safetensors", "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res
    via_single = _convert(load_file(str(tmp_path / "m.safetensors")))
    for k in want:
        assert torch.equal(via_single[k], got[k]), k


def test_sd3_swapped_and_unequal_have_no_split(tmp_path, run_cli):
    """The last block's ``context_block.adaLN_modulation.1`` (halves swapped into ``norm1_context``)
    has no split on a diffusers base: unresolved, named, nothing written."""
    state, _single = _checkpoint("sd3-medium")
    _model("sd3-medium").save_pretrained(str(tmp_path / "transformer"))
    rows = state["transformer_blocks.1.norm1_context.linear.weight"].shape[0]
    lora = {"lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_down.weight": torch.zeros(R, 16),
            "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight": torch.zeros(rows, R)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    res = run_cli("merge", "--base", tmp_path / "transformer", "--adapter", tmp_path / "lora.safetensors", "-o", tmp_path / "out")
    assert res.exit_code == 2 and "joint_blocks_1_context_block_adaLN_modulation_1" in res.stderr, res
    assert not (tmp_path / "out").exists()


def test_sd3_fused_names_convert_to_peft(tmp_path, run_cli):
    """``convert --to peft --base TRANSFORMER_DIR`` writes the split factors: PEFT loads the adapter on
    the SD3 transformer and its merge equals the split factors' merge."""
    from peft import PeftModel

    state, _single = _checkpoint("sd3-medium")
    _model("sd3-medium").save_pretrained(str(tmp_path / "transformer"))
    lora, factors = _lora(state, "kohya")
    save_file(lora, str(tmp_path / "lora.safetensors"))
    res = run_cli("convert", tmp_path / "lora.safetensors", "--to", "peft", "-o", tmp_path / "peft", "--base", tmp_path / "transformer")
    assert res.exit_code == 0, res
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in saved} == set(factors)
    merged = PeftModel.from_pretrained(_model("sd3-medium"), str(tmp_path / "peft")).merge_and_unload()
    want = peft_merged(state, factors, scaling=ALPHA / R)
    for k, v in merged.state_dict().items():
        assert torch.equal(v, want[k]), k
