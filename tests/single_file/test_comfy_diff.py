"""ComfyUI full deltas: ``.diff`` (a whole-weight delta) and ``.diff_b`` (a bias delta), merged into
single files and diffusers folders (BEHAVIOUR §7.6).

Oracles, per test:

* Wan on a diffusers ``WanTransformer3DModel`` folder: diffusers' own reading of the file
  (``WanPipeline.lora_state_dict``: ``_convert_non_diffusers_wan_lora_to_diffusers`` makes each
  ``diff_b`` a PEFT ``lora_B.bias`` and ``head.head.diff`` a ``lora_A`` with an identity ``lora_B``),
  loaded with ``load_lora_adapter`` and fused (``fuse_lora``: PEFT's merge), bit for bit.
* What diffusers drops (a ``.diff`` inside the blocks, a norm's ``.diff``, Flux's ``diff`` / ``diff_b``,
  which its Flux converter filters out): the dense arithmetic ComfyUI's ``comfy/lora.py`` does, computed
  here: ``W + diff`` in float32, rounded once to the stored dtype (ComfyUI casts the weight to float32,
  adds, casts back; weight multiplier 1, no alpha). PEFT's own merge would add a bf16 delta to a bf16
  weight (two roundings); the merge rounds once, as for every other module.
* A single file is read back with diffusers' single-file converter, which puts every row where its
  diffusers tensor takes it.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from _flux_helpers import IN, flux_state, to_diffusers, write_flux
from conftest import assert_one_error_line

R = 4
T2V = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, ffn_dim=32, text_dim=24, freq_dim=8, in_channels=4, out_channels=4)
#: Wan modules (own name -> diffusers name) with a LoRA and a ``diff_b`` in the file
WAN_LORA = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.cross_attn.k": "blocks.1.attn2.to_k",
            "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj", "blocks.1.ffn.2": "blocks.1.ffn.net.2"}


def _wan_model():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**T2V)


def _wan_file(path, model, *, alpha: "float | None" = None) -> dict[str, torch.Tensor]:
    """LoRA factors + ``diff_b`` on block modules, and lightx2v's ``head.head.diff`` + ``diff_b``."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for own, theirs in WAN_LORA.items():
        layer = model.get_submodule(theirs)
        state[f"diffusion_model.{own}.lora_A.weight"] = torch.randn(R, layer.in_features, generator=g) * 0.1
        state[f"diffusion_model.{own}.lora_B.weight"] = torch.randn(layer.out_features, R, generator=g) * 0.1
        state[f"diffusion_model.{own}.diff_b"] = torch.randn(layer.out_features, generator=g) * 0.1
        if alpha is not None:
            state[f"diffusion_model.{own}.alpha"] = torch.tensor(alpha)
    head = model.proj_out
    state["diffusion_model.head.head.diff"] = torch.randn(head.weight.shape, generator=g) * 0.1
    state["diffusion_model.head.head.diff_b"] = torch.randn(head.bias.shape, generator=g) * 0.1
    save_file(state, str(path))
    return state


def _diffusers_fused(lora: str) -> dict[str, torch.Tensor]:
    from diffusers import WanPipeline

    model = _wan_model()
    model.load_lora_adapter(WanPipeline.lora_state_dict(lora), prefix="transformer")
    model.fuse_lora()
    model.unload_lora()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _wan_dir(path) -> tuple[str, dict[str, torch.Tensor]]:
    model = _wan_model()
    model.save_pretrained(str(path))
    return str(path), {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_wan_diff_b_and_head_diff_equal_diffusers_load_and_fuse(tmp_path, run_cli):
    """Oracle: diffusers' ``load_lora_adapter`` + ``fuse_lora`` of its own conversion of the file."""
    base, state = _wan_dir(tmp_path / "transformer")
    lora = str(tmp_path / "wan.safetensors")
    _wan_file(lora, _wan_model())
    doc = run_cli("inspect", lora, "--base", base, "--json").json()
    assert run_cli("check", "--adapter", lora, "--base", base, "--json").json()["ok"]
    methods = {m["name_in_file"]: m["method"] for m in doc["modules"]}
    assert methods["head.head"] == "diff" and methods["blocks.0.self_attn.q"] == "lora"
    assert doc["check"]["ok"], doc["check"]

    out = tmp_path / "merged"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out, "--json")  # the document validated against its schema
    assert res.exit_code == 0, res
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    want = _diffusers_fused(lora)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    changed = {k for k in want if not torch.equal(want[k], state[k])}
    assert changed == {f"{m}.{p}" for m in (*WAN_LORA.values(), "proj_out") for p in ("weight", "bias")}


