"""The Flux LoRA files people share besides kohya's: ComfyUI ``diffusion_model.`` files and XLabs
files, merged into a Flux single file and into a diffusers Flux transformer.

Oracles: diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` + PEFT's merge on the converted
model (XLabs); for ComfyUI files, whose names are the single file's own, the product on the named
tensor ``W + (B @ A) · alpha / rank`` on the single file and PEFT's merge of the rows diffusers
cuts on a diffusers base; diffusers' single-file converter reads every merged file back.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import IN, flux_state, peft_merged, to_diffusers, write_flux

R = 4


def _diffusers_dir(path, converted: dict) -> str:
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in converted.items()}, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1"}, f)
    return str(path)


def _xlabs(state: dict, g: torch.Generator) -> dict:
    lora = {}
    for name, rows in (("double_blocks.0.processor.qkv_lora1", 9216), ("double_blocks.0.processor.qkv_lora2", 9216),
                       ("double_blocks.0.processor.proj_lora1", state["double_blocks.0.img_attn.proj.weight"].shape[0]),
                       ("single_blocks.0.processor.qkv_lora", 9216)):
        lora[f"{name}.down.weight"] = torch.randn(R, IN, generator=g) * 0.1
        lora[f"{name}.up.weight"] = torch.randn(rows, R, generator=g) * 0.1
    return lora


def test_xlabs_flux_lora_as_diffusers_reads_it(tmp_path, run_cli):
    state = flux_state()
    lora = _xlabs(state, torch.Generator().manual_seed(4))
    path = str(tmp_path / "xlabs.safetensors")
    save_file(lora, path)
    doc = run_cli("inspect", path, "--json").json()
    assert doc["format"] == "xlabs"

    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    theirs = _convert_xlabs_flux_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    factors = {k[len("transformer."): -len(".lora_A.weight")]: (v, theirs[k.replace("lora_A", "lora_B")]) for k, v in theirs.items() if k.endswith("lora_A.weight")}
    converted = to_diffusers(state)
    want = peft_merged(converted, factors)

    single = write_flux(str(tmp_path / "flux.safetensors"), state, prefix="model.diffusion_model.")
    res = run_cli("merge", "--base", single, "--adapter", path, "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res
    got = to_diffusers(load_file(str(tmp_path / "m.safetensors")))
    base = _diffusers_dir(tmp_path / "transformer", converted)
    res = run_cli("merge", "--base", base, "--adapter", path, "-o", tmp_path / "m2")
    assert res.exit_code == 0, res
    got2 = load_file(str(tmp_path / "m2" / "diffusion_pytorch_model.safetensors"))
    for k in want:
        assert torch.equal(got[k], want[k]), k
        assert torch.equal(got2[k], want[k]), k


def test_comfyui_flux_lora(tmp_path, run_cli):
    state = flux_state()
    g = torch.Generator().manual_seed(6)
    alpha = 8.0
    lora = {
        # PEFT's spelling under ComfyUI's prefix, with an alpha
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(R, IN, generator=g) * 0.1,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(9216, R, generator=g) * 0.1,
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(alpha),
        # kohya's spelling, no alpha (scale 1)
        "diffusion_model.single_blocks.0.linear1.lora_down.weight": torch.randn(R, IN, generator=g) * 0.1,
        "diffusion_model.single_blocks.0.linear1.lora_up.weight": torch.randn(21504, R, generator=g) * 0.1,
    }
    path = str(tmp_path / "comfy.safetensors")
    save_file(lora, path)
    assert run_cli("inspect", path, "--json").json()["format"] == "comfyui"

    single = write_flux(str(tmp_path / "flux.safetensors"), state)
    res = run_cli("merge", "--base", single, "--adapter", path, "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res
    merged = load_file(str(tmp_path / "m.safetensors"))
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert torch.equal(merged["double_blocks.0.img_attn.qkv.weight"],
                       state["double_blocks.0.img_attn.qkv.weight"] + (lora[f"{qkv}.lora_B.weight"] @ lora[f"{qkv}.lora_A.weight"]) * (alpha / R))
    l1 = "diffusion_model.single_blocks.0.linear1"
    assert torch.equal(merged["single_blocks.0.linear1.weight"],
                       state["single_blocks.0.linear1.weight"] + (lora[f"{l1}.lora_up.weight"] @ lora[f"{l1}.lora_down.weight"]) * 1.0)

    converted = to_diffusers(state)
    base = _diffusers_dir(tmp_path / "transformer", converted)
    res = run_cli("merge", "--base", base, "--adapter", path, "-o", tmp_path / "m2")
    assert res.exit_code == 0, res
    got = load_file(str(tmp_path / "m2" / "diffusion_pytorch_model.safetensors"))
    a, b = lora[f"{qkv}.lora_A.weight"], lora[f"{qkv}.lora_B.weight"]
    want = peft_merged(converted, {"transformer_blocks.0.attn.to_q": (a, b[:3072]), "transformer_blocks.0.attn.to_k": (a, b[3072:6144]),
                                   "transformer_blocks.0.attn.to_v": (a, b[6144:])}, scaling=alpha / R)
    a, b = lora[f"{l1}.lora_down.weight"], lora[f"{l1}.lora_up.weight"]
    want = {**want, **{k: v for k, v in peft_merged(converted, {
        "single_transformer_blocks.0.attn.to_q": (a, b[:3072]), "single_transformer_blocks.0.attn.to_k": (a, b[3072:6144]),
        "single_transformer_blocks.0.attn.to_v": (a, b[6144:9216]), "single_transformer_blocks.0.proj_mlp": (a, b[9216:])}).items()
        if k.startswith("single_transformer_blocks.0.")}}
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_xlabs_converts_to_peft_as_diffusers_converts_it(tmp_path, run_cli):
    """``convert --to peft`` of an XLabs file against a diffusers Flux transformer writes the factors
    diffusers' converter gives, tensor for tensor (qkv parts: ``up`` rows, shared ``down``)."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    state = flux_state()
    lora = _xlabs(state, torch.Generator().manual_seed(4))
    path = str(tmp_path / "xlabs.safetensors")
    save_file(lora, path)
    base = _diffusers_dir(tmp_path / "transformer", to_diffusers(state))
    res = run_cli("convert", path, "--to", "peft", "-o", tmp_path / "peft", "--base", base)
    assert res.exit_code == 0, res
    got = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    theirs = _convert_xlabs_flux_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    assert set(got) == {"base_model.model." + k[len("transformer."):] for k in theirs}
    for k, v in theirs.items():
        assert torch.equal(got["base_model.model." + k[len("transformer."):]], v), k
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == R  # scale 1, as diffusers reads XLabs files


