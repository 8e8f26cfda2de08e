"""Merge refusals, output layout options and output safety: nothing half-written, inputs untouched.

Parity of the merged values with PEFT is in test_merge_parity.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import adapterfmt
from adapterfmt.storage import os_calls
from adapterfmt.errors import (
    DiskSpaceError,
    MergeError,
    NonFiniteValuesError,
    OutputPathError,
    ShapeMismatchError,
    UnresolvedModulesError,
    UnsupportedFeatureError,
)
from adapterfmt.checkpoint.findings import Finding
from adapterfmt.storage.header import read_header
from adapterfmt_cli.main import cli

from _hardening_helpers import PAUSE_CLI
from _portable import staging_leftovers
from _merge_helpers import lora_pair, read_dir, tree_digest, unequal, write_adapter

TESTDATA = Path(__file__).resolve().parents[2] / "testdata"
LORA = TESTDATA / "tiny-llama-lora"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A private copy of the sharded bf16 tiny Llama (tests here aim outputs at and around it)."""
    return Path(shutil.copytree(TESTDATA / "tiny-llama", tmp_path / "base"))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p for p in os.listdir(directory) if ".adapterfmt-" in p)


def test_unresolved_module_stops_before_anything_is_written(tmp_path: Path, base: Path) -> None:
    adapter = Path(shutil.copytree(LORA, tmp_path / "adapter"))
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors.update(lora_pair("model.layers.9.self_attn.q_proj", 64, 64))
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "merged"
    with pytest.raises(UnresolvedModulesError) as info:
        adapterfmt.merge_to_directory(base, adapter, out)
    assert info.value.unresolved == ["model.layers.9.self_attn.q_proj"]
    assert "'model.layers.9.self_attn.q_proj'" in str(info.value) and "--allow-unused" in str(info.value)
    assert not out.exists() and _leftovers(tmp_path) == []

    summary = adapterfmt.merge_to_directory(base, adapter, out, allow_unused=True)
    assert summary.skipped == ["model.layers.9.self_attn.q_proj"]
    assert unequal(read_dir(out), adapterfmt.merge_state_dict(read_dir(base), LORA)) == []


