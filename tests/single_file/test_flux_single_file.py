"""LoRAs merged into a Flux.1 single-file checkpoint (BFL names, with and without ComfyUI's prefix).

Oracle: diffusers' own single-file converter (``convert_flux_transformer_checkpoint_to_diffusers``)
applied to the merged file must give exactly what PEFT's ``merge_and_unload`` gives on the
converted base — every diffusers tensor, so LoRAs on ``to_q`` / ``to_k`` / ``to_v`` /
``proj_mlp`` / ``norm_out.linear`` (whose halves diffusers swaps) land on exactly their rows of the
fused tensors, and nothing else changes.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _flux_helpers import IN, flux_state, peft_merged, to_diffusers, write_flux

R = 4
#: diffusers modules the test LoRA adapts: fused parts, a renamed one, and the swapped pair
TARGETS = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp",
    "norm_out.linear",
]


def _factors(diffusers_state: dict[str, torch.Tensor], seed: int = 5) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in TARGETS:
        rows, cols = diffusers_state[f"{m}.weight"].shape
        out[m] = (torch.randn(R, cols, generator=g) * 0.1, torch.randn(rows, R, generator=g) * 0.1)
    return out


def _diffusers_lora_file(path: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    state = {}
    for m, (a, b) in factors.items():
        state[f"transformer.{m}.lora_A.weight"] = a.contiguous()
        state[f"transformer.{m}.lora_B.weight"] = b.contiguous()
    save_file(state, path)
    return path


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_diffusers_lora_into_flux_single_file_equals_peft_on_diffusers(tmp_path, run_cli, prefix):
    state = flux_state()
    extra = {"vae.decoder.conv_in.weight": torch.randn(4, 4)} if prefix else {}
    base = write_flux(str(tmp_path / "flux1-dev.safetensors"), state, prefix=prefix, extra=extra, metadata={"modelspec.title": "tiny flux"})
    converted = to_diffusers(state)
    factors = _factors(converted)
    lora = _diffusers_lora_file(str(tmp_path / "lora.safetensors"), factors)
    before = os.stat(base).st_mtime_ns, open(base, "rb").read()

    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out, "--json")
    assert res.exit_code == 0, res
    doc = res.json()
    assert doc["output"] == str(out)

    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"modelspec.title": "tiny flux"}  # the file's own metadata, kept
    merged = load_file(str(out))
    original = load_file(base)
    assert list(merged) == sorted(merged) or set(merged) == set(original)
    assert set(merged) == set(original) and all(merged[k].dtype == original[k].dtype and merged[k].shape == original[k].shape for k in merged)
    for k in extra:
        assert torch.equal(merged[k], extra[k])  # outside the model: untouched
    got = to_diffusers({k[len(prefix):]: v for k, v in merged.items() if k.startswith(prefix)})
    want = peft_merged(converted, factors)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    changed = {k for k in want if not torch.equal(want[k], converted[k])}
    assert changed == {f"{m}.weight" for m in TARGETS}
    assert (os.stat(base).st_mtime_ns, open(base, "rb").read()) == before  # the input is never modified


def test_kohya_flux_lora_on_fused_names(tmp_path, run_cli):
    """sd-scripts' Flux names are the file's own (``lora_unet_double_blocks_0_img_attn_qkv``): the
    product lands on the whole fused tensor, ``W + (up @ down) · alpha / rank``; diffusers' converter
    splits the same file onto to_q / to_k / to_v, and its fused model agrees (alpha baked into its
    factors: a float tolerance)."""
    state = flux_state(dtype=torch.float32)
    base = write_flux(str(tmp_path / "flux.safetensors"), state)
    g = torch.Generator().manual_seed(9)
    lora, modules = {}, {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv", "single_blocks_0_linear1": "single_blocks.0.linear1",
                         "double_blocks_0_txt_attn_proj": "double_blocks.0.txt_attn.proj"}
    alpha = 2.0
    for name, own in modules.items():
        rows = state[f"{own}.weight"].shape[0]
        lora[f"lora_unet_{name}.lora_down.weight"] = torch.randn(R, IN, generator=g) * 0.1
        lora[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, R, generator=g) * 0.1
        lora[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    path = str(tmp_path / "kohya_flux.safetensors")
    save_file(lora, path)
    out = tmp_path / "merged.safetensors"
    res = run_cli("merge", "--base", base, "--adapter", path, "-o", out)
    assert res.exit_code == 0, res
    merged = load_file(str(out))
    for name, own in modules.items():
        down, up = lora[f"lora_unet_{name}.lora_down.weight"], lora[f"lora_unet_{name}.lora_up.weight"]
        want = state[f"{own}.weight"] + (up @ down) * (alpha / R)
        assert torch.equal(merged[f"{own}.weight"], want), own
    untouched = [k for k in state if k.rsplit(".", 1)[0] not in modules.values()]
    assert all(torch.equal(merged[k], state[k]) for k in untouched)

    # diffusers' reading of the same file, fused on its converted model
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    converted_lora = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    converted = to_diffusers(state)
    factors = {}
    for k, v in converted_lora.items():
        if k.endswith(".lora_A.weight"):
            m = k[len("transformer."): -len(".lora_A.weight")]
            factors[m] = (v, converted_lora[k.replace("lora_A", "lora_B")])
    want = peft_merged(converted, factors)
    got = to_diffusers(merged)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_json_and_inspect_check(tmp_path, run_cli):
    state = flux_state()
    base = write_flux(str(tmp_path / "flux.safetensors"), state, prefix="model.diffusion_model.")
    lora = _diffusers_lora_file(str(tmp_path / "lora.safetensors"), _factors(to_diffusers(state)))
    res = run_cli("check", "--adapter", lora, "--base", base, "--json")
    assert res.exit_code == 0, res
    text = json.dumps(res.json())
    assert '"resolved": 7, "total": 7' in text and '"ok": true' in text, text
    res = run_cli("inspect", lora, "--base", base, "--json")
    assert res.exit_code == 0, res
    text = json.dumps(res.json())
    assert "single_transformer_blocks.0.proj_mlp" in text and '"resolved": true' in text and '"resolved": false' not in text
