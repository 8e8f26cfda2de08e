"""LyCORIS ``dora_scale`` (weight decomposition) in kohya files.

The output-axis form (LyCORIS' ``wd_on_out``, shape ``(out, 1)``) is PEFT's magnitude vector: the
merge equals PEFT's ``merge_and_unload`` with ``use_dora`` (bit for bit) and LyCORIS' own merged
weight at multiplier 1 (LyCORIS adds ``eps`` to the norm: a float tolerance). The old input-axis
form is refused, saying why.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import IN, flux_state, write_flux

R, ALPHA = 4, 2.0
MODULE = "double_blocks.0.img_attn.proj"


def _lycoris_module(weight: torch.Tensor, seed: int, wd_on_out: bool = True):
    from lycoris.modules.locon import LoConModule

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    module = LoConModule("lora_unet_" + MODULE.replace(".", "_"), linear, 1.0, R, ALPHA, weight_decompose=True, wd_on_out=wd_on_out)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=g) * 0.1)
        module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.1)
        module.dora_scale.mul_(1 + 0.1 * torch.randn(module.dora_scale.shape, generator=g))
    return module


def _file(path: str, module) -> str:
    name = "lora_unet_" + MODULE.replace(".", "_")
    save_file({f"{name}.lora_down.weight": module.lora_down.weight.detach().contiguous(),
               f"{name}.lora_up.weight": module.lora_up.weight.detach().contiguous(),
               f"{name}.alpha": torch.tensor(ALPHA), f"{name}.dora_scale": module.dora_scale.detach().contiguous()}, path)
    return path


def test_output_axis_dora_scale_merges_as_peft_use_dora(tmp_path, run_cli):
    state = flux_state()
    weight = state[f"{MODULE}.weight"]
    module = _lycoris_module(weight, 1)
    assert tuple(module.dora_scale.shape) == (weight.shape[0], 1)
    path = _file(str(tmp_path / "dora.safetensors"), module)
    single = write_flux(str(tmp_path / "flux.safetensors"), state)
    res = run_cli("merge", "--base", single, "--adapter", path, "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res
    got = load_file(str(tmp_path / "m.safetensors"))[f"{MODULE}.weight"]

    # PEFT: LoRA with use_dora, lora_magnitude_vector = dora_scale
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(IN, weight.shape[0], bias=False)
    with torch.no_grad():
        holder.proj.weight.copy_(weight)
    peft = get_peft_model(holder, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], use_dora=True))
    with torch.no_grad():
        layer = peft.base_model.model.proj
        layer.lora_A["default"].weight.copy_(module.lora_down.weight)
        layer.lora_B["default"].weight.copy_(module.lora_up.weight)
        layer.lora_magnitude_vector["default"].weight.copy_(module.dora_scale.view(-1))
    want = peft.merge_and_unload().proj.weight.detach()
    assert torch.equal(got, want)

    # LyCORIS' own merged weight at multiplier 1
    with torch.no_grad():
        theirs = module.get_merged_weight(multiplier=1)[0]
    torch.testing.assert_close(got, theirs.to(got.dtype), rtol=1e-5, atol=1e-6)


def test_input_axis_dora_scale_is_refused_saying_why(tmp_path, run_cli):
    state = flux_state()
    module = _lycoris_module(state[f"{MODULE}.weight"], 2, wd_on_out=False)
    assert module.dora_scale.shape[0] == 1
    path = _file(str(tmp_path / "old.safetensors"), module)
    single = write_flux(str(tmp_path / "flux.safetensors"), state)
    res = run_cli("merge", "--base", single, "--adapter", path, "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 2 and "input-axis" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res
    assert not os.path.exists(tmp_path / "m.safetensors")
