"""mergekit 0.1.5's ``mergekit-extract-lora`` (a full SVD per module) as the oracle: on the same fine-tune
and rank, adapterfmt's error is never above mergekit's, module by module, both measured through
PEFT's merge of each adapter. mergekit is installed with ``pip install --no-deps`` (see DEVELOPERS.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from adapterfmt.extraction.extract import extract_adapter

from _extract_models import FULL_RANK, LOW_RANK, _load, _peft_merge, make_models, make_noisy_models

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


def _stored_errors(adapter: Path, base: Path, tuned: Path, modules: list[str]) -> dict[str, float]:
    """‖Δ − (α/r)·B·A‖_F / ‖Δ‖_F of each module, from the adapter's tensors as stored (float64 math)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    t, b = _load(tuned).state_dict(), _load(base).state_dict()
    out = {}
    for module in modules:
        key = module + ".weight"
        delta = t[key].double() - b[key].double()
        a, bb = factors[f"base_model.model.{module}.lora_A.weight"].double(), factors[f"base_model.model.{module}.lora_B.weight"].double()
        r = a.shape[0]
        alpha = config.get("alpha_pattern", {}).get(module, config.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], config["lora_alpha"]))
        out[module] = float((delta - (alpha / r) * (bb @ a)).norm() / delta.norm())
    return out


def test_noisy_tail_randomized_and_never_above_mergekit(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A bf16 fine-tune of every linear with a noisy tail (the benchmark's spectrum): the default
    ``--svd auto`` certifies the randomized SVD on every module, and its error (fp32 factors as
    stored) is below mergekit's (its full SVD, stored in the model's bf16) on each."""
    base, tuned = make_noisy_models(tmp_path_factory)
    _mergekit(base, tuned, tmp_path / "mergekit")
    ours = extract_adapter(base, tuned, tmp_path / "ours", rank=RANK)
    assert len(ours.modules) == len(LOW_RANK) + len(FULL_RANK)
    assert {m.method for m in ours.modules} == {"randomized"}
    modules = [m.module for m in ours.modules]
    theirs = _stored_errors(tmp_path / "mergekit", base, tuned, modules)
    mine = _stored_errors(tmp_path / "ours", base, tuned, modules)
    for m in ours.modules:
        assert math.isclose(mine[m.module], m.relative_error, rel_tol=1e-6)  # the report is the stored error
        assert mine[m.module] <= theirs[m.module], (m.module, mine[m.module], theirs[m.module])
