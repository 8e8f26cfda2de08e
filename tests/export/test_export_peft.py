"""``export --for vllm|sglang|portable`` against vLLM's own validation and PEFT.

Oracles: vLLM 0.33.0's ``PEFTHelper`` (config validation and the per-module scale vLLM applies)
and ``parse_fine_tuned_lora_name`` (tensor names), run from the wheel's source
(tests/_serving_oracles.py); PEFT 0.21 for the deltas and the logits of serving base + exported
adapter against base + original adapter (float32).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _export_helpers as h  # noqa: E402
from _serving_oracles import vllm_accepts, vllm_peft_helper  # noqa: E402
from conftest import REPO, assert_one_error_line  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])


def _factors(adapter: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(adapter / "adapter_model.safetensors").items():
        for slot in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            tag = f".{slot}"
            if tag in key:
                module = key.split(tag)[0].removeprefix("base_model.model.")
                out.setdefault(module, {})[slot[-1]] = t.float()
    return out


def _peft_deltas(model, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter)
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}) or "default" in getattr(module, "lora_embedding_A", {}):
            d = module.get_delta_weight("default").float()
            deltas[name] = d.T if "embed" in name else d
    peft_model.unload()
    return deltas


@pytest.fixture(scope="module")
def patterned(tmp_path_factory: pytest.TempPathFactory):
    """A float32 tiny llama and an rsLoRA adapter with rank_pattern and alpha_pattern (every engine reads it differently)."""
    root = tmp_path_factory.mktemp("patterned")
    base, model = h.make_base(root, "llama")
    adapter = h.make_adapter(
        root, model, "llama", r=8, lora_alpha=12, use_rslora=True, rank_pattern={"o_proj": 4}, alpha_pattern={"down_proj": 5},
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return root, base, model, adapter


def _engine_delta(engine: str, config: dict, module: str, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """The delta the engine computes from an exported module: vLLM's scale from its own PEFTHelper;
    SGLang's lora_alpha / r."""
    b_a = f["B"] @ f["A"]
    if engine in ("vllm", "portable"):
        helper = vllm_peft_helper().from_dict(dict(config))
        _, scale = helper.get_rank_and_scaling(module)
        return scale * b_a
    return (config["lora_alpha"] / config["r"]) * b_a


