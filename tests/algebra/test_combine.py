"""``adapterfmt combine`` against PEFT and dense float64 deltas.

We test:
* ``cat`` gives PEFT's ``add_weighted_adapter(..., "cat")`` factors bit for bit (float32 sources, and
  bf16 sources at the default ``--dtype fp32``; ``--dtype source`` keeps bf16);
* bf16 sources, ``svd --rank k``: float32 factors by default whose error against the exact weighted
  sum (dense float64 oracle) is at most PEFT's ``"svd"`` result's and is what the report says;
  ``--dtype source`` with sources of different dtypes is refused;
* ``svd`` at full rank gives PEFT's ``"svd"`` delta (``svd_rank`` = Σr); ``svd`` / ``linear`` with
  ``--rank`` give the best rank-k approximation of the exact weighted sum Σ wᵢ·sᵢ·Bᵢ·Aᵢ, with each
  source's own scale (an rsLoRA source next to a plain one: peft #3761), and the report's error;
* ``ties`` / ``magnitude_prune`` (full rank) equal ``peft.utils.merge_utils`` applied to the dense deltas;
  ``dare_*`` are reproducible from ``--seed`` and change with it; density 1 is the plain sum;
* modules held by one source only; full copies: identical ones carried, differing ones refused
  unless ``--copies-from`` names a source;
* bad input: different bases, ``--rank`` above the sources, densities outside (0, 1], unknown
  methods: one line, exit 2, nothing written.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from _algebra_helpers import best_rank, make_peft_adapter, mlp_stack, peft_deltas, rel
from conftest import assert_one_error_line


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two float32 adapters on the same MLP: ``a`` on fc1/fc2 (r 4, α 8), ``b`` on fc1 only (r 3, α 5)."""
    root = tmp_path_factory.mktemp("pair")
    a = make_peft_adapter(mlp_stack, root / "a", seed=3, r=4, lora_alpha=8, target_modules=["fc1", "fc2"])
    b = make_peft_adapter(mlp_stack, root / "b", seed=4, r=3, lora_alpha=5, target_modules=["fc1"])
    rs = make_peft_adapter(mlp_stack, root / "rs", seed=5, r=4, lora_alpha=3, use_rslora=True, target_modules=["fc1"],
                           rank_pattern={"blocks.2.fc1": 2})
    return {"a": a, "b": b, "rs": rs, "deltas": {n: peft_deltas(mlp_stack, p) for n, p in (("a", a), ("b", b), ("rs", rs))}}


