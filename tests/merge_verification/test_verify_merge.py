"""``verify-merge`` against PEFT: both of PEFT's merge paths pass, and every deliberately wrong merge
gets the verdict that names its cause (exit 1); bad input is one line, exit 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable, Optional

import jsonschema
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from adapterfmt.merge_verification.verify import _Checker, verify_merge

from conftest import REPO, assert_one_error_line

SCHEMA = json.loads((REPO / "docs" / "schemas" / "verify-merge.schema.json").read_text())
R, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(tmp: Path, *, dtype: torch.dtype, tied: bool = False) -> tuple[Path, Callable[[], torch.nn.Module]]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied
    )
    path = tmp / ("base-tied" if tied else f"base-{str(dtype)[6:]}")
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(str(path))
    return path, lambda: transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _adapter(tmp: Path, load: Callable[[], torch.nn.Module], name: str, **config: object) -> Path:
    torch.manual_seed(1)
    kwargs = dict(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    kwargs.update(config)
    model = get_peft_model(load(), LoraConfig(**kwargs))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    path = tmp / name
    model.save_pretrained(str(path))
    return path


def _peft(load: Callable[[], torch.nn.Module], adapter: Path, *, safe: bool = False, factor: float = 1.0) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(load(), str(adapter))
    if factor != 1.0:
        for m in model.modules():
            if isinstance(getattr(m, "scaling", None), dict):
                m.scaling["default"] *= factor
    merged = model.merge_and_unload(safe_merge=safe)
    return {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}


def _save(tmp: Path, name: str, base: Path, tensors: dict[str, torch.Tensor], config: Optional[dict] = None) -> Path:
    out = tmp / name
    out.mkdir()
    seen: set[int] = set()
    unique = {}
    for k, v in tensors.items():  # a tied state dict holds one storage twice: save it once, as PEFT's save_pretrained does
        if v.untyped_storage().data_ptr() in seen and k == "lm_head.weight":
            continue
        seen.add(v.untyped_storage().data_ptr())
        unique[k] = v.contiguous()
    save_file(unique, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(config or {})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _verdicts(report) -> dict[str, str]:
    return {t.key: t.verdict for t in report.tensors if not t.ok}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_peft_paths_pass(tmp_path: Path, dtype: torch.dtype) -> None:
    base, load = _base(tmp_path, dtype=dtype)
    adapter = _adapter(tmp_path, load, "lora", modules_to_save=["lm_head"])
    for safe in (False, True):
        merged = tmp_path / f"merged-{safe}"
        _peft(load, adapter, safe=safe)  # warm: PEFT's own output
        model = PeftModel.from_pretrained(load(), str(adapter)).merge_and_unload(safe_merge=safe)
        model.save_pretrained(str(merged))
        report = verify_merge(base, adapter, merged)
        assert report.ok, [t for t in report.tensors if not t.ok]
        assert report.counts()["merge"] == 7 and report.counts()["replace"] == 1
        if dtype == torch.bfloat16 and safe:  # two roundings: PEFT's safe path, told apart from the default
            assert "peft-safe-merge" in report.paths()
        if dtype == torch.float32:
            assert set(report.paths()) == {"peft"}  # fp32: both paths round the same way
        ulp = verify_merge(base, adapter, merged, tolerance="ulp")
        assert ulp.ok


def test_json_matches_schema_and_exit_codes(tmp_path: Path, run_cli) -> None:
    base, load = _base(tmp_path, dtype=torch.bfloat16)
    adapter = _adapter(tmp_path, load, "lora")
    good = _save(tmp_path, "good", base, _peft(load, adapter))
    bad = _save(tmp_path, "bad", base, _peft(load, adapter, factor=2.0))
    ok = run_cli("verify-merge", "--base", base, "--adapter", adapter, "--merged", good, "--json")
    assert ok.exit_code == 0, ok
    jsonschema.validate(ok.json(), SCHEMA)
    assert ok.json()["ok"] is True
    failed = run_cli("verify-merge", "--base", base, "--adapter", adapter, "--merged", bad, "--json")
    assert failed.exit_code == 1, failed
    jsonschema.validate(failed.json(), SCHEMA)
    assert failed.json()["failed_verdicts"] == {"applied-twice": 7}
    text = run_cli("verify-merge", "--base", base, "--adapter", adapter, "--merged", bad)
    assert text.exit_code == 1 and "applied-twice" in text.stdout


@pytest.fixture
def fp32(tmp_path: Path):
    base, load = _base(tmp_path, dtype=torch.float32)
    return base, load, _adapter(tmp_path, load, "lora", modules_to_save=["lm_head"])


def test_not_applied(tmp_path: Path, fp32) -> None:
    base, load, adapter = fp32
    plain = {k: v.contiguous() for k, v in load().state_dict().items()}
    merged = _save(tmp_path, "m", base, plain)
    v = _verdicts(verify_merge(base, adapter, merged))
    assert v.pop("lm_head.weight") == "full-copy-not-applied"
    assert len(v) == 7 and set(v.values()) == {"not-applied"}


def test_applied_twice_and_scales_named(tmp_path: Path, fp32) -> None:
    base, load, adapter = fp32
    twice = verify_merge(base, adapter, _save(tmp_path, "twice", base, _peft(load, adapter, factor=2.0)))
    assert set(_verdicts(twice).values()) == {"applied-twice"}
    # alpha instead of alpha / r: a factor of r
    alpha = verify_merge(base, adapter, _save(tmp_path, "alpha", base, _peft(load, adapter, factor=R)))
    details = {t.detail for t in alpha.tensors if not t.ok}
    assert {t.verdict for t in alpha.tensors if not t.ok} == {"scale"}
    assert details == {f"scale off by a factor of {R}: the merge used lora_alpha (not divided by r) = {ALPHA} instead of {ALPHA / R:.4g}"}
    # an rsLoRA adapter merged with alpha / r
    rs = _adapter(tmp_path, load, "rslora", use_rslora=True)
    wrong = verify_merge(base, rs, _save(tmp_path, "rs", base, _peft(load, rs, factor=1 / math.sqrt(R))))
    assert {t.verdict for t in wrong.tensors if not t.ok} == {"scale"}
    assert all("alpha/r = 2 instead of 4" in t.detail for t in wrong.tensors if not t.ok)
    negated = verify_merge(base, adapter, _save(tmp_path, "neg", base, _peft(load, adapter, factor=-1.0)))
    assert set(_verdicts(negated).values()) == {"negated"}


def test_transposed_and_wrong_module(tmp_path: Path, fp32) -> None:
    base, load, adapter = fp32
    plain = load().state_dict()
    right = _peft(load, adapter)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    t = dict(right)
    t[q] = (plain[q] + (right[q] - plain[q]).T).contiguous()  # fan_in_fan_out handled the wrong way
    assert _verdicts(verify_merge(base, adapter, _save(tmp_path, "t", base, t))) == {q: "transposed"}
    w = dict(right)
    w[q], w[o] = plain[q] + (right[o] - plain[o]), plain[o] + (right[q] - plain[q])  # deltas swapped
    report = verify_merge(base, adapter, _save(tmp_path, "w", base, w))
    assert _verdicts(report) == {q: "wrong-module", o: "wrong-module"}
    assert o in next(x.detail for x in report.tensors if x.key == q)
    # a delta put on a module the adapter does not touch (a norm is 1-D: the embedding, 2-D)
    e = dict(right)
    e["model.embed_tokens.weight"] = plain["model.embed_tokens.weight"] + 0.5
    assert _verdicts(verify_merge(base, adapter, _save(tmp_path, "e", base, e))) == {"model.embed_tokens.weight": "changed"}


def test_tied_head_not_untied(tmp_path: Path) -> None:
    base, load = _base(tmp_path, dtype=torch.float32, tied=True)
    adapter = _adapter(tmp_path, load, "lora", target_modules=["q_proj"], modules_to_save=["lm_head"])
    right = _peft(load, adapter)
    kept = _save(tmp_path, "kept-tie", base, {k: v for k, v in right.items() if k != "lm_head.weight"})
    assert _verdicts(verify_merge(base, adapter, kept)) == {"lm_head.weight": "tied-head-not-untied"}
    stored = _save(tmp_path, "stored", base, dict(right))
    stored_tensors = dict(right)
    stored_tensors["lm_head.weight"] = stored_tensors["lm_head.weight"].clone()
    shutil.rmtree(stored)
    stored = _save(tmp_path, "stored", base, stored_tensors)  # both stored, config still ties
    assert _verdicts(verify_merge(base, adapter, stored)) == {"lm_head.weight": "tied-head-not-untied"}
    untied = _save(tmp_path, "untied", base, stored_tensors, {"tie_word_embeddings": False})
    assert verify_merge(base, adapter, untied).ok
    # LoRA on a tied model: PEFT's merge keeps the tie, and that is right
    lora = _adapter(tmp_path, load, "lora-only", target_modules=["q_proj", "lm_head"])
    tied_right = _peft(load, lora)
    assert verify_merge(base, lora, _save(tmp_path, "lora-tied", base, tied_right)).ok


def test_bad_input_one_line(tmp_path: Path, fp32, run_cli) -> None:
    base, load, adapter = fp32
    right = _peft(load, adapter)
    key = "model.layers.0.mlp.down_proj.weight"
    missing = _save(tmp_path, "missing", base, {k: v for k, v in right.items() if k != key})
    result = run_cli("verify-merge", "--base", base, "--adapter", adapter, "--merged", missing)
    assert_one_error_line(result, key)
    result = run_cli("verify-merge", "--base", "no-such-org/no-such-model", "--adapter", adapter, "--merged", missing)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


SHIPPED = [
    ("tiny-llama", "tiny-llama-lora"),
    ("tiny-llama", "tiny-llama-multi/second"),  # rsLoRA
    ("tiny-llama", "tiny-llama-dora"),
    ("tiny-bert", "tiny-bert-classifier"),  # a classifier head as a full copy
    ("tiny-bert", "tiny-bert-lorabias"),
    ("tiny-llama-tied", "tiny-llama-tied-lora"),  # a full copy of a tied head: the merge unties it
]


@pytest.mark.parametrize("base,adapter", SHIPPED, ids=[a for _, a in SHIPPED])
def test_adapterfmt_merges_of_shipped_adapters_pass(tmp_path: Path, base: str, adapter: str) -> None:
    import adapterfmt

    b, a = REPO / "testdata" / base, REPO / "testdata" / adapter
    adapterfmt.merge_to_directory(b, a, tmp_path / "m")
    report = verify_merge(b, a, tmp_path / "m")
    assert report.ok, report.failures
    assert report.counts()["merge"] > 0


def test_merged_to_another_dtype_passes(tmp_path: Path) -> None:
    import adapterfmt

    b, a = REPO / "testdata" / "tiny-llama", REPO / "testdata" / "tiny-llama-lora"
    adapterfmt.merge_to_directory(b, a, tmp_path / "m", dtype="fp32")
    report = verify_merge(b, a, tmp_path / "m")
    assert report.ok and report.dtype == "F32" and report.counts()["convert"] > 0


@pytest.mark.parametrize("adapter", ["tiny-llama-dora", "tiny-bert-lorabias"])
def test_peft_merges_of_dora_and_lora_bias_pass(tmp_path: Path, adapter: str) -> None:
    base = "tiny-bert" if "bert" in adapter else "tiny-llama"
    b, a = REPO / "testdata" / base, REPO / "testdata" / adapter
    auto = transformers.AutoModelForSequenceClassification if "bert" in base else transformers.AutoModelForCausalLM
    model = PeftModel.from_pretrained(auto.from_pretrained(str(b)), str(a)).merge_and_unload()
    model.save_pretrained(str(tmp_path / "m"))
    report = verify_merge(b, a, tmp_path / "m")
    assert report.ok, report.failures


def test_stored_tied_head_checked_against_its_embedding(tmp_path: Path) -> None:
    base, load = _base(tmp_path, dtype=torch.float32, tied=True)
    adapter = _adapter(tmp_path, load, "lora", target_modules=["q_proj"])
    right = _peft(load, adapter)
    both = {**right, "lm_head.weight": right["model.embed_tokens.weight"].clone()}
    assert verify_merge(base, adapter, _save(tmp_path, "both", base, both)).ok
    both["lm_head.weight"] = both["lm_head.weight"] + 1.0
    assert _verdicts(verify_merge(base, adapter, _save(tmp_path, "off", base, both))) == {"lm_head.weight": "changed"}


def test_other_rounding_fails_exact_and_passes_ulp(tmp_path: Path) -> None:
    base, load = _base(tmp_path, dtype=torch.bfloat16)
    adapter = _adapter(tmp_path, load, "lora")
    exact = {k: v.float() for k, v in load().state_dict().items()}  # bf16 values, held exactly in fp32
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    r = {k: v.detach() for k, v in PeftModel.from_pretrained(fp32, str(adapter)).merge_and_unload().state_dict().items()}  # W + Δ unrounded
    other = {}
    for k, v in r.items():
        m = v.to(torch.bfloat16)
        if torch.equal(v, exact[k]):  # untouched
            other[k] = m
            continue
        # the bf16 neighbour on the other side of W + Δ: within one ulp, never PEFT's rounding
        up = (v > m.float()) == (m.float() >= 0)
        step = torch.where(v == m.float(), torch.zeros_like(up, dtype=torch.int16), torch.where(up, 1, -1).to(torch.int16))
        other[k] = (m.view(torch.int16) + step).view(torch.bfloat16)
    merged = _save(tmp_path, "other", base, other)
    strict = verify_merge(base, adapter, merged)
    assert set(_verdicts(strict).values()) == {"rounding"} and len(_verdicts(strict)) == 7
    loose = verify_merge(base, adapter, merged, tolerance="ulp")
    assert loose.ok and {t.path for t in loose.tensors if t.action == "merge"} == {"ulp"}
    assert all(t.worst_ulps <= 1.0 for t in loose.tensors if t.action == "merge")


@pytest.mark.parametrize("kind", ["loha", "lokr", "adalora"])
def test_peft_merges_of_other_methods_pass(tmp_path: Path, kind: str) -> None:
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig

    base, load = _base(tmp_path, dtype=torch.float32)
    targets = ["q_proj", "v_proj", "down_proj"]
    config = {
        "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
        "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
        "adalora": lambda: AdaLoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, total_step=10),
    }[kind]()
    torch.manual_seed(1)
    model = get_peft_model(load(), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n or "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path / kind))
    merged = PeftModel.from_pretrained(load(), str(tmp_path / kind)).merge_and_unload()
    merged.save_pretrained(str(tmp_path / "m"))
    report = verify_merge(base, tmp_path / kind, tmp_path / "m", tolerance="ulp")
    assert report.counts()["merge"] == 3
    if kind == "adalora":
        # PEFT's AdaLoRA delta is (P · s) / (ranknum + 1e-5), two roundings; adapterfmt's merge
        # multiplies by the one factor. A few float32 elements end up 2 ulp apart: reported, not hidden.
        assert all(t.verdict == "rounding" and t.max_error < 1e-6 for t in report.failures), report.failures
    else:
        assert report.ok, report.failures
    # and the same merge applied twice is caught
    twice = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    plain = load().state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    twice[key] = plain[key] + 2 * (twice[key] - plain[key])
    verdicts = _verdicts(verify_merge(base, tmp_path / kind, _save(tmp_path, "twice", base, twice), tolerance="ulp"))
    assert verdicts[key] == "applied-twice" and set(verdicts.values()) <= {"applied-twice", "rounding"}


def test_blocked_tensors_fast_path_and_a_difference_in_the_last_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights of 1024 × 1024 (two blocks of the merge kernel): PEFT's merge passes through the
    fast path (the merge kernel's bytes equal M's, no full check), and a merge whose only wrong
    element is in the last row, or that applied the delta twice, still gets its verdict from the
    full check."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=1024, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    base = tmp_path / "base"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(base))

    def load() -> torch.nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).eval()

    adapter = _adapter(tmp_path, load, "a", target_modules=["q_proj", "o_proj"])
    merged = _peft(load, adapter)
    fast: list[str] = []
    full: list[str] = []
    kernel_equal, paths = _Checker._merge_kernel_equal, _Checker._paths

    def spy_kernel(self, t, info):  # type: ignore[no-untyped-def]
        equal = kernel_equal(self, t, info)
        if equal:
            fast.append(t.key)
        return equal

    def spy_paths(self, t, *args):  # type: ignore[no-untyped-def]
        full.append(t.key)
        return paths(self, t, *args)

    monkeypatch.setattr(_Checker, "_merge_kernel_equal", spy_kernel)
    monkeypatch.setattr(_Checker, "_paths", spy_paths)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    report = verify_merge(base, adapter, _save(tmp_path, "right", base, merged))
    assert report.ok and {t.key: t.path for t in report.tensors if t.action == "merge"} == {q: "peft", o: "peft"}
    assert sorted(fast) == sorted([q, o]) and full == []
    fast.clear()
    off = dict(merged)
    off[q] = merged[q].clone()
    off[q][-1, -1] = _next_bf16(off[q][-1, -1])  # one ulp off, in the last block
    twice = dict(merged)
    twice[o] = _peft(load, adapter, factor=2.0)[o]
    report = verify_merge(base, adapter, _save(tmp_path, "off", base, {**off, o: twice[o]}))
    assert _verdicts(report) == {q: "rounding", o: "applied-twice"}
    assert fast == [] and sorted(full) == sorted([q, o])


def _next_bf16(x: torch.Tensor) -> torch.Tensor:
    """The bf16 number after ``x`` (one ulp up)."""
    bits = x.view(torch.int16) + (1 if float(x) >= 0 else -1)
    return bits.view(torch.bfloat16)
