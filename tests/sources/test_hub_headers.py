"""Hub bases read by range request: a fake Hub on 127.0.0.1 (``HF_ENDPOINT``) counts the bytes.

``check`` against a ~1 GB sharded base must transfer under 1 MB and download no weights; ``merge``
downloads through the cache, pinned to one commit; offline, the cache answers. Each command runs
in a fresh process, because huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` on import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _fake_hub import FakeHub, HubFile, hub_env, safetensors_file
from conftest import TESTDATA, write_adapter

LAYERS, WIDTH, RANK = 32, 4096, 8
SHA_MAIN = "1" * 40
SHA_OLD = "2" * 40
SHA_TINY = "3" * 40


def _big_repo() -> tuple[dict[str, HubFile], int]:
    """A Llama-shaped base: 32 q_proj weights of 4096x4096 F16 (1 GiB) in two shards, plus an index."""
    shards: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for i in range(LAYERS):
        name = f"model-0000{1 + i * 2 // LAYERS}-of-00002.safetensors"
        shards.setdefault(name, {})[f"model.layers.{i}.self_attn.q_proj.weight"] = ("F16", [WIDTH, WIDTH])
    shards["model-00002-of-00002.safetensors"]["model.norm.weight"] = ("F16", [WIDTH])
    files: dict[str, HubFile] = {name: safetensors_file(t) for name, t in shards.items()}
    total = sum(f.zeros for f in files.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, t in shards.items() for k in t}}
    files["model.safetensors.index.json"] = HubFile(json.dumps(index).encode())
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}
    files["config.json"] = HubFile(json.dumps(config).encode())
    files["tokenizer.json"] = HubFile(b"{}")
    return files, total


def _local_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub():
    files, total = _big_repo()
    with FakeHub() as fake:
        fake.add("user/big", files, sha=SHA_MAIN)
        # a weights file of another framework, which no merge downloads (the cached snapshot stays partial)
        fake.add("user/tiny", {**_local_files(TESTDATA / "tiny-llama"), "flax_model.msgpack": b"\x80"}, sha=SHA_TINY)
        old = dict(_local_files(TESTDATA / "tiny-llama"))
        old["config.json"] = json.dumps({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False, "old": True}).encode()
        fake.add("user/tiny", old, sha=SHA_OLD, refs=("v0",))
        fake.big_total = total  # type: ignore[attr-defined]
        yield fake


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    tensors = {}
    for i in range(LAYERS):
        prefix = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = ("F32", [RANK, WIDTH])
        tensors[f"{prefix}.lora_B.weight"] = ("F32", [WIDTH, RANK])
    return write_adapter(tmp_path_factory.mktemp("a") / "big-lora", tensors, {"r": RANK, "lora_alpha": 16, "target_modules": ["q_proj"]})


def run(hub: FakeHub, cache: Path, *args: str, offline: bool = False, code: str = "") -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "adapterfmt_cli.main", *args]
    return subprocess.run(argv, env=hub_env(hub, cache, offline=offline), capture_output=True, text=True, timeout=300, cwd=cache.parent)


_NO_TORCH = """
import os, sys
def report():
    print("TORCH LOADED" if "torch" in sys.modules else "NO TORCH", flush=True)
real_exit = os._exit
def exit_after_report(code):  # the console script may end by os._exit once its output is printed
    sys.stdout.flush()
    assert not code, code
    report()
    real_exit(code)