def _kohya_flux(state: dict, g: torch.Generator, *, comfy: bool) -> dict:
    """kohya Flux names (``lora_unet_double_blocks_0_img_attn_qkv``) or ComfyUI's (``diffusion_model.double_blocks.0.img_attn.qkv``),
    ``alpha`` = rank (diffusers folds ``alpha / rank`` into the factors: at 1 they keep their values)."""
    lora = {}
    for module in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1", "single_blocks.0.linear2"):
        rows = state[f"{module}.weight"].shape[0]
        name = f"diffusion_model.{module}" if comfy else "lora_unet_" + module.replace(".", "_")
        lora[f"{name}.lora_down.weight"] = torch.randn(R, IN, generator=g) * 0.1
        lora[f"{name}.lora_up.weight"] = torch.randn(rows, R, generator=g) * 0.1
        lora[f"{name}.alpha"] = torch.tensor(float(R))
    return lora


def test_kohya_and_comfyui_flux_convert_to_peft_as_diffusers_converts_them(tmp_path, run_cli):
    """``convert --to peft --base TRANSFORMER_DIR`` of a kohya / sd-scripts Flux file and of a ComfyUI
    Flux file writes the factors diffusers' ``_convert_kohya_flux_lora_to_diffusers`` gives (fused
    ``qkv`` / ``linear1`` split by rows of ``lora_up``, ``lora_down`` shared), tensor for tensor."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    state = flux_state()
    base = _diffusers_dir(tmp_path / "transformer", to_diffusers(state))
    for comfy in (False, True):
        lora = _kohya_flux(state, torch.Generator().manual_seed(7), comfy=comfy)
        path = str(tmp_path / f"flux_{comfy}.safetensors")
        save_file(lora, path)
        out = tmp_path / f"peft_{comfy}"
        res = run_cli("convert", path, "--to", "peft", "-o", out, "--base", base)
        assert res.exit_code == 0, res
        got = load_file(str(out / "adapter_model.safetensors"))
        theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
        assert set(got) == {"base_model.model." + k[len("transformer."):] for k in theirs}, comfy
        for k, v in theirs.items():
            assert torch.equal(got["base_model.model." + k[len("transformer."):]], v), k
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == R and config["lora_alpha"] == R and not config["alpha_pattern"]


def test_flux_formats_convert_to_diffusers_as_diffusers_converts_them(tmp_path, run_cli):
    """``convert FILE --to diffusers --base TRANSFORMER_DIR --component transformer`` of kohya Flux,
    ComfyUI and XLabs files writes diffusers' own layout (``transformer.<module>.lora_A/B.weight``)
    with the tensors diffusers' converters give (``_convert_kohya_flux_lora_to_diffusers``,
    ``_convert_xlabs_flux_lora_to_diffusers``), tensor for tensor, and its LoraConfig in
    ``lora_adapter_metadata``, which diffusers' ``lora_state_dict`` reads back as the same tensors.
    ``--to kohya`` of such a file is refused (one line, exit 2, nothing written)."""
    from diffusers import FluxPipeline
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers, _convert_xlabs_flux_lora_to_diffusers

    state = flux_state()
    base = _diffusers_dir(tmp_path / "transformer", to_diffusers(state))
    files = {"kohya": (_kohya_flux(state, torch.Generator().manual_seed(7), comfy=False), _convert_kohya_flux_lora_to_diffusers),
             "comfyui": (_kohya_flux(state, torch.Generator().manual_seed(8), comfy=True), _convert_kohya_flux_lora_to_diffusers),
             "xlabs": (_xlabs(state, torch.Generator().manual_seed(4)), _convert_xlabs_flux_lora_to_diffusers)}
    for name, (lora, convert) in files.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(lora, path)
        out = tmp_path / f"{name}_diffusers.safetensors"
        res = run_cli("convert", path, "--to", "diffusers", "-o", out, "--base", base, "--component", "transformer")
        assert res.exit_code == 0, res
        got = load_file(str(out))
        theirs = convert({k: v.clone() for k, v in lora.items()})
        assert set(got) == set(theirs), name
        for k, v in theirs.items():
            assert torch.equal(got[k], v), (name, k)
        again = FluxPipeline.lora_state_dict(str(out))
        assert set(again) == set(theirs) and all(torch.equal(again[k], v) for k, v in theirs.items()), name

    res = run_cli("convert", str(tmp_path / "comfyui.safetensors"), "--to", "kohya", "-o", tmp_path / "k.safetensors", "--base", base,
                  "--component", "transformer")
    assert res.exit_code == 2 and "--to peft first" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res
    assert not (tmp_path / "k.safetensors").exists()

    diff = str(tmp_path / "diff.safetensors")  # a ComfyUI full delta has no LoRA form: refused for --to diffusers too
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.diff": torch.zeros_like(state["double_blocks.0.img_attn.proj.weight"])}, diff)
    res = run_cli("convert", diff, "--to", "diffusers", "-o", tmp_path / "d.safetensors", "--base", base, "--component", "transformer")
    assert res.exit_code == 2 and ".diff" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res
    assert not (tmp_path / "d.safetensors").exists()