@pytest.mark.parametrize("engine", ["vllm", "sglang", "portable"])
def test_engine_computes_peft_deltas(tmp_path: Path, engine: str, patterned, run_cli) -> None:
    root, base, model, adapter = patterned
    out = tmp_path / engine
    result = run_cli("export", "--adapter", adapter, "--for", engine, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    if engine in ("vllm", "portable"):
        vllm_accepts(str(out), max_lora_rank=report["max_lora_rank"])
    config = json.loads((out / "adapter_config.json").read_text())
    expected = _peft_deltas(model, adapter)
    got = _factors(out)
    assert set(got) == set(expected)
    for module, f in got.items():
        torch.testing.assert_close(_engine_delta(engine, config, module, f), expected[module], rtol=1e-5, atol=1e-6 * float(expected[module].abs().max()))
    if engine == "vllm":
        assert report["folded"] == [] and report["exactness"] == "bit-exact"
    else:  # rsLoRA scale 12/sqrt(8) is not a power of two: folded in float32
        assert report["folded"] and report["exactness"] == "float32"
    if engine == "portable":  # one rank, the scale in the factors
        assert config["r"] == config["lora_alpha"] == 8 and "rank_pattern" not in config
        assert {f["A"].shape[0] for f in got.values()} == {8}


def test_power_of_two_fold_is_bit_exact(tmp_path: Path, patterned, run_cli) -> None:
    from safetensors.torch import load_file

    root, base, model, _ = patterned
    adapter = h.make_adapter(tmp_path, model, "llama", r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])  # scale 4
    result = run_cli("export", "--adapter", adapter, "--for", "portable", "-o", tmp_path / "p", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["exactness"] == "bit-exact" and {f["factor"] for f in report["folded"]} == {4.0}
    src, dst = load_file(adapter / "adapter_model.safetensors"), load_file(tmp_path / "p" / "adapter_model.safetensors")
    for key, t in src.items():
        assert torch.equal(dst[key], t * 4 if ".lora_B." in key else t), key
    vllm_accepts(str(tmp_path / "p"), max_lora_rank=8)


@pytest.mark.parametrize("engine", ["vllm", "portable", "sglang"])
def test_serving_base_plus_adapter_gives_peft_logits(tmp_path: Path, engine: str, run_cli) -> None:
    """DoRA modules and a full lm_head copy (which no engine serves) go into the serving base; the
    rest stays in the adapter; PEFT on serving base + exported adapter gives the original's logits."""
    base, model = h.make_base(tmp_path, "llama")
    dora = h.make_adapter(tmp_path, model, "llama", "dora", r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    expected = h.peft_logits(base, dora, IDS)
    out, serving = tmp_path / "out", tmp_path / "serving"
    refused = run_cli("export", "--adapter", dora, "--for", engine, "-o", out)
    assert_one_error_line(refused, "DoRA", "lm_head", "--base-out")
    assert not out.exists()
    result = run_cli("export", "--adapter", dora, "--for", engine, "-o", out, "--base", base, "--base-out", serving, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["baked"]["full_copies"] == ["lm_head"] and len(report["baked"]["modules"]) == 4
    if engine != "sglang":
        vllm_accepts(str(out), max_lora_rank=report["max_lora_rank"])
    got = h.peft_logits(serving, out, IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_lora_bias_and_trainable_tokens_go_into_the_serving_base(tmp_path: Path, run_cli) -> None:
    base, model = h.make_base(tmp_path, "qwen2")  # q/k/v have biases for lora_bias to add to
    adapter = h.make_adapter(
        tmp_path, model, "qwen2", r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": [3, 7]}
    )
    expected = h.peft_logits(base, adapter, IDS)
    result = run_cli("export", "--adapter", adapter, "--for", "vllm", "-o", tmp_path / "out", "--base", base, "--base-out", tmp_path / "serving", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["baked"]["trainable_tokens"] == ["model.embed_tokens"]
    vllm_accepts(str(tmp_path / "out"), max_lora_rank=report["max_lora_rank"])
    got = h.peft_logits(tmp_path / "serving", tmp_path / "out", IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_rank_above_max_lora_rank_is_refused(tmp_path: Path, patterned, run_cli) -> None:
    _, _, model, _ = patterned
    adapter = h.make_adapter(tmp_path, model, "llama", r=16, lora_alpha=16, target_modules=["q_proj"])
    result = run_cli("export", "--adapter", adapter, "--for", "vllm", "-o", tmp_path / "out", "--max-lora-rank", "8")
    assert_one_error_line(result, "rank 16", "--max-lora-rank 8")
    assert not (tmp_path / "out").exists()
    result = run_cli("export", "--adapter", adapter, "--for", "vllm", "-o", tmp_path / "out", "--max-lora-rank", "12")
    assert_one_error_line(result, "12", "320")


@pytest.mark.parametrize(
    "field, value, named",
    [("alora_invocation_tokens", [5, 6], "aLoRA"), ("init_lora_weights", "pissa", "path_initial_model_for_weight_conversion"), ("layer_replication", [[0, 2]], "layer_replication")],
)
def test_what_nothing_serves_is_one_line(tmp_path: Path, patterned, run_cli, field, value, named) -> None:
    _, _, model, _ = patterned
    adapter = h.make_adapter(tmp_path, model, "llama", r=4, target_modules=["q_proj"])
    h.edit_config(adapter, **{field: value})
    result = run_cli("export", "--adapter", adapter, "--for", "portable", "-o", tmp_path / "out")
    assert_one_error_line(result, field, named)
    assert not (tmp_path / "out").exists()


def test_serving_report(tmp_path: Path, patterned) -> None:
    from adapterfmt import read_adapter
    from adapterfmt.export.serving import serving_report

    _, _, _, rslora = patterned
    report = serving_report(read_adapter(rslora))
    assert report["vllm"]["accepted"] and report["vllm"]["fix_command"] is None
    assert not report["sglang"]["accepted"] and "rsLoRA" in report["sglang"]["blockers"][0]
    assert "--for sglang" in report["sglang"]["fix_command"] and "--base-out" not in report["sglang"]["fix_command"]
    assert not report["llama.cpp"]["accepted"] and "--for llama.cpp" in report["llama.cpp"]["fix_command"]
    full = serving_report(read_adapter(REPO / "testdata" / "tiny-llama-lora"))
    assert not full["vllm"]["accepted"] and "lm_head" in full["vllm"]["blockers"][0]
    assert "--base-out" in full["vllm"]["fix_command"]
    # as vLLM itself says: it refuses the original
    with pytest.raises(ValueError, match="modules_to_save"):
        vllm_accepts(str(REPO / "testdata" / "tiny-llama-lora"), max_lora_rank=16)
    dora = serving_report(read_adapter(REPO / "testdata" / "tiny-llama-dora"))
    assert all(not r["accepted"] for r in dora.values())
    import jsonschema

    schema = json.loads((REPO / "docs" / "schemas" / "serving.schema.json").read_text())
    for doc in (report, full, dora):
        jsonschema.validate(json.loads(json.dumps(doc)), schema)


def test_serving_report_reads_headers_only() -> None:
    code = (
        "import sys; from adapterfmt import read_adapter; from adapterfmt.export.serving import serving_report;"
        f"serving_report(read_adapter({str(REPO / 'testdata' / 'tiny-llama-lora')!r})); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_export_json_matches_its_schema(tmp_path: Path, run_cli) -> None:
    import jsonschema

    schema = json.loads((REPO / "docs" / "schemas" / "export.schema.json").read_text())
    result = run_cli(
        "export", "--adapter", REPO / "testdata" / "tiny-llama-lora", "--for", "sglang", "-o", tmp_path / "out",
        "--base", REPO / "testdata" / "tiny-llama", "--base-out", tmp_path / "serving", "--json",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schema)
    assert doc["serving_base"] == str(tmp_path / "serving") and doc["blockers"]
    assert math.isfinite(doc["rank"])
    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama", r=4, target_modules=["q_proj"])
    result = run_cli("export", "--adapter", adapter, "--for", "llama.cpp", "--base", base, "-o", tmp_path / "a.gguf", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    jsonschema.validate(doc, schema)
    assert doc["gguf"]["architecture"] == "llama"


def test_portable_bakes_embedding_lora_and_drops_base_layer_copies(tmp_path: Path, run_cli) -> None:
    """An embedding LoRA (which TGI and TensorRT-LLM do not serve) goes into the serving base;
    PEFT's base_layer copy of the embedding (save_embedding_layers) is dropped."""
    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    expected = h.peft_logits(base, adapter, IDS)
    result = run_cli("export", "--adapter", adapter, "--for", "portable", "-o", tmp_path / "out", "--base", base, "--base-out", tmp_path / "serving", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [m["module"] for m in report["baked"]["modules"]] == ["model.embed_tokens"]
    assert report["dropped"] == ["base_model.model.model.embed_tokens.base_layer.weight"]
    vllm_accepts(str(tmp_path / "out"), max_lora_rank=report["max_lora_rank"])
    got = h.peft_logits(tmp_path / "serving", tmp_path / "out", IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_both_outputs_or_neither(tmp_path: Path, run_cli, monkeypatch) -> None:
    """Interrupted while the adapter is staged, after the serving base was renamed into place: the
    serving base is removed again and no stage is left."""
    from adapterfmt.storage import pause

    starts = []

    def hook(point: str) -> None:
        if point == "start":
            starts.append(point)
            if len(starts) == 2:  # the merge's stage was the first; the adapter's is the second
                raise KeyboardInterrupt

    monkeypatch.setattr(pause, "pause_hook", hook)
    testdata = REPO / "testdata"
    result = run_cli("export", "--adapter", testdata / "tiny-llama-lora", "--for", "vllm", "-o", tmp_path / "out", "--base", testdata / "tiny-llama", "--base-out", tmp_path / "serving")
    assert result.exit_code != 0 and len(starts) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_saved_base_biases_go_into_the_serving_base(tmp_path: Path, run_cli) -> None:
    """bias="lora_only": PEFT saves (and trains) the adapted modules' base biases; vLLM refuses
    `bias != "none"`, so they are merged into the serving base and the config says "none"."""
    import copy

    base, model = h.make_base(tmp_path, "qwen2")
    changed = copy.deepcopy(model)
    adapter = h.make_adapter(tmp_path, changed, "qwen2", r=4, lora_alpha=8, bias="lora_only", target_modules=["q_proj", "k_proj"])
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    biases = [k for k in tensors if k.endswith(".base_layer.bias")]
    assert biases
    for k in biases:  # trained biases: not the base's values
        tensors[k] = tensors[k] + 0.5
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    expected = h.peft_logits(base, adapter, IDS)
    refused = run_cli("export", "--adapter", adapter, "--for", "vllm", "-o", tmp_path / "out")
    assert_one_error_line(refused, "saved base tensors", "--base-out")
    result = run_cli("export", "--adapter", adapter, "--for", "vllm", "-o", tmp_path / "out", "--base", base, "--base-out", tmp_path / "serving", "--json")
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["baked"]["base_tensors"]) == len(biases)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["bias"] == "none"
    vllm_accepts(str(tmp_path / "out"), max_lora_rank=8)
    got = h.peft_logits(tmp_path / "serving", tmp_path / "out", IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_a_base_layer_copy_that_differs_from_the_base_is_baked(tmp_path: Path, run_cli) -> None:
    """A saved embedding copy with values other than the base's (new token rows trained) is not
    dropped when the base is at hand: it goes into the serving base."""
    from safetensors.torch import load_file, save_file

    base, model = h.make_base(tmp_path, "llama")
    adapter = h.make_adapter(tmp_path, model, "llama", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key][100:] += 0.25
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    expected = h.peft_logits(base, adapter, IDS)
    result = run_cli("export", "--adapter", adapter, "--for", "vllm", "-o", tmp_path / "out", "--base", base, "--base-out", tmp_path / "serving", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["baked"]["base_tensors"] == ["model.embed_tokens.weight"] and report["dropped"] == []
    vllm_accepts(str(tmp_path / "out"), max_lora_rank=report["max_lora_rank"])
    got = h.peft_logits(tmp_path / "serving", tmp_path / "out", IDS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