os._exit = exit_after_report
from adapterfmt_cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
report()
"""


def test_check_against_a_1gb_hub_base_reads_headers_only(hub, big_adapter, tmp_path, capsys):
    cache = tmp_path / "hub"
    hub.reset_count()
    result = run(hub, cache, "check", "--base", "user/big", "--adapter", str(big_adapter), code=_NO_TORCH)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"{LAYERS}/{LAYERS} LoRA targets")
    assert result.stdout.splitlines()[-1] == "NO TORCH"
    served = hub.bytes_served
    with capsys.disabled():
        print(f"\n[fake Hub] check against a {hub.big_total / 2**30:.2f} GiB base transferred {served} bytes "
              f"in {len(hub.requests)} requests")
    assert hub.big_total >= 2**30 and served < 1_000_000
    assert not [p for p in cache.rglob("*.safetensors")], "a header-only command downloaded weights"
    assert any("bytes=0-100000" in r for r in hub.requests)  # huggingface_hub's range request


@pytest.mark.parametrize(
    "args",
    [("targets", "--base", "user/big", "--target-modules", "q_proj"), ("inspect", "{adapter}", "--base", "user/big")],
    ids=["targets", "inspect-base"],
)
def test_other_header_only_commands_stay_small(hub, big_adapter, tmp_path, args):
    hub.reset_count()
    result = run(hub, tmp_path / "hub", *[a.format(adapter=big_adapter) for a in args])
    assert result.returncode == 0, result.stderr
    assert hub.bytes_served < 1_000_000 and not list((tmp_path / "hub").rglob("*.safetensors"))


_READ = """
import json, sys
from adapterfmt.base.reading import read_base
b = read_base(sys.argv[1], revision=sys.argv[2] or None, download=sys.argv[3] == "1")
print(json.dumps({"remote": b.remote, "directory": b.directory, "config": b.config, "shards": b.shards,
                  "n": len(b.tensors), "local": all(__import__("os").path.isfile(t.file) for t in b.tensors.values())}))
"""


def test_revision_is_honoured_and_pinned_to_its_commit(hub, tmp_path):
    hub.reset_count()
    result = run(hub, tmp_path / "hub", "user/tiny", "v0", "0", code=_READ)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["remote"] == f"user/tiny@{SHA_OLD}" and doc["config"].get("old") is True and not doc["local"]
    assert all(f"/resolve/{SHA_OLD}/" in r for r in hub.requests if "/resolve/" in r)


def test_merge_path_downloads_through_the_cache_and_offline_reads_it(hub, tmp_path):
    cache = tmp_path / "hub"
    result = run(hub, cache, "user/tiny", "", "1", code=_READ)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["remote"] is None and doc["local"] and doc["directory"].startswith(str(cache))
    assert len(doc["shards"]) == 3 and (Path(doc["directory"]) / "config.json").is_file()
    hub.reset_count()
    offline = run(hub, cache, "user/tiny", "", "0", offline=True, code=_READ)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["directory"] == doc["directory"] and hub.bytes_served == 0


@pytest.mark.parametrize(
    "base,extra,why", [("user/nothing", (), "no such Hub repo"), ("user/big", ("--base-revision", "v9"), "no such revision")], ids=["repo", "revision"]
)
def test_missing_repo_or_revision_is_one_error_line(hub, big_adapter, tmp_path, base, extra, why):
    result = run(hub, tmp_path / "hub", "check", "--base", base, *extra, "--adapter", str(big_adapter))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and base in lines[0] and why in lines[0], result.stderr


def test_merge_from_the_hub_equals_the_local_merge(hub, tmp_path):
    cache = tmp_path / "hub"
    out = tmp_path / "from-hub"
    result = run(hub, cache, "merge", "--base", "user/tiny", "--adapter", str(TESTDATA / "tiny-llama-lora"), "-o", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    local = tmp_path / "local"
    import adapterfmt

    adapterfmt.merge_to_directory(TESTDATA / "tiny-llama", TESTDATA / "tiny-llama-lora", local)
    assert _local_files(out) == _local_files(local)
    assert list(cache.rglob("model-00001-of-00003.safetensors"))  # the weights came through the cache


def test_pipeline_component_on_the_hub_by_range_request(hub, tmp_path):
    from peft import LoraConfig, get_peft_model

    from _layout_helpers import save_pipeline, tiny_unet

    pipe = save_pipeline(tmp_path / "pipe")
    hub.add("user/pipe", _local_files(pipe), sha="4" * 40)
    adapter = tmp_path / "unet-lora"
    get_peft_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q", "to_v"])).save_pretrained(str(adapter))
    cache = tmp_path / "hub"
    result = run(hub, cache, "check", "--base", "user/pipe", "--base-subfolder", "unet", "--adapter", str(adapter))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("8/8 LoRA targets")
    assert not list(cache.rglob("*.safetensors"))
    assert any("/resolve/" + "4" * 40 + "/unet/diffusion_pytorch_model.safetensors bytes=0-100000" in r for r in hub.requests)
