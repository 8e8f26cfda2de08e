"""``adapterfmt resize`` against dense float64 deltas and PEFT.

We test:
* every rule on a PEFT adapter with rsLoRA, ``rank_pattern`` and ``alpha_pattern``: the kept rank
  is :func:`kept_rank` of the dense delta's singular values, the written adapter loaded by PEFT
  gives (``get_delta_weight``) the best rank-k approximation of the source's PEFT delta, and the
  report's error and retained energy are the dense ones;
* Conv1d/2d/3d and Embedding modules, and the loaded model's outputs equal the source's when the
  rule keeps everything;
* DoRA: the LoRA part resized, the magnitude bytes kept, the report says so; full copies carried;
* a kohya file resized in its own format (keys kept, alpha = new rank);
* bad input: ``--rank`` above the adapter's ranks, no rule / two rules, values out of range:
  one line, exit 2, nothing written; the input is never modified.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _algebra_helpers import best_rank, conv_embed_net, make_peft_adapter, mlp_stack, peft_deltas, rel, svdvals
from adapterfmt.deltas.rank_rules import kept_rank, make_rule
from conftest import assert_one_error_line


@pytest.fixture(scope="module")
def mlp_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp") / "src"
    make_peft_adapter(mlp_stack, d, r=8, lora_alpha=12, use_rslora=True, target_modules=["fc1", "fc2", "head"],
                      rank_pattern={"blocks.1.fc1": 6}, alpha_pattern={"fc2": 3.5})
    return d, peft_deltas(mlp_stack, d)


@pytest.mark.parametrize("rule", [("rank", 3), ("energy", 0.95), ("ratio", 3.0), ("cumulative", 0.8)])
def test_resize_rules_against_dense_and_peft(mlp_adapter, run_cli, tmp_path, rule):
    src, deltas = mlp_adapter
    out = tmp_path / "out"
    r = run_cli("resize", src, "-o", out, f"--{rule[0]}", rule[1], "--json")
    assert r.exit_code == 0, r
    doc = r.json()
    rows = {m["module"]: m for m in doc["modules"]}
    assert set(rows) == set(deltas)
    got = peft_deltas(mlp_stack, out)
    for path, delta in deltas.items():
        k = kept_rank(svdvals(delta), make_rule(*rule))
        assert rows[path]["new_rank"] == k
        assert rows[path]["old_rank"] == (6 if path == "blocks.1.fc1" else 8)
        best = best_rank(delta, k)
        assert rel(got[path], best) < 1e-5  # float32 factors
        assert rel(got[path], best) <= rows[path]["error"] * 1e-3 + 1e-6 or rows[path]["error"] > 0
        s = svdvals(delta)
        assert math.isclose(rows[path]["retained_energy"], float((s[:k] ** 2).sum() / (s**2).sum()), rel_tol=1e-9)
        assert math.isclose(rows[path]["error"], rel(got[path], delta), rel_tol=1e-4, abs_tol=1e-6)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False


def test_full_rank_keeps_the_model_outputs(run_cli, tmp_path):
    from peft import PeftModel

    from _load_helpers import conv_embed_inputs

    src = make_peft_adapter(conv_embed_net, tmp_path / "src", r=6, lora_alpha=9, use_rslora=True,
                            target_modules=["embed", "conv1", "conv2", "conv3", "head", "classify"])
    out = tmp_path / "out"
    r = run_cli("resize", src, "-o", out, "--energy", "1", "--json")
    assert r.exit_code == 0, r
    assert r.json()["totals"]["error"] < 1e-6  # float32 rounding only
    x = conv_embed_inputs()
    with torch.no_grad():
        want = PeftModel.from_pretrained(conv_embed_net(), str(src))(x)
        got = PeftModel.from_pretrained(conv_embed_net(), str(out))(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_conv_and_embedding_modules(run_cli, tmp_path):
    src = make_peft_adapter(conv_embed_net, tmp_path / "src", r=6, lora_alpha=9, target_modules=["embed", "conv1", "conv2", "conv3", "head"])
    deltas = peft_deltas(conv_embed_net, src)
    out = tmp_path / "out"
    r = run_cli("resize", src, "-o", out, "--rank", "2", "--json")
    assert r.exit_code == 0, r
    kinds = {m["module"]: m["layer_kind"] for m in r.json()["modules"]}
    assert kinds == {"embed": "embedding", "conv1": "conv1d", "conv2": "conv2d", "conv3": "conv3d", "head": "linear"}
    got = peft_deltas(conv_embed_net, out)
    for path, delta in deltas.items():
        assert rel(got[path], best_rank(delta, 2)) < 1e-5, path


def test_dora_magnitude_kept_and_full_copies_carried(run_cli, tmp_path):
    src = make_peft_adapter(mlp_stack, tmp_path / "src", r=4, lora_alpha=8, use_dora=True, target_modules=["fc1"], modules_to_save=["head"])
    out = tmp_path / "out"
    r = run_cli("resize", src, "-o", out, "--rank", "2", "--json")
    assert r.exit_code == 0, r
    doc = r.json()
    assert all(m["dora"] for m in doc["modules"]) and doc["totals"]["dora_modules"] == 13
    assert any("DoRA" in n for n in doc["notes"])
    before, after = load_file(src / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    kept = [k for k in before if "lora_magnitude_vector" in k or "modules_to_save" in k or k.startswith("base_model.model.head")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert set(doc["carried"]) >= {k for k in before if "head" in k}
    # PEFT loads it: the LoRA part is the best rank-2 of the source's LoRA part
    from peft import PeftModel

    pm_src = PeftModel.from_pretrained(mlp_stack(), str(src))
    pm_out = PeftModel.from_pretrained(mlp_stack(), str(out))
    for path in ("blocks.0.fc1", "blocks.7.fc1"):
        a = pm_src.base_model.model.get_submodule(path)
        b = pm_out.base_model.model.get_submodule(path)
        lora_src = (a.lora_B["default"].weight @ a.lora_A["default"].weight).double() * a.scaling["default"]
        lora_out = (b.lora_B["default"].weight @ b.lora_A["default"].weight).double() * b.scaling["default"]
        assert rel(lora_out, best_rank(lora_src, 2)) < 1e-5


def _kohya_file(path, rank=6):
    g = torch.Generator().manual_seed(7)
    t = {}
    for name, (o, i) in {"lora_unet_mid_block_proj_in": (12, 10), "lora_unet_up_blocks_0_ff": (16, 12)}.items():
        t[f"{name}.lora_down.weight"] = torch.randn(rank, i, generator=g).to(torch.float16)
        t[f"{name}.lora_up.weight"] = torch.randn(o, rank, generator=g).to(torch.float16)
        t[f"{name}.alpha"] = torch.tensor(3.0)
    conv = "lora_unet_down_blocks_0_conv"
    t[f"{conv}.lora_down.weight"] = torch.randn(rank, 4, 3, 3, generator=g).to(torch.float16)
    t[f"{conv}.lora_up.weight"] = torch.randn(5, rank, 1, 1, generator=g).to(torch.float16)
    save_file(t, str(path), metadata={"format": "pt"})
    return t


@pytest.mark.parametrize("dtype,want,tol", [(None, torch.float32, 1e-6), ("source", torch.float16, 2e-3), ("bf16", torch.bfloat16, 1e-2)])
def test_kohya_file_resized_in_its_own_format(run_cli, tmp_path, dtype, want, tol):
    src = tmp_path / "lora.safetensors"
    t = _kohya_file(src)
    before = src.read_bytes()
    out = tmp_path / "small.safetensors"
    r = run_cli("resize", src, "-o", out, "--rank", "2", "--json", *(("--dtype", dtype) if dtype else ()))
    assert r.exit_code == 0, r
    doc = r.json()
    assert doc["format"] == "kohya" and doc["dtype"] == (dtype or "fp32")
    rows = {m["module"]: m for m in doc["modules"]}
    new = load_file(out)
    assert set(new) == set(t)
    for name in ("lora_unet_mid_block_proj_in", "lora_unet_up_blocks_0_ff", "lora_unet_down_blocks_0_conv"):
        up, down = t[f"{name}.lora_up.weight"].double(), t[f"{name}.lora_down.weight"].double()
        scale = float(t[f"{name}.alpha"]) / 6 if f"{name}.alpha" in t else 1.0
        delta = scale * up.flatten(1) @ down.flatten(1)
        nu, nd = new[f"{name}.lora_up.weight"], new[f"{name}.lora_down.weight"]
        assert nu.dtype == nd.dtype == want and nd.shape[0] == 2 and nd.shape[1:] == t[f"{name}.lora_down.weight"].shape[1:]
        nscale = float(new[f"{name}.alpha"]) / 2 if f"{name}.alpha" in new else 1.0
        written = nscale * nu.double().flatten(1) @ nd.double().flatten(1)
        assert rel(written, best_rank(delta, 2)) < tol  # the factors' own rounding
        row = rows["unet." + name.removeprefix("lora_unet_")]
        assert row["dtype"] == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[want]
        assert math.isclose(row["error"], rel(written, delta), rel_tol=1e-9)  # the error as stored
    assert src.read_bytes() == before


def test_bad_input_one_line_nothing_written(mlp_adapter, run_cli, tmp_path):
    src, _ = mlp_adapter
    out = tmp_path / "out"
    for args, words in [
        (("--rank", "9"), ("--rank 9", "largest rank 8")),
        ((), ("exactly one of",)),
        (("--rank", "2", "--energy", "0.9"), ("exactly one of",)),
        (("--energy", "1.5"), ("(0, 1]",)),
        (("--cumulative", "0"), ("(0, 1]",)),
        (("--ratio", "0.5"), ("at least 1",)),
        (("--rank", "2.5"), ("whole number",)),
        (("--rank", "2", "--dtype", "fp8"), ("unknown --dtype", "fp32, bf16, fp16, source")),
    ]:
        r = run_cli("resize", src, "-o", out, *args)
        assert_one_error_line(r, *words)
        assert not out.exists()
    r = run_cli("resize", src, "-o", src / "inside", "--rank", "2")
    assert_one_error_line(r)


def test_diffusers_file_with_config_metadata(run_cli, tmp_path):
    """A diffusers file whose ``lora_adapter_metadata`` sets r / α / patterns: the output's metadata
    gives every module its new rank and scale 1 (read back by the library's diffusers reader)."""
    from adapterfmt.formats.detect import read_foreign

    g = torch.Generator().manual_seed(9)
    t = {}
    names = ["blocks.0.attn.to_q", "blocks.0.attn.to_k", "blocks.1.ff.net"]
    for i, name in enumerate(names):
        r = 6 if name == "blocks.1.ff.net" else 4
        t[f"transformer.{name}.lora_A.weight"] = torch.randn(r, 10, generator=g)
        t[f"transformer.{name}.lora_B.weight"] = torch.randn(12 + i, r, generator=g)
    meta = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.target_modules": ["to_q", "to_k", "net"],
            "transformer.rank_pattern": {"net": 6}, "transformer.alpha_pattern": {"to_k": 2}, "transformer.use_rslora": False}
    src = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(t, str(src), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    out = tmp_path / "small.safetensors"
    r = run_cli("resize", src, "-o", out, "--rank", "3", "--json")
    assert r.exit_code == 0, r
    assert r.json()["format"] == "diffusers"
    before = {m.name: m for m in read_foreign(src).modules}
    after = {m.name: m for m in read_foreign(out).modules}
    new = load_file(out)
    for name in names:
        b, a = before[name], after[name]
        delta = b.scaling * t[f"transformer.{name}.lora_B.weight"].double() @ t[f"transformer.{name}.lora_A.weight"].double()
        got = a.scaling * new[f"transformer.{name}.lora_B.weight"].double() @ new[f"transformer.{name}.lora_A.weight"].double()
        assert a.rank == 3 and a.scaling == 1.0
        assert rel(got, best_rank(delta, 3)) < 1e-6, name


@pytest.mark.parametrize("fault", ["nan", "rank_mismatch", "int_dtype"])
def test_damaged_factors_one_line(mlp_adapter, run_cli, tmp_path, fault):
    src, _ = mlp_adapter
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    t = load_file(bad / "adapter_model.safetensors")
    key = "base_model.model.blocks.3.fc2.lora_A.weight"
    if fault == "nan":
        t[key][0, 0] = float("nan")
    elif fault == "rank_mismatch":
        t[key] = t[key][:5]
    else:
        t[key] = t[key].to(torch.int32)
    save_file(t, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    for args in (("resize", bad, "-o", tmp_path / "o1", "--rank", "2"), ("combine", bad, src, "-o", tmp_path / "o2", "--method", "svd")):
        r = run_cli(*args)
        assert r.exit_code == 2, r
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("Error: ") and "Traceback" not in r.stderr, r.stderr
        assert "blocks.3.fc2" in r.stderr or "int32" in r.stderr.lower() or "I32" in r.stderr, r.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_loha_and_tucker_files_refused(run_cli, tmp_path):
    g = torch.Generator().manual_seed(1)
    loha = {f"lora_unet_proj.hada_{s}": torch.randn(*shape, generator=g) for s, shape in
            (("w1_a", (8, 2)), ("w1_b", (2, 6)), ("w2_a", (8, 2)), ("w2_b", (2, 6)))}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    r = run_cli("resize", tmp_path / "loha.safetensors", "-o", tmp_path / "o.safetensors", "--rank", "1")
    assert_one_error_line(r, "loha")
    tucker = {"lora_unet_conv.lora_down.weight": torch.randn(2, 4, 1, 1), "lora_unet_conv.lora_mid.weight": torch.randn(2, 2, 3, 3),
              "lora_unet_conv.lora_up.weight": torch.randn(5, 2, 1, 1)}
    save_file(tucker, str(tmp_path / "tucker.safetensors"))
    r = run_cli("resize", tmp_path / "tucker.safetensors", "-o", tmp_path / "o.safetensors", "--rank", "1")
    assert_one_error_line(r, "lora_mid")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("dtype,want", [(None, torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16), ("source", torch.bfloat16)])
def test_dtype_of_the_written_factors_and_error_as_stored(mlp_adapter, run_cli, tmp_path, dtype, want):
    src, _ = mlp_adapter
    bf = tmp_path / "bf16"  # the same adapter stored in bf16: its deltas are the reference
    shutil.copytree(src, bf)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(src / "adapter_model.safetensors").items()},
              str(bf / "adapter_model.safetensors"), metadata={"format": "pt"})
    deltas = peft_deltas(mlp_stack, bf)
    out = tmp_path / "out"
    r = run_cli("resize", bf, "-o", out, "--rank", "3", "--json", *(("--dtype", dtype) if dtype else ()))
    assert r.exit_code == 0, r
    doc = r.json()
    assert doc["dtype"] == (dtype or "fp32")
    written = load_file(out / "adapter_model.safetensors")
    assert {v.dtype for k, v in written.items() if "lora_" in k} == {want}
    got = peft_deltas(mlp_stack, out)
    for row in doc["modules"]:
        assert row["dtype"] == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[want]
        path = row["module"]
        assert math.isclose(row["error"], rel(got[path], deltas[path]), rel_tol=1e-9)  # as stored, float64 dense oracle


def test_dtype_source_with_mixed_factor_dtypes_refused(mlp_adapter, run_cli, tmp_path):
    src, _ = mlp_adapter
    mixed = tmp_path / "mixed"
    shutil.copytree(src, mixed)
    t = load_file(src / "adapter_model.safetensors")
    key = sorted(k for k in t if k.endswith("lora_B.weight"))[0]
    t[key] = t[key].to(torch.bfloat16)
    save_file(t, str(mixed / "adapter_model.safetensors"), metadata={"format": "pt"})
    before = (mixed / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "out"
    r = run_cli("resize", mixed, "-o", out, "--rank", "2", "--dtype", "source")
    assert_one_error_line(r, "--dtype source is ambiguous", "BF16, F32", "--dtype fp32")
    assert not out.exists() and (mixed / "adapter_model.safetensors").read_bytes() == before
    assert run_cli("resize", mixed, "-o", out, "--rank", "2").exit_code == 0  # fp32: no ambiguity
