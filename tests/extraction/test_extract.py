"""``extract`` against PEFT: the adapter loads in PEFT, and PEFT's own merge of it gives the errors the
report promises, module by module; the rank rule; ``--for vllm``; bad input is one line, exit 2."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jsonschema
import pytest
import torch
import transformers
from peft import PeftModel

from adapterfmt.extraction.extract import extract_adapter
from adapterfmt.deltas.rank_rules import make_rule
from adapterfmt.extraction.factorize import _kept, factorize, slack

from conftest import REPO, assert_one_error_line  # noqa: E402

from _extract_models import FULL_RANK, LOW_RANK, _config, _load, _peft_merge, make_models


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_models(tmp_path_factory)


SCHEMA = json.loads((REPO / "docs" / "schemas" / "extract.schema.json").read_text())


def test_kept_rank_rule() -> None:
    """extract's ranks come from the one rank rule (resize's), with its float32 rounding slack."""
    s = torch.tensor([4.0, 3.0, 2.0, 1.0]).sqrt()  # energies 4, 3, 2, 1 of 10
    assert _kept(s, make_rule("energy", 0.4)) == 1  # exactly reached by the first: no extra value kept
    assert _kept(s, make_rule("energy", 0.41)) == 2
    assert _kept(s, make_rule("energy", 0.9)) == 3
    assert _kept(s, make_rule("energy", 1.0)) == 4
    assert _kept(s, make_rule("rank", 2)) == 2 and _kept(s, make_rule("rank", 9)) == 4
    assert _kept(s[:2], make_rule("energy", 0.8), total=10.0) == 2  # short of the target: all given


def test_factorize_error_is_exact_and_never_worse_than_certified() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 5, generator=g) @ torch.randn(5, 300, generator=g)
    f = factorize(low, make_rule("rank", 8), generator=torch.Generator().manual_seed(1))
    assert f.method == "randomized" and f.rank == 8
    assert math.isclose(f.residual, float(((low - f.b @ f.a).double() ** 2).sum()), rel_tol=1e-9)
    dense = torch.randn(200, 300, generator=g)
    f = factorize(dense, make_rule("rank", 8), generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(dense.double())
    best = float((s[8:] ** 2).sum())
    assert f.method == "exact"  # a flat spectrum: no gap to certify the sketch with
    assert f.residual <= best * (1 + 1e-6)
    e = factorize(dense, make_rule("energy", 0.5), generator=torch.Generator().manual_seed(1))
    assert e.retained_energy >= 0.5 and e.rank >= _kept(s, make_rule("energy", 0.5), total=float((s.double() ** 2).sum()))


@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_certified_randomized_within_the_data_rounding(precision: torch.dtype) -> None:
    """A spectrum with a head wider than the first sketch and a noisy tail: ``auto`` widens the
    sketch, certifies it, and loses at most ``slack`` (the rounding of the data's dtype) of energy
    against the best rank-N approximation (float64 SVD of the same delta); ``randomized`` (no
    certificate, a sketch narrower than the head) loses more."""
    g = torch.Generator().manual_seed(3)
    low = torch.randn(300, 40, generator=g) @ torch.randn(40, 200, generator=g)
    noise = torch.randn(300, 200, generator=g)
    delta = low + noise * (0.05 * low.norm() / noise.norm())
    s = torch.linalg.svdvals(delta.double())
    total, best = float((s**2).sum()), float((s[6:] ** 2).sum())
    f = factorize(delta, make_rule("rank", 6), generator=torch.Generator().manual_seed(1), precision=precision)
    assert f.method == "randomized" and f.rank == 6
    assert -1e-9 * total <= f.residual - best <= slack(precision, total - best, total)  # (float32 residual: below the optimum by rounding)
    plain = factorize(delta, make_rule("rank", 6), generator=torch.Generator().manual_seed(1), svd="randomized")
    assert plain.residual - best > slack(precision, total - best, total)


def test_peft_loads_it_and_gives_the_promised_errors(models: tuple[Path, Path], tmp_path: Path, run_cli) -> None:
    base, tuned = models
    out = tmp_path / "adapter"
    result = run_cli("extract", "--base", base, "--tuned", tuned, "-o", out, "--rank", "4", "--full-copies", "model.norm", "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    jsonschema.validate(doc, SCHEMA)
    config = json.loads((out / "adapter_config.json").read_text())
    # the MLP has no bias: PEFT's lora_bias would give it one, so the q_proj bias delta is listed instead
    assert config["lora_bias"] is False and config["modules_to_save"] == ["model.norm"]
    merged, t, b = _peft_merge(base, out), _load(tuned).state_dict(), _load(base).state_dict()
    rows = {m["module"]: m for m in doc["modules"]}
    assert set(rows) == {f"model.layers.0.{'self_attn' if n in LOW_RANK else 'mlp'}.{n}" for n in LOW_RANK + FULL_RANK}
    for module, row in rows.items():
        key = module + ".weight"
        delta = (t[key] - b[key]).double()
        error = float((t[key] - merged[key]).double().norm() / delta.norm())  # what PEFT's merge of the adapter gives
        assert math.isclose(error, row["relative_error"], rel_tol=1e-3, abs_tol=1e-6), (module, error, row)
        assert row["rank"] == 4
        if module.rsplit(".", 1)[-1] in LOW_RANK:
            assert row["relative_error"] < 1e-5 and row["method"] == "randomized"
        else:  # a dense delta: the error of the best rank-4 approximation (exact SVD)
            s = torch.linalg.svdvals(delta)
            assert row["relative_error"] <= math.sqrt(float((s[4:] ** 2).sum() / (s**2).sum())) * (1 + 1e-4)
    assert torch.equal(merged["model.norm.weight"], t["model.norm.weight"])
    assert doc["totals"]["unchanged_tensors"] > 0
    listed = {n["key"]: n for n in doc["not_low_rank"]}
    assert set(listed) == {"model.norm.weight", "model.layers.0.self_attn.q_proj.bias"}
    assert listed["model.norm.weight"]["saved_as_full_copy"] and not listed["model.layers.0.self_attn.q_proj.bias"]["saved_as_full_copy"]


def test_bias_deltas_as_lora_bias(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = models
    summary = extract_adapter(base, tuned, tmp_path / "a", rank=3, target_modules=list(LOW_RANK))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True
    assert [m.bias for m in summary.modules if m.module.endswith("q_proj")] == [True]
    merged, t = _peft_merge(base, tmp_path / "a"), _load(tuned).state_dict()
    for name in LOW_RANK:  # every bias as tuned (k/v/o: unchanged, zero deltas), every rank-3 delta recovered
        key = f"model.layers.0.self_attn.{name}"
        assert torch.allclose(merged[key + ".bias"], t[key + ".bias"], atol=1e-6)
        assert torch.allclose(merged[key + ".weight"], t[key + ".weight"], atol=1e-5)


def test_svd_modes(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = models
    auto = {m.module: m for m in extract_adapter(base, tuned, tmp_path / "auto", rank=4).modules}
    fast = {m.module: m for m in extract_adapter(base, tuned, tmp_path / "fast", rank=4, svd="randomized").modules}
    exact = {m.module: m for m in extract_adapter(base, tuned, tmp_path / "exact", rank=4, svd="exact").modules}
    assert {m.method for m in fast.values()} == {"randomized"} and {m.method for m in exact.values()} == {"exact"}
    for module, m in fast.items():
        assert m.relative_error >= exact[module].relative_error * (1 - 1e-5) - 1e-6  # the exact SVD is optimal (up to float32 noise)
        assert auto[module].relative_error <= exact[module].relative_error * (1 + 1e-3) + 1e-6


def test_energy_rule_per_module(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = models
    summary = extract_adapter(base, tuned, tmp_path / "a", energy=0.6, dtype="bf16")
    for m in summary.modules:
        assert m.retained_energy >= 0.6 or m.method == "exact"
        if m.module.rsplit(".", 1)[-1] in LOW_RANK:
            assert m.rank <= 3
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    ranks = {m.module: m.rank for m in summary.modules}
    assert config["r"] == max(ranks.values())
    assert config["rank_pattern"] == {k: v for k, v in ranks.items() if v != config["r"]} == config["alpha_pattern"]
    assert {n.key for n in summary.not_low_rank} == {"model.norm.weight", "model.layers.0.self_attn.q_proj.bias"}  # listed, not saved
    assert config["modules_to_save"] is None
    merged, t = _peft_merge(base, tmp_path / "a"), _load(tuned).state_dict()
    for m in summary.modules:  # bf16 factors: the error is measured on them as stored
        key = m.module + ".weight"
        error = float((t[key] - merged[key]).double().norm()) / m.delta_norm
        assert math.isclose(error, m.relative_error, rel_tol=1e-3, abs_tol=1e-5)


def test_for_vllm(models: tuple[Path, Path], tmp_path: Path, run_cli) -> None:
    base, tuned = models
    summary = extract_adapter(base, tuned, tmp_path / "v", rank=4, target="vllm")
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["lora_bias"] is False and config["modules_to_save"] is None
    assert summary.dropped == ["model.layers.0.self_attn.q_proj.bias: vLLM refuses lora_bias"]
    result = run_cli("extract", "--base", base, "--tuned", tuned, "-o", tmp_path / "w", "--rank", "4", "--for", "vllm", "--full-copies", "model.norm")
    assert_one_error_line(result, "vLLM", "--full-copies")
    assert not (tmp_path / "w").exists()


def test_bad_input_one_line(models: tuple[Path, Path], tmp_path: Path, run_cli) -> None:
    base, _ = models
    torch.manual_seed(0)
    other = tmp_path / "other"
    transformers.LlamaForCausalLM(_config(intermediate_size=80)).save_pretrained(str(other))
    result = run_cli("extract", "--base", base, "--tuned", other, "-o", tmp_path / "o", "--rank", "2")
    assert_one_error_line(result, "model.layers.0.mlp.down_proj.weight", "[64, 80]")
    gpt = tmp_path / "gpt-neox"
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96)).save_pretrained(str(gpt))
    assert_one_error_line(run_cli("extract", "--base", base, "--tuned", gpt, "-o", tmp_path / "o", "--rank", "2"), "gpt_neox")
    assert_one_error_line(run_cli("extract", "--base", "no-such-org/no-such-model", "--tuned", base, "-o", tmp_path / "o", "--rank", "2"))
    assert_one_error_line(run_cli("extract", "--base", base, "--tuned", base, "-o", tmp_path / "o", "--rank", "2", "--energy", "0.5"), "--rank")
    assert not (tmp_path / "o").exists()


def test_resized_vocabulary_listed_and_saved_only_when_named(models: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    base, _ = models
    model = _load(base)
    model.resize_token_embeddings(72)  # new rows in the embedding and the head
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    model.save_pretrained(str(tmp_path / "tuned"))
    listed = extract_adapter(base, tmp_path / "tuned", tmp_path / "a", rank=2)
    reasons = {n.key: n.reason for n in listed.not_low_rank}
    assert reasons == {"model.embed_tokens.weight": "resized vocabulary ([64, 64] -> [72, 64])", "lm_head.weight": "resized vocabulary ([64, 64] -> [72, 64])"}
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["modules_to_save"] is None
    saved = extract_adapter(base, tmp_path / "tuned", tmp_path / "b", rank=2, full_copies=["embed_tokens", "lm_head"])
    assert saved.full_copies == ["lm_head", "model.embed_tokens"] and all(n.saved for n in saved.not_low_rank)
    tuned = _load(tmp_path / "tuned").state_dict()
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("base_model.model.lm_head.weight"), tuned["lm_head.weight"])
        assert torch.equal(f.get_tensor("base_model.model.model.embed_tokens.weight"), tuned["model.embed_tokens.weight"])


def test_peft_forward_gives_the_tuned_outputs(models: tuple[Path, Path], tmp_path: Path) -> None:
    """A fine-tune that is low-rank material throughout (rank-3 attention updates, a bias): PEFT's
    unmerged forward with the extracted adapter gives the fine-tune's logits."""
    base, _ = models
    model = _load(base)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in LOW_RANK:
            w = getattr(model.model.layers[0].self_attn, name).weight
            w.add_(torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g) * 0.05)
        model.model.layers[0].self_attn.q_proj.bias.add_(0.1)
    model.save_pretrained(str(tmp_path / "tuned"))
    summary = extract_adapter(base, tmp_path / "tuned", tmp_path / "a", rank=3, seed=7)
    assert all(m.relative_error < 1e-5 for m in summary.modules) and summary.not_low_rank == []
    peft = PeftModel.from_pretrained(_load(base), str(tmp_path / "a")).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
    with torch.no_grad():
        expected, got = _load(tmp_path / "tuned")(ids).logits, peft(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())
