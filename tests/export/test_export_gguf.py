"""``export --for llama.cpp`` against llama.cpp's own converter and PEFT.

The converter (``convert_lora_to_gguf.py`` of the llama-cpp-python 0.3.36 sdist, with its
``conversion/`` package and gguf-py 0.19.0, run offline on the base's config.json) writes the
expected file; ours must hold the same metadata and the same tensors (names, order, types,
shapes, bytes). Where the adapter uses what llama.cpp ignores (rsLoRA, alpha_pattern), the
converter's file would be wrong, so the oracle is PEFT's delta against the delta llama.cpp
computes from ours (its scale rule alpha / rank of lora_b, the RoPE permutation undone).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _export_helpers as h  # noqa: E402
from _serving_oracles import llama_cpp_convert_many, read_gguf  # noqa: E402
from conftest import assert_one_error_line  # noqa: E402


def _same_gguf(mine: Path, theirs: Path) -> None:
    kv_a, t_a = read_gguf(str(mine))
    kv_b, t_b = read_gguf(str(theirs))
    assert kv_a == kv_b
    assert list(t_a) == list(t_b)
    for name in t_a:
        (ta, sa, da), (tb, sb, db) = t_a[name], t_b[name]
        assert (ta, sa) == (tb, sb), name
        assert da.tobytes() == db.tobytes(), name


ARCH_CASES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
OUTTYPES = ["f32", "f16", "bf16", "q8_0"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path, str]]:
    """Every case converted by llama.cpp's converter in one process: case -> (adapter, base, its gguf, outtype)."""
    root = tmp_path_factory.mktemp("gguf-oracle")
    cases: dict[str, tuple[Path, Path, Path, str]] = {}
    for arch in ARCH_CASES:
        folder = root / arch
        base, model = h.make_base(folder, arch)
        adapter = h.make_adapter(folder, model, arch)
        cases[arch] = (adapter, base, folder / "theirs.gguf", "f32")
    base, adapter = h.make_mixtral(root)
    for outtype in OUTTYPES:
        cases[f"mixtral-{outtype}"] = (adapter, base, root / f"theirs-{outtype}.gguf", outtype)
    codes = llama_cpp_convert_many([(str(a), str(b), str(o), t) for a, b, o, t in cases.values()])
    assert codes == [0] * len(cases), dict(zip(cases, codes))
    return cases


@pytest.mark.parametrize("case", ARCH_CASES + [f"mixtral-{t}" for t in OUTTYPES])
def test_gguf_equals_llama_cpp_converter(tmp_path: Path, case: str, converted, run_cli) -> None:
    """llama, mistral, qwen2, qwen3, gemma, phi3 (f32), and mixtral's stacked experts in every --outtype."""
    adapter, base, theirs, outtype = converted[case]
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", base, "-o", tmp_path / "mine.gguf", "--outtype", outtype)
    assert result.exit_code == 0, result.stderr
    _same_gguf(tmp_path / "mine.gguf", theirs)
    if case.startswith("mixtral"):
        _, tensors = read_gguf(str(tmp_path / "mine.gguf"))
        assert tensors["blk.0.ffn_gate_exps.weight.lora_a"][1] == (64, 4, 2)  # 2 experts stacked (gguf-py lists dims reversed)
        if outtype == "q8_0":  # lora_a rows (64) quantize; lora_b rows (rank 4) fall back to f16, as the converter does
            assert tensors["blk.0.ffn_gate_exps.weight.lora_a"][0] == "Q8_0"
            assert tensors["blk.0.ffn_gate_exps.weight.lora_b"][0] == "F16"


