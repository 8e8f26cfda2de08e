"""mergekit 0.1.5's ``mergekit-extract-lora`` (a full SVD per module) as the oracle: on the same fine-tune
and rank, adapterfmt's error is never above mergekit's, module by module, both measured through
PEFT's merge of each adapter. mergekit is installed with ``pip install --no-deps`` (see DEVELOPERS.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterfmt.extraction.extract import extract_adapter

from _extract_models import FULL_RANK, LOW_RANK, _load, _peft_merge, make_models

RANK = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_models(tmp_path_factory)


def _mergekit(base: Path, tuned: Path, out: Path) -> None:
    script = Path(sys.executable).parent / "mergekit-extract-lora"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # absolute paths: mergekit's model card asks the Hub about any path that could be a repo id
    args = [str(script), "--model", str(tuned.resolve()), "--base-model", str(base.resolve()), "--out-path", str(out.resolve()), "--max-rank", str(RANK)]
    done = subprocess.run(args + ["--no-copy-tokenizer"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_error_never_above_mergekit(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = models
    _mergekit(base, tuned, tmp_path / "mergekit")
    ours = extract_adapter(base, tuned, tmp_path / "ours", rank=RANK)
    t, b = _load(tuned).state_dict(), _load(base).state_dict()
    theirs_merged, ours_merged = _peft_merge(base, tmp_path / "mergekit"), _peft_merge(base, tmp_path / "ours")
    compared = 0
    for m in ours.modules:
        key = m.module + ".weight"
        norm = float((t[key] - b[key]).double().norm())
        theirs = float((t[key] - theirs_merged[key]).double().norm()) / norm
        mine = float((t[key] - ours_merged[key]).double().norm()) / norm
        assert mine <= theirs * (1 + 1e-4) + 1e-6, (m.module, mine, theirs)
        compared += 1
    assert compared == len(LOW_RANK) + len(FULL_RANK)