def test_wan_diff_b_is_added_as_it_is_whatever_the_alpha(tmp_path, run_cli):
    """With an ``alpha``, ``alpha / rank`` scales the LoRA factors only; the ``diff_b`` is added with
    weight 1 (diffusers folds the alpha into the factors and keeps ``lora_B.bias`` as it is; ComfyUI
    adds ``diff_b`` at the strength alone). Oracle: diffusers' load + fuse (factors: up to its folding's
    float rounding; biases bit for bit)."""
    base, state = _wan_dir(tmp_path / "transformer")
    lora = str(tmp_path / "wan.safetensors")
    file = _wan_file(lora, _wan_model(), alpha=2.0)
    out = tmp_path / "merged"
    res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out)
    assert res.exit_code == 0, res
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    want = _diffusers_fused(lora)
    for own, theirs in WAN_LORA.items():
        assert torch.equal(got[f"{theirs}.bias"], want[f"{theirs}.bias"]), theirs
        assert torch.equal(got[f"{theirs}.bias"], state[f"{theirs}.bias"] + file[f"diffusion_model.{own}.diff_b"]), theirs
        torch.testing.assert_close(got[f"{theirs}.weight"], want[f"{theirs}.weight"], rtol=1e-5, atol=1e-6)


def _wan_single_file(path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from adapterfmt.tables.single_file_names import to_single_file

    single = {}
    for key, value in state.items():
        segs = to_single_file("wan", "transformer", key)
        single["model.diffusion_model." + segs[0].key] = value.to(dtype)
    save_file(single, str(path))
    return single


def test_wan_diff_into_a_wan_single_file(tmp_path, run_cli):
    """The same file into a Wan single file (Wan's own names): read back with diffusers' converter it
    equals the diffusers folder's merge (proved above against diffusers). A ``.diff`` / ``.diff_b``
    diffusers drops (inside the blocks, on ``norm3``) is ComfyUI's dense arithmetic on a bf16 file:
    ``W + diff`` in float32, rounded once."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    base_dir, state = _wan_dir(tmp_path / "transformer")
    lora = str(tmp_path / "wan.safetensors")
    _wan_file(lora, _wan_model())
    res = run_cli("merge", "--base", base_dir, "--adapter", lora, "-o", tmp_path / "dir_merged")
    assert res.exit_code == 0, res
    folder = load_file(str(tmp_path / "dir_merged" / "diffusion_pytorch_model.safetensors"))

    single = _wan_single_file(tmp_path / "wan_fp32.safetensors", state, torch.float32)
    res = run_cli("merge", "--base", tmp_path / "wan_fp32.safetensors", "--adapter", lora, "-o", tmp_path / "m.safetensors")
    assert res.exit_code == 0, res
    merged = load_file(str(tmp_path / "m.safetensors"))
    assert set(merged) == set(single)
    got = convert_wan_transformer_to_diffusers({k[len("model.diffusion_model."):]: v.clone() for k, v in merged.items()})
    for k in folder:
        assert torch.equal(got[k], folder[k]), k

    # bf16 file, diffs diffusers drops: the dense arithmetic, rounded once
    g = torch.Generator().manual_seed(9)
    single = _wan_single_file(tmp_path / "wan_bf16.safetensors", state, torch.bfloat16)
    p = "model.diffusion_model."
    deltas = {"blocks.1.self_attn.k.diff": torch.randn(single[p + "blocks.1.self_attn.k.weight"].shape, generator=g).to(torch.bfloat16),
              "blocks.0.norm3.diff": torch.randn(single[p + "blocks.0.norm3.weight"].shape, generator=g).to(torch.bfloat16),
              "blocks.0.norm3.diff_b": torch.randn(single[p + "blocks.0.norm3.bias"].shape, generator=g).to(torch.bfloat16)}
    save_file({"diffusion_model." + k: v for k, v in deltas.items()}, str(tmp_path / "diffs.safetensors"))
    res = run_cli("merge", "--base", tmp_path / "wan_bf16.safetensors", "--adapter", tmp_path / "diffs.safetensors", "-o", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res
    merged = load_file(str(tmp_path / "b.safetensors"))
    for name, delta in deltas.items():
        key = p + name.replace(".diff_b", ".bias").replace(".diff", ".weight")
        want = (single[key].float() + delta.float()).to(torch.bfloat16)
        assert torch.equal(merged[key], want), key
    untouched = set(single) - {p + n.replace(".diff_b", ".bias").replace(".diff", ".weight") for n in deltas}
    assert all(torch.equal(merged[k], single[k]) for k in untouched)


def _flux_dir(path, converted: dict) -> str:
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in converted.items()}, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1"}, f)
    return str(path)


def test_flux_diff_on_fused_tensors_single_file_and_diffusers_folder(tmp_path, run_cli):
    """diffusers' Flux converter drops ``diff`` / ``diff_b``: the oracle is the dense arithmetic (float32
    file: ``W + diff`` exactly as float32 adds it). A ``.diff`` on the fused ``img_attn.qkv`` covers the whole
    tensor on a single file and is split by rows onto ``to_q`` / ``to_k`` / ``to_v`` (bias too) on a
    diffusers folder; a ``.diff`` under diffusers' ``to_k`` lands on its rows of the single file's ``qkv``."""
    state = flux_state()
    g = torch.Generator().manual_seed(5)
    qkv, bias = state["double_blocks.0.img_attn.qkv.weight"], state["double_blocks.0.img_attn.qkv.bias"]
    diff, diff_b = torch.randn(qkv.shape, generator=g) * 0.1, torch.randn(bias.shape, generator=g) * 0.1
    path = str(tmp_path / "comfy_diff.safetensors")
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.diff": diff, "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": diff_b}, path)

    single = write_flux(str(tmp_path / "flux.safetensors"), state, prefix="model.diffusion_model.")
    res = run_cli("merge", "--base", single, "--adapter", path, "-o", tmp_path / "m.safetensors", "--json")
    assert res.exit_code == 0, res
    merged = load_file(str(tmp_path / "m.safetensors"))
    p = "model.diffusion_model.double_blocks.0.img_attn.qkv."
    assert torch.equal(merged[p + "weight"], qkv + diff) and torch.equal(merged[p + "bias"], bias + diff_b)
    assert all(torch.equal(merged["model.diffusion_model." + k], v) for k, v in state.items() if not k.startswith("double_blocks.0.img_attn.qkv"))

    converted = to_diffusers(state)
    base = _flux_dir(tmp_path / "transformer", converted)
    res = run_cli("merge", "--base", base, "--adapter", path, "-o", tmp_path / "m2")
    assert res.exit_code == 0, res
    got = load_file(str(tmp_path / "m2" / "diffusion_pytorch_model.safetensors"))
    want = to_diffusers({**state, "double_blocks.0.img_attn.qkv.weight": qkv + diff, "double_blocks.0.img_attn.qkv.bias": bias + diff_b})
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    # a .diff under diffusers' own name of one part: its rows of the fused tensor
    k_rows = converted["transformer_blocks.0.attn.to_k.weight"]
    part = torch.randn(k_rows.shape, generator=g) * 0.1
    save_file({"diffusion_model.transformer_blocks.0.attn.to_k.diff": part}, str(tmp_path / "part.safetensors"))
    res = run_cli("merge", "--base", single, "--adapter", tmp_path / "part.safetensors", "-o", tmp_path / "m3.safetensors")
    assert res.exit_code == 0, res
    got = to_diffusers({k[len("model.diffusion_model."):]: v for k, v in load_file(str(tmp_path / "m3.safetensors")).items()})
    for k, v in converted.items():
        assert torch.equal(got[k], k_rows + part if k == "transformer_blocks.0.attn.to_k.weight" else v), k


def test_full_delta_refusals(tmp_path, run_cli):
    """One error line, exit 2, nothing written: a ``.diff`` of another shape (ShapeMismatchError naming
    its key); LoRA factors and a ``.diff`` on one weight (ComfyUI would apply only one); a ``.diff_b``
    on a part of a fused tensor; ``convert --to peft`` (no PEFT LoRA form)."""
    state = flux_state()
    single = write_flux(str(tmp_path / "flux.safetensors"), state)
    before = open(single, "rb").read()
    proj = state["double_blocks.0.img_attn.proj.weight"]
    cases = {
        "shape": ({"diffusion_model.double_blocks.0.img_attn.proj.diff": torch.zeros(proj.shape[0], IN + 1)}, "double_blocks.0.img_attn.proj.diff"),
        "both": ({"diffusion_model.double_blocks.0.img_attn.proj.diff": torch.zeros_like(proj),
                  "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(R, IN),
                  "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.zeros(proj.shape[0], R)}, ".diff"),
        "part_bias": ({"diffusion_model.transformer_blocks.0.attn.to_k.diff_b": torch.zeros(3072)}, "to_k.diff_b"),
    }
    for name, (tensors, needle) in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        save_file(tensors, path)
        out = tmp_path / f"{name}_out.safetensors"
        res = run_cli("merge", "--base", single, "--adapter", path, "-o", out)
        assert_one_error_line(res, needle)
        assert not out.exists(), name
    assert open(single, "rb").read() == before

    base = _flux_dir(tmp_path / "transformer", to_diffusers(state))
    res = run_cli("merge", "--base", base, "--adapter", tmp_path / "shape.safetensors", "-o", tmp_path / "o")
    assert_one_error_line(res, "double_blocks.0.img_attn.proj.diff")
    assert not (tmp_path / "o").exists()
    ok = str(tmp_path / "ok.safetensors")
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.diff": torch.zeros_like(proj)}, ok)
    res = run_cli("convert", ok, "--to", "peft", "-o", tmp_path / "peft", "--base", base)
    assert_one_error_line(res, ".diff")
    assert not (tmp_path / "peft").exists()