def _unpermute(b: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``LlamaModel.permute`` on rows."""
    return b.reshape(heads, b.shape[0] // heads // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def test_gguf_deltas_equal_peft_with_rslora_and_alpha_pattern(tmp_path: Path, run_cli) -> None:
    """rsLoRA and alpha_pattern, which llama.cpp ignores, are folded into lora_b: the delta llama.cpp
    computes (alpha / rank of lora_b, permutation undone) equals PEFT's."""
    from peft import PeftModel

    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama", r=8, lora_alpha=12, use_rslora=True, alpha_pattern={"down_proj": 5}, rank_pattern={"o_proj": 4})
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", base, "-o", tmp_path / "a.gguf", "--json")
    assert result.exit_code == 0, result.stderr
    kv, tensors = read_gguf(str(tmp_path / "a.gguf"))
    alpha = kv["adapter.lora.alpha"]
    peft_model = PeftModel.from_pretrained(model, adapter)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    heads = {"attn_q": 4, "attn_k": 2}
    checked = 0
    for layer in range(2):
        for hf, gg in names.items():
            lora = peft_model.base_model.model.model.layers[layer].get_submodule(hf)
            expected = lora.get_delta_weight("default").float()
            a = torch.from_numpy(np.array(tensors[f"blk.{layer}.{gg}.weight.lora_a"][2], dtype=np.float32))
            b = torch.from_numpy(np.array(tensors[f"blk.{layer}.{gg}.weight.lora_b"][2], dtype=np.float32))
            if gg in heads:
                b = _unpermute(b, heads[gg])
            delta = (alpha / b.shape[1]) * (b @ a)  # llama.cpp: scale = alpha / rank, rank from lora_b
            torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
            checked += 1
    emb = peft_model.base_model.model.model.embed_tokens
    expected = emb.get_delta_weight("default").float()  # (vocab, dim)
    a = torch.from_numpy(np.array(tensors["token_embd.weight.lora_a"][2], dtype=np.float32))  # (vocab, r): transposed
    b = torch.from_numpy(np.array(tensors["token_embd.weight.lora_b"][2], dtype=np.float32))  # (dim, r)
    torch.testing.assert_close((alpha / b.shape[1]) * (a @ b.T), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert checked == 14


def test_gguf_unknown_architecture_is_named(tmp_path: Path, run_cli) -> None:
    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama")
    import json

    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", base, "-o", tmp_path / "a.gguf")
    assert_one_error_line(result, "FancyNewForCausalLM")
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_base_config_of_another_size_is_refused(tmp_path: Path, run_cli) -> None:
    import transformers

    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama")
    other = tmp_path / "other"
    cfg = transformers.LlamaConfig(**{**h.SMALL, "hidden_size": 128})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(other)
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", other, "-o", tmp_path / "a.gguf")
    assert_one_error_line(result, "hidden_size 128")
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_hub_base_offline_is_one_line(tmp_path: Path, run_cli) -> None:
    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama")
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", "someone/not-cached-model", "-o", tmp_path / "a.gguf")
    assert_one_error_line(result, "someone/not-cached-model", "HF_HUB_OFFLINE")
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_without_gguf_py_names_the_extra(tmp_path: Path, run_cli, monkeypatch) -> None:
    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama")
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` meets when it is not installed
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", base, "-o", tmp_path / "a.gguf")
    assert_one_error_line(result, "pip install 'adapterfmt[gguf]'")


def test_gguf_full_copies_need_a_serving_base(tmp_path: Path, run_cli) -> None:
    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama", modules_to_save=["lm_head"])
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", base, "-o", tmp_path / "a.gguf")
    assert_one_error_line(result, "lm_head", "--base-out")
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_lora_on_a_tied_head_needs_a_serving_base(tmp_path: Path, run_cli) -> None:
    """llama.cpp #9065: a tied base has no output tensor, so an lm_head LoRA cannot load there."""
    import json

    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama", target_modules=["q_proj", "lm_head"])
    cfg = json.loads((base / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(cfg))
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", base, "-o", tmp_path / "a.gguf")
    assert_one_error_line(result, "lm_head", "tied", "--base-out")
    assert not (tmp_path / "a.gguf").exists()


def test_gguf_hub_base_reads_only_its_config_from_the_cache(tmp_path: Path) -> None:
    """A Hub id as --base: only config.json is read (here from a cache holding nothing else,
    offline). The file equals the converter's run on that snapshot folder, except general.name,
    which is the Hub id, as the converter's own --base-model-id names it (that option itself
    cannot run offline: it looks for the base's safetensors on the Hub)."""
    import os
    import shutil
    import subprocess

    from _serving_oracles import llama_cpp_convert_many

    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama", target_modules=["q_proj", "k_proj", "down_proj"])
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--user--tiny-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(base / "config.json", snapshot / "config.json")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HOME": str(tmp_path / "hf" / "home"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "adapterfmt_cli.main", "export", "--adapter", str(adapter), "--for", "llama.cpp", "--base", "user/tiny-base", "-o", str(tmp_path / "mine.gguf")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert llama_cpp_convert_many([(str(adapter), str(snapshot), str(tmp_path / "theirs.gguf"), "f32")]) == [0]
    kv_a, t_a = read_gguf(str(tmp_path / "mine.gguf"))
    kv_b, t_b = read_gguf(str(tmp_path / "theirs.gguf"))
    assert kv_a.pop("general.name") == "user/tiny-base" and kv_b.pop("general.name") == "Lora"  # the converter's: from the adapter folder's name
    assert kv_a == kv_b
    assert {k: (v[0], v[1], v[2].tobytes()) for k, v in t_a.items()} == {k: (v[0], v[1], v[2].tobytes()) for k, v in t_b.items()}
