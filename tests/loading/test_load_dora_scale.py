"""LyCORIS ``dora_scale`` (output-axis form, ``wd_on_out``) in ``adapterfmt.load`` and
``convert --to peft`` (BEHAVIOUR §7.6).

``adapterfmt.load`` gives PEFT's outputs within the loader's DoRA tolerance (1e-6, as for PEFT's own
DoRA adapters); the converted directory, loaded by PEFT, gives them bit for bit.

Oracles: PEFT's ``use_dora`` LoRA built on the same tiny UNet from the file's factors
(``lora_magnitude_vector`` = ``dora_scale``), and LyCORIS' own forward at multiplier 1 (its norm adds
``eps``: a float tolerance). The converted directory is loaded by ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import adapterfmt
from _diffusion_helpers import save_component, tiny_unet, unet_out
from conftest import assert_one_error_line

R, ALPHA = 4, 2.0
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0."
TARGETS = [BLOCK + m for m in ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn1.to_out.0", "ff.net.2")]


def _lycoris_modules(unet, *, wd_on_out: bool = True, seed: int = 1) -> dict:
    """One LyCORIS LoCon module with weight decomposition per target, factors and scale random."""
    from lycoris.modules.locon import LoConModule

    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in TARGETS:
        module = LoConModule("lora_unet_" + path.replace(".", "_"), unet.get_submodule(path), 1.0, R, ALPHA,
                             weight_decompose=True, wd_on_out=wd_on_out)
        with torch.no_grad():
            module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=g) * 0.2)
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.2)
            module.dora_scale.mul_(1 + 0.1 * torch.randn(module.dora_scale.shape, generator=g))
        out[path] = module
    return out


def _file(path, modules: dict, *, skip_dora: tuple = ()) -> str:
    state = {}
    for target, module in modules.items():
        name = "lora_unet_" + target.replace(".", "_")
        state[f"{name}.lora_down.weight"] = module.lora_down.weight.detach().contiguous()
        state[f"{name}.lora_up.weight"] = module.lora_up.weight.detach().contiguous()
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
        if target not in skip_dora:
            state[f"{name}.dora_scale"] = module.dora_scale.detach().contiguous()
    save_file(state, str(path))
    return str(path)


def _peft_out(modules: dict) -> torch.Tensor:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_unet(), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        for target, module in modules.items():
            layer = model.base_model.model.get_submodule(target)
            layer.lora_A["default"].weight.copy_(module.lora_down.weight)
            layer.lora_B["default"].weight.copy_(module.lora_up.weight)
            layer.lora_magnitude_vector["default"].weight.copy_(module.dora_scale.view(-1))
    return unet_out(model)


def test_load_and_convert_give_peft_use_dora_outputs(tmp_path, run_cli):
    lyc_unet = tiny_unet()
    modules = _lycoris_modules(lyc_unet)
    assert all(tuple(m.dora_scale.shape) == (m.lora_up.weight.shape[0], 1) for m in modules.values())
    path = _file(tmp_path / "dora.safetensors", modules)
    want = _peft_out(modules)

    model = tiny_unet()
    assert not torch.equal(unet_out(model), want)
    adapterfmt.load(model, path, component="unet")
    got = unet_out(model)
    # the loader's DoRA forward against PEFT's, as for a PEFT DoRA adapter (tests/loading/test_load.py: 1e-6; measured 5.4e-7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    layer = model.get_submodule(TARGETS[0])
    assert torch.equal(layer.lora_magnitude_vector["default"].weight, modules[TARGETS[0]].dora_scale.view(-1))

    for module in modules.values():  # LyCORIS' own forward at multiplier 1
        module.apply_to()
    torch.testing.assert_close(got, unet_out(lyc_unet), rtol=1e-4, atol=1e-5)

    base = save_component(tiny_unet(), str(tmp_path / "unet"))
    res = run_cli("convert", path, "--to", "peft", "-o", tmp_path / "peft", "--base", base)
    assert res.exit_code == 0, res
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "peft"))
    assert torch.equal(unet_out(loaded), want)


def test_dora_scale_forms_without_a_peft_form_are_refused(tmp_path, run_cli):
    """The input-axis form (normalises over the other axis), ``dora_scale`` on some modules only
    (PEFT's ``use_dora`` is one flag) and on a convolution (PEFT's conv magnitude has another layout;
    not mapped here): load and convert refuse, one line, nothing written or changed."""
    base = save_component(tiny_unet(), str(tmp_path / "unet"))
    cases = {
        "input_axis": (_file(tmp_path / "old.safetensors", _lycoris_modules(tiny_unet(), wd_on_out=False)), "input-axis"),
        "mixed": (_file(tmp_path / "mixed.safetensors", _lycoris_modules(tiny_unet()), skip_dora=(TARGETS[1],)), "use_dora"),
    }
    from lycoris.modules.locon import LoConModule

    unet = tiny_unet()
    conv = "down_blocks.0.resnets.0.conv1"
    module = LoConModule("lora_unet_" + conv.replace(".", "_"), unet.get_submodule(conv), 1.0, R, ALPHA, weight_decompose=True, wd_on_out=True)
    assert module.dora_scale.shape[0] == unet.get_submodule(conv).weight.shape[0] and module.dora_scale.dim() == 4
    cases["conv"] = (_file(tmp_path / "conv.safetensors", {conv: module}), "convolution")
    for name, (path, needle) in cases.items():
        model = tiny_unet()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(adapterfmt.UnsupportedFeatureError, match=needle):
            adapterfmt.load(model, path, component="unet")
        assert set(model.state_dict()) == set(before) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        res = run_cli("convert", path, "--to", "peft", "-o", tmp_path / f"{name}_peft", "--base", base)
        assert_one_error_line(res, needle, "dora_scale")
        assert not (tmp_path / f"{name}_peft").exists()