def _peft_combined(pair, names, weights, method, **kw):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(mlp_stack(), str(pair[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(pair[n]), adapter_name=n)
    pm.add_weighted_adapter(list(names), list(weights), "mix", combination_type=method, **kw)
    return pm


def test_cat_is_peft_bit_for_bit(pair, run_cli, tmp_path):
    out = tmp_path / "cat"
    r = run_cli("combine", f"{pair['a']}:0.7", f"{pair['b']}:-0.5", "-o", out, "--method", "cat", "--json")
    assert r.exit_code == 0, r
    ours = load_file(out / "adapter_model.safetensors")
    pm = _peft_combined(pair, ["a", "b"], [0.7, -0.5], "cat")
    for i in range(13):
        path = f"blocks.{i}.fc1"  # held by both sources (PEFT pads the others with zero rows)
        layer = pm.base_model.model.get_submodule(path)
        for side in ("A", "B"):
            want = getattr(layer, f"lora_{side}")["mix"].weight.detach()
            got = ours[f"base_model.model.{path}.lora_{side}.weight"]
            assert got.dtype == want.dtype and torch.equal(got, want), (path, side)
        assert layer.scaling["mix"] == 1.0
    got = peft_deltas(mlp_stack, out)
    for path, d in got.items():
        want = 0.7 * pair["deltas"]["a"][path] + (-0.5 * pair["deltas"]["b"][path] if path in pair["deltas"]["b"] else 0)
        assert rel(d, want) < 1e-6


def test_svd_full_rank_matches_peft(pair, run_cli, tmp_path):
    out = tmp_path / "svd"
    r = run_cli("combine", f"{pair['a']}:0.7", f"{pair['b']}:-0.5", "-o", out, "--method", "svd", "--json")
    assert r.exit_code == 0, r
    assert all(m["error"] < 1e-6 for m in r.json()["modules"])
    pm = _peft_combined(pair, ["a", "b"], [0.7, -0.5], "svd", svd_rank=7)
    got = peft_deltas(mlp_stack, out)
    for i in range(13):
        path = f"blocks.{i}.fc1"
        with torch.no_grad():
            want = pm.base_model.model.get_submodule(path).get_delta_weight("mix").double()
        assert rel(got[path], want) < 1e-5


@pytest.mark.parametrize("method", ["svd", "linear"])
def test_truncated_is_the_best_rank_k_of_the_exact_weighted_sum(pair, run_cli, tmp_path, method):
    out = tmp_path / method
    r = run_cli("combine", f"{pair['a']}:1.5", f"{pair['rs']}:0.25", "-o", out, "--method", method, "--rank", "3", "--json")
    assert r.exit_code == 0, r
    rows = {m["module"]: m for m in r.json()["modules"]}
    got = peft_deltas(mlp_stack, out)
    da, drs = pair["deltas"]["a"], pair["deltas"]["rs"]
    for path, d in got.items():
        exact = 1.5 * da[path] + (0.25 * drs[path] if path in drs else 0)
        assert rel(d, best_rank(exact, 3)) < 1e-5, path
        assert math.isclose(rows[path]["error"], rel(d, exact), rel_tol=1e-4, abs_tol=1e-6)
        assert rows[path]["sources"] == ([0, 1] if path in drs else [0])


@pytest.mark.parametrize("f64", [False, True])
def test_linear_without_rank_is_exact(pair, run_cli, tmp_path, f64):
    a, rs = pair["a"], pair["rs"]
    if f64:  # float64 sources kept as float64 (--dtype source): exact to float64 rounding
        a, rs = _dtype_copy(a, tmp_path / "a64", torch.float64), _dtype_copy(rs, tmp_path / "rs64", torch.float64)
    out = tmp_path / "lin"
    r = run_cli("combine", f"{a}:1.5", f"{rs}:0.25", "-o", out, "--method", "linear", "--json", *(("--dtype", "source") if f64 else ()))
    assert r.exit_code == 0, r
    written = load_file(out / "adapter_model.safetensors")
    assert {v.dtype for v in written.values()} == {torch.float64 if f64 else torch.float32}
    rows = {m["module"]: m for m in r.json()["modules"]}
    for path in rows:
        b_, a_ = (written[f"base_model.model.{path}.lora_{x}.weight"].double() for x in ("B", "A"))
        exact = 1.5 * pair["deltas"]["a"][path] + (0.25 * pair["deltas"]["rs"][path] if path in pair["deltas"]["rs"] else 0)
        assert rel(b_ @ a_, exact) < (1e-13 if f64 else 1e-6), path
        assert math.isclose(rows[path]["error"], rel(b_ @ a_, exact), rel_tol=1e-6, abs_tol=1e-15)


@pytest.mark.parametrize("method,kw", [("ties", {"majority_sign_method": "total"}), ("ties", {"majority_sign_method": "frequency"}),
                                       ("magnitude_prune", {})])
def test_dense_methods_equal_peft_merge_utils_on_the_deltas(pair, run_cli, tmp_path, method, kw):
    from peft.utils import merge_utils

    out = tmp_path / method
    extra = ["--majority-sign", kw["majority_sign_method"]] if kw else []
    r = run_cli("combine", f"{pair['a']}:0.8", f"{pair['b']}:0.6", "-o", out, "--method", method, "--density", "0.4", "--rank", "8", *extra, "--json")
    assert r.exit_code == 0, r
    got = peft_deltas(mlp_stack, out)
    for i in range(13):
        path = f"blocks.{i}.fc1"
        deltas = [pair["deltas"]["a"][path].float(), pair["deltas"]["b"][path].float()]
        w = torch.tensor([0.8, 0.6])
        want = merge_utils.ties(deltas, w, 0.4, **kw) if method == "ties" else merge_utils.magnitude_prune(deltas, w, 0.4)
        assert rel(got[path], want.double()) < 1e-5, path  # 8×8 deltas at rank 8: nothing truncated


def test_dare_is_seeded(pair, run_cli, tmp_path):
    def run(name, *args):
        r = run_cli("combine", pair["a"], pair["b"], "-o", tmp_path / name, "--method", "dare_ties", "--density", "0.5", *args)
        assert r.exit_code == 0, r
        return (tmp_path / name / "adapter_model.safetensors").read_bytes()

    assert run("s1", "--seed", "11") == run("s1b", "--seed", "11")
    assert run("s2", "--seed", "12") != run("s1c", "--seed", "11")
    r = run_cli("combine", f"{pair['a']}:0.8", f"{pair['b']}:0.6", "-o", tmp_path / "d1", "--method", "dare_linear", "--density", "1")
    assert r.exit_code == 0
    for path, d in peft_deltas(mlp_stack, tmp_path / "d1").items():
        exact = 0.8 * pair["deltas"]["a"][path] + (0.6 * pair["deltas"]["b"][path] if path in pair["deltas"]["b"] else 0)
        assert rel(d, exact) < 1e-5


def test_dare_masks_follow_the_documented_generator(pair, tmp_path):
    """The mask of source i in module p is ``torch.rand(shape, generator=G(seed, i, p)) < density``."""
    from adapterfmt.algebra.combine import _generator, dense_merge

    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    got = dense_merge([x], [1.0], "dare_linear", 0.5, "total", [_generator(3, 0, "m")])
    g = _generator(3, 0, "m")
    keep = torch.rand(x.shape, generator=g) < 0.5
    assert torch.equal(got, x * keep / 0.5)
    assert 0 < int(keep.sum()) < keep.numel()


def test_full_copies_identical_carried_differing_refused(run_cli, tmp_path):
    a = make_peft_adapter(mlp_stack, tmp_path / "a", seed=3, r=2, target_modules=["fc1"], modules_to_save=["head"])
    b = make_peft_adapter(mlp_stack, tmp_path / "b", seed=4, r=2, target_modules=["fc1"], modules_to_save=["head"])
    r = run_cli("combine", a, b, "-o", tmp_path / "x", "--method", "cat")
    assert_one_error_line(r, "differ between sources", "--copies-from")
    assert not (tmp_path / "x").exists()
    r = run_cli("combine", a, b, "-o", tmp_path / "y", "--method", "cat", "--copies-from", "1", "--json")
    assert r.exit_code == 0, r
    src, out = load_file(b / "adapter_model.safetensors"), load_file(tmp_path / "y" / "adapter_model.safetensors")
    copies = [k for k in src if "lora_" not in k]
    assert copies and all(torch.equal(src[k], out[k]) for k in copies)
    assert sorted(r.json()["carried"]) == sorted(copies)
    r = run_cli("combine", a, a, "-o", tmp_path / "z", "--method", "cat")  # identical copies: carried
    assert r.exit_code == 0, r


def _dtype_copy(src, dst, dtype):
    shutil.copytree(src, dst)
    save_file({k: v.to(dtype) for k, v in load_file(src / "adapter_model.safetensors").items()},
              str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def _bf16_copy(src, dst):
    return _dtype_copy(src, dst, torch.bfloat16)


@pytest.fixture(scope="module")
def bf16_pair(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    out = {"a": _bf16_copy(pair["a"], root / "a"), "b": _bf16_copy(pair["b"], root / "b")}
    out["deltas"] = {n: peft_deltas(mlp_stack, p) for n, p in out.items()}
    return out


def test_bf16_sources_svd_error_at_most_peft(bf16_pair, run_cli, tmp_path):
    out = tmp_path / "svd"
    r = run_cli("combine", f"{bf16_pair['a']}:0.7", f"{bf16_pair['b']}:-0.5", "-o", out, "--method", "svd", "--rank", "3", "--json")
    assert r.exit_code == 0, r
    doc = r.json()
    assert doc["dtype"] == "fp32" and {m["dtype"] for m in doc["modules"]} == {"F32"}
    rows = {m["module"]: m for m in doc["modules"]}
    pm = _peft_combined(bf16_pair, ["a", "b"], [0.7, -0.5], "svd", svd_rank=3)
    got = peft_deltas(mlp_stack, out)
    da, db = bf16_pair["deltas"]["a"], bf16_pair["deltas"]["b"]
    for i in range(13):
        path = f"blocks.{i}.fc1"  # held by both sources
        exact = 0.7 * da[path] - 0.5 * db[path]
        # PEFT's factors as stored (float32), multiplied in float64 like ours: get_delta_weight's float32
        # product adds rounding noise of the first order, which can land on either side of the optimum
        layer = pm.base_model.model.get_submodule(path)
        peft = (layer.lora_B["mix"].weight.detach().double() @ layer.lora_A["mix"].weight.detach().double()) * layer.scaling["mix"]
        s = torch.linalg.svdvals(exact)
        bound = float((s[3:] ** 2).sum().sqrt() / torch.linalg.norm(exact))  # Eckart–Young: no rank-3 result does better
        ours = rel(got[path], exact)
        assert math.isclose(rows[path]["error"], ours, rel_tol=1e-9)  # the report: the error as stored
        assert bound * (1 - 1e-14) <= ours <= rel(peft, exact), (path, bound, ours, rel(peft, exact))


def test_bf16_sources_cat_is_peft_bit_for_bit_in_float32(bf16_pair, run_cli, tmp_path):
    out = tmp_path / "cat"
    assert run_cli("combine", f"{bf16_pair['a']}:0.7", f"{bf16_pair['b']}:-0.5", "-o", out, "--method", "cat").exit_code == 0
    ours = load_file(out / "adapter_model.safetensors")
    pm = _peft_combined(bf16_pair, ["a", "b"], [0.7, -0.5], "cat")
    for i in range(13):
        path = f"blocks.{i}.fc1"
        layer = pm.base_model.model.get_submodule(path)
        for side in ("A", "B"):
            want = getattr(layer, f"lora_{side}")["mix"].weight.detach()
            got = ours[f"base_model.model.{path}.lora_{side}.weight"]
            assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), (path, side)
    out2 = tmp_path / "cat16"
    r = run_cli("combine", f"{bf16_pair['a']}:0.7", f"{bf16_pair['b']}:-0.5", "-o", out2, "--method", "cat", "--dtype", "source", "--json")
    assert r.exit_code == 0, r
    assert {v.dtype for v in load_file(out2 / "adapter_model.safetensors").values()} == {torch.bfloat16}
    got = peft_deltas(mlp_stack, out2)
    for row in r.json()["modules"]:
        path = row["module"]
        exact = 0.7 * bf16_pair["deltas"]["a"][path] + (-0.5 * bf16_pair["deltas"]["b"][path] if path in bf16_pair["deltas"]["b"] else 0)
        assert row["dtype"] == "BF16" and math.isclose(row["error"], rel(got[path], exact), rel_tol=1e-9)


def test_dtype_source_with_mixed_sources_refused(pair, bf16_pair, run_cli, tmp_path):
    out = tmp_path / "out"
    r = run_cli("combine", pair["a"], bf16_pair["b"], "-o", out, "--method", "svd", "--dtype", "source")
    assert_one_error_line(r, "--dtype source is ambiguous", "BF16, F32")
    assert not out.exists()
    r = run_cli("combine", pair["a"], bf16_pair["b"], "-o", out, "--method", "svd", "--dtype", "fp16")
    assert r.exit_code == 0, r
    assert {v.dtype for v in load_file(out / "adapter_model.safetensors").values()} == {torch.float16}


def test_bad_input_one_line_nothing_written(pair, run_cli, tmp_path):
    from _algebra_helpers import conv_embed_net

    other = make_peft_adapter(lambda: _wider(), tmp_path / "other", r=2, target_modules=["fc1"])
    out = tmp_path / "out"
    cases = [
        ((pair["a"], other, "--method", "cat"), ("different bases",)),
        ((pair["a"], pair["b"], "--method", "svd", "--rank", "8"), ("--rank 8", "above what the sources hold")),
        ((pair["a"], pair["b"], "--method", "ties", "--density", "0"), ("(0, 1]",)),
        ((pair["a"], pair["b"], "--method", "ties", "--density", "1.5"), ("(0, 1]",)),
        ((pair["a"], pair["b"], "--method", "ties"), ("needs --density",)),
        ((pair["a"], pair["b"], "--method", "svd", "--density", "0.5"), ("--density applies",)),
        ((pair["a"], pair["b"], "--method", "average"), ("unknown combine method",)),
        ((pair["a"], pair["b"], "--method", "cat", "--rank", "2"), ("does not apply to cat",)),
        ((pair["a"], pair["b"], "--method", "ties", "--density", "0.5", "--majority-sign", "most"), ("majority sign",)),
        ((pair["a"], pair["b"], "--method", "svd", "--dtype", "float8"), ("unknown --dtype",)),
    ]
    for args, words in cases:
        r = run_cli("combine", *args, "-o", out)
        assert_one_error_line(r, *words)
        assert not out.exists()
    del conv_embed_net


class _Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 12)}) for _ in range(2))


def _wider() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Wide()