def test_non_finite_lora_values_are_refused_and_nothing_is_left(tmp_path: Path, base: Path) -> None:
    adapter = Path(shutil.copytree(LORA, tmp_path / "adapter"))
    from safetensors.torch import load_file

    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteValuesError) as info:
        adapterfmt.merge_to_directory(base, adapter, tmp_path / "merged")
    assert info.value.key == key and info.value.path.endswith("adapter_model.safetensors")
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "change, error",
    [
        ({"layer_replication": [[0, 1]]}, UnsupportedFeatureError),
        ({"init_lora_weights": "pissa"}, UnsupportedFeatureError),
    ],
)
def test_unsupported_config_is_refused(tmp_path: Path, base: Path, change: dict, error: type) -> None:
    adapter = Path(shutil.copytree(LORA, tmp_path / "adapter"))
    doc = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**doc, **change}))
    with pytest.raises(error, match=next(iter(change))):
        adapterfmt.merge_to_directory(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_conflicting_adapters_are_refused(tmp_path: Path, base: Path) -> None:
    with pytest.raises(MergeError, match="both replace"):
        adapterfmt.merge_to_directory(base, [LORA, LORA], tmp_path / "a")
    # A full copy of lm_head in one adapter and a LoRA on it in another.
    lora_head = write_adapter(tmp_path / "head", lora_pair("lm_head", 256, 64), target_modules=["lm_head"])
    with pytest.raises(MergeError, match="modules_to_save"):
        adapterfmt.merge_to_directory(base, [LORA, lora_head], tmp_path / "b")
    with pytest.raises(MergeError, match="weights for 1 adapters"):
        adapterfmt.merge_to_directory(base, LORA, tmp_path / "c", weights=[0.5, 0.5])
    with pytest.raises(MergeError, match="not a finite number"):
        adapterfmt.merge_to_directory(base, LORA, tmp_path / "d", weights=[float("nan")])
    with pytest.raises(MergeError, match="DoRA modules"):
        adapterfmt.merge_to_directory(base, [LORA, TESTDATA / "tiny-llama-dora"], tmp_path / "e", weights=[1.0, 0.5])
    assert _leftovers(tmp_path) == [] and not any((tmp_path / n).exists() for n in "abcde")


def test_overlapping_token_rows_conv_groups_and_integer_bases_are_refused(tmp_path: Path) -> None:
    emb = torch.randn(10, 4)
    base = tmp_path / "base"
    base.mkdir()
    save_file({"embed.weight": emb, "conv.weight": torch.randn(8, 2, 3, 3), "q.weight": torch.ones(4, 4, dtype=torch.int8)}, str(base / "model.safetensors"))
    rows = {"base_model.model.embed.token_adapter.trainable_tokens_delta": torch.randn(2, 4)}
    tokens = write_adapter(tmp_path / "tokens", rows, target_modules=["q"], trainable_token_indices=[1, 3])
    with pytest.raises(MergeError, match="token row 1"):
        adapterfmt.merge_state_dict({"embed.weight": emb}, [tokens, tokens])
    groups = {"base_model.model.conv.lora_A.weight": torch.randn(4, 2, 3, 3), "base_model.model.conv.lora_B.weight": torch.randn(8, 1, 1, 1)}
    with pytest.raises(ShapeMismatchError, match="groups > 1"):
        adapterfmt.merge_to_directory(base, write_adapter(tmp_path / "groups", groups, target_modules=["conv"]), tmp_path / "out")
    quantized = write_adapter(tmp_path / "int", lora_pair("q", 4, 4), target_modules=["q"])
    with pytest.raises(UnsupportedFeatureError, match="I8"):
        adapterfmt.merge_to_directory(base, quantized, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_paths_inside_or_around_inputs_are_refused(tmp_path: Path, base: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(base)
    before = tree_digest(base)
    for out, why in [
        (base, "is inside the input"),
        (base / "merged", "is inside the input"),
        (link / "merged", "is inside the input"),  # same place through a symlink
        (tmp_path / "adapter" / ".." / "base" / "x", "is inside the input"),
        (tmp_path, "contains the input"),
    ]:
        with pytest.raises(OutputPathError, match=why):
            adapterfmt.merge_to_directory(base, LORA, out, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="not a directory"):
        adapterfmt.merge_to_directory(base, LORA, tmp_path / "file")
    assert tree_digest(base) == before and sorted(os.listdir(base)) == sorted(os.listdir(TESTDATA / "tiny-llama"))


def test_non_empty_output_needs_overwrite_which_replaces_it_whole(tmp_path: Path, base: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    with pytest.raises(OutputPathError, match="not empty"):
        adapterfmt.merge_to_directory(base, LORA, out)
    assert (out / "old.txt").exists()
    adapterfmt.merge_to_directory(base, LORA, out, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors.index.json").exists()
    assert _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    adapterfmt.merge_to_directory(base, LORA, empty)  # an empty directory is fine without --overwrite
    assert unequal(read_dir(empty), read_dir(out)) == []


def test_max_shard_size_replans_with_the_hub_planner(tmp_path: Path, base: Path) -> None:
    reference = tmp_path / "reference"
    adapterfmt.merge_to_directory(base, LORA, reference)
    out = tmp_path / "resharded"
    summary = adapterfmt.merge_to_directory(base, LORA, out, max_shard_size="50KB", verify=True)
    shards = [f for f in summary.files if f.endswith(".safetensors")]
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)] and len(shards) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(read_dir(reference))
    assert index["metadata"]["total_size"] == sum(read_header(out / s).nbytes for s in shards)
    assert all(os.path.getsize(out / s) < 50_000 + 4096 for s in shards)
    assert unequal(read_dir(out), read_dir(reference)) == []
    single = tmp_path / "single"
    summary = adapterfmt.merge_to_directory(base, LORA, single, max_shard_size="1GB")
    assert [f for f in summary.files if f.endswith((".safetensors", ".json"))] == ["config.json", "generation_config.json", "model.safetensors"]


def test_free_space_is_checked_before_starting(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("adapterfmt.storage.staging.shutil.disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    with pytest.raises(DiskSpaceError, match=r"needs 1.[0-9] MB but only 5.0 KB is free"):
        adapterfmt.merge_to_directory(base, LORA, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


def test_running_out_of_space_mid_write_leaves_nothing(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from adapterfmt.storage.parallel_write import PlacedFile

    def full(self: PlacedFile, offset: int, data: object) -> None:
        if offset:  # the header goes in; the first tensor does not
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PlacedFile, "write", full)
    with pytest.raises(DiskSpaceError, match="ran out of space"):
        adapterfmt.merge_to_directory(base, LORA, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


def test_failed_verification_leaves_nothing(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("adapterfmt.reports.verify.verify_directory", lambda path: [Finding("total-size", "index: total_size is wrong")])
    with pytest.raises(MergeError, match="failed verification: index: total_size is wrong"):
        adapterfmt.merge_to_directory(base, LORA, tmp_path / "merged", verify=True)
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


def test_stale_staging_is_removed_and_a_live_one_refused(tmp_path: Path, base: Path) -> None:
    stale = tmp_path / ".merged.adapterfmt-tmp-99999999"
    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_bytes(b"half")
    summary = adapterfmt.merge_to_directory(base, LORA, tmp_path / "merged")
    assert summary.removed_stale == [str(stale)] and not stale.exists()

    live = tmp_path / ".other.adapterfmt-tmp-1"
    live.mkdir()
    lock = os_calls.lock_directory(str(live))  # as a live merge holds it (flock, or a lock file)
    try:
        with pytest.raises(OutputPathError, match="another adapterfmt merge"):
            adapterfmt.merge_to_directory(base, LORA, tmp_path / "other")
    finally:
        assert lock is not None
        lock.release()


def test_killed_merge_leaves_no_output_and_a_rerun_succeeds(tmp_path: Path, base: Path) -> None:
    out, marker = tmp_path / "merged", tmp_path / "paused"
    args = [sys.executable, str(PAUSE_CLI), "write:2", str(marker), "300", "cli", "merge", "--base", str(base), "--adapter", str(LORA), "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "write:2", proc.stderr.read().decode() if proc.poll() is not None else "timed out"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert _leftovers(tmp_path) == staging_leftovers(f".merged.adapterfmt-tmp-{proc.pid}")

    result = CliRunner().invoke(cli, ["merge", "--base", str(base), "--adapter", str(LORA), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["removed_stale"] == [str(tmp_path / f".merged.adapterfmt-tmp-{proc.pid}")]
    assert _leftovers(tmp_path) == []
    assert unequal(read_dir(out), adapterfmt.merge_state_dict(read_dir(base), LORA)) == []


def test_cli_json_summary_and_one_line_errors(tmp_path: Path, base: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "merged"
    result = runner.invoke(cli, ["merge", "--base", str(base), "--adapter", str(LORA), "-o", str(out), "--json", "--verify", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["tensors_merged"], doc["tensors_replaced"], doc["tensors_copied"], doc["tensors_converted"]) == (14, 1, 0, 6)
    assert doc["output"] == str(out) and "model.safetensors.index.json" in doc["files"] and doc["bytes_written"] > 0
    assert set(doc["timings"]) >= {"read", "compute", "write", "io_wait", "sync"}
    for args, message in [
        (["--weight", "1", "--weight", "2"], "2 weights for 1 adapters"),
        (["--max-shard-size", "lots"], "is not a size"),
    ]:
        result = runner.invoke(cli, ["merge", "--base", str(base), "--adapter", str(LORA), "-o", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    text = runner.invoke(cli, ["merge", "--base", str(base), "--adapter", str(LORA), "-o", str(tmp_path / "y"), "-q"])
    assert text.exit_code == 0 and "14 tensors merged, 1 replaced, 6 copied" in text.stdout and text.stderr == ""


def test_planning_reads_headers_only() -> None:
    code = (
        "import sys\n"
        "from adapterfmt import read_base, read_adapter\n"
        "from adapterfmt.merging.plan import plan_merge\n"
        f"plan = plan_merge(read_base({str(TESTDATA / 'tiny-llama')!r}), [read_adapter({str(LORA)!r})], max_shard_size='100KB')\n"
        "assert plan.count('merge') == 14 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_several_compute_workers_write_the_same_bytes(tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with more cores, tensors are computed concurrently; the files must not change."""
    one = tmp_path / "one"
    adapterfmt.merge_to_directory(base, LORA, one)
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    torch.set_num_threads(4)
    try:
        adapterfmt.merge_to_directory(base, LORA, tmp_path / "three", max_shard_size="60KB")
        adapterfmt.merge_to_directory(base, LORA, tmp_path / "same")
        assert torch.get_num_threads() == 4  # restored after the merge
    finally:
        torch.set_num_threads(threads)
    for name in os.listdir(one):
        assert (one / name).read_bytes() == (tmp_path / "same" / name).read_bytes(), name
    assert unequal(read_dir(tmp_path / "three"), read_dir(one)) == []


def _hub_snapshot(cache: Path, repo_id: str, source: Path) -> None:
    """``source`` as huggingface_hub caches it: snapshot files are symlinks to ``../../blobs``."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if f.is_file():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


def test_hub_ids_from_the_local_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    _hub_snapshot(cache, "user/tiny-llama", TESTDATA / "tiny-llama")
    _hub_snapshot(cache, "user/tiny-llama-lora", LORA)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "merged"
    args = [sys.executable, "-m", "adapterfmt_cli.main", "merge", "--base", "user/tiny-llama", "--adapter", "user/tiny-llama-lora", "-o", str(out), "--json"]
    result = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files"] == sorted(os.listdir(TESTDATA / "tiny-llama"))
    assert not any(os.path.islink(out / f) for f in os.listdir(out))  # files, not links into the cache
    local = tmp_path / "local"
    adapterfmt.merge_to_directory(TESTDATA / "tiny-llama", LORA, local)
    for name in os.listdir(local):
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
