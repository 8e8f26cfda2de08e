"""Hub ids, served from a Hugging Face cache directory the test builds (``HF_HUB_OFFLINE=1``).

The cache has huggingface_hub's layout: ``models--<user>--<name>/refs/main`` holds a commit
hash, ``snapshots/<hash>/`` the files. Each run is a fresh process, because huggingface_hub
reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` when it is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TESTDATA

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, source: Path) -> None:
    """Put ``source``'s files into ``cache`` as the snapshot of ``repo_id`` at ``main``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, repo / "snapshots" / COMMIT)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    cache_repo(cache, "user/tiny-llama-lora", TESTDATA / "tiny-llama-lora")
    cache_repo(cache, "user/tiny-llama-multi", TESTDATA / "tiny-llama-multi")
    cache_repo(cache, "user/tiny-llama", TESTDATA / "tiny-llama")
    return cache


def adapterfmt(cache: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(cache.parent / "home"),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("ADAPTERFMT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "adapterfmt_cli.main", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_inspect_hub_id(hub_cache, tmp_path):
    result = adapterfmt(hub_cache, "inspect", "user/tiny-llama-lora", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["source"] == "user/tiny-llama-lora"
    assert doc["totals"]["adapter_modules"] == 14 and doc["totals"]["full_copies"] == 1
    assert doc["config"]["directory"].startswith(str(hub_cache))


def test_inspect_hub_sub_adapter(hub_cache, tmp_path):
    result = adapterfmt(hub_cache, "inspect", "user/tiny-llama-multi", "--subfolder", "second", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["config"]["name"] == "second" and doc["totals"]["adapter_modules"] == 4


def test_check_with_base_and_adapter_from_the_hub(hub_cache, tmp_path):
    result = adapterfmt(hub_cache, "check", "--base", "user/tiny-llama", "--adapter", "user/tiny-llama-lora", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "14/14 LoRA targets and 1/1 full copies resolved: ok"


def test_uncached_hub_id_offline_is_one_error_line(hub_cache, tmp_path):
    result = adapterfmt(hub_cache, "inspect", "user/not-cached", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("Error: user/not-cached: ") and "HF_HUB_OFFLINE" in lines[0]
