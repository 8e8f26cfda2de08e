"""``extract`` with Hub ids (tests/_fake_hub.py on 127.0.0.1): headers first, so a tuned model of
other shapes is refused before any weight is downloaded; a matching one is downloaded through
the cache and gives the same adapter as the local run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterfmt.extraction.extract import extract_adapter

from _extract_models import make_models
from _fake_hub import FakeHub, run_batch, safetensors_file

SHA = "a" * 40


def _bigger(base: Path) -> object:
    """The base's header with one MLP weight 4,000,000 columns wide: a 1 GB virtual file."""
    from adapterfmt.storage.header import read_header

    tensors = {k: (i.dtype, list(i.shape)) for k, i in read_header(base / "model.safetensors").tensors.items()}
    tensors["model.layers.0.mlp.down_proj.weight"] = ("F32", [64, 4_000_000])
    return safetensors_file(tensors)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_models(tmp_path_factory)


def test_extract_from_hub_ids_headers_first(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = models
    config = (base / "config.json").read_text()
    # a 1 GB "fine-tune" of other sizes: its header alone must be enough to refuse it
    big = _bigger(base)
    with FakeHub() as hub:
        hub.add("user/base", _files(base), sha=SHA)
        hub.add("user/tuned", _files(tuned), sha=SHA)
        hub.add("user/other", {"config.json": config, "model.safetensors": big}, sha=SHA)
        hub.reset_count()
        out = tmp_path / "hub-adapter"
        bad, good = run_batch(
            hub,
            tmp_path / "cache",
            [
                {"cli": ["extract", "--base", "user/base", "--tuned", "user/other", "-o", str(tmp_path / "no"), "--rank", "2"]},
                {"cli": ["extract", "--base", "user/base", "--tuned", "user/tuned", "-o", str(out), "--rank", "4", "--json"]},
            ],
        )
    assert bad["exit_code"] == 2 and "down_proj" in bad["stderr"] and len(bad["stderr"].strip().splitlines()) == 1
    assert good["exit_code"] == 0, good["stderr"]
    local = extract_adapter(base, tuned, tmp_path / "local", rank=4)
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "local" / "adapter_model.safetensors").read_bytes()
    assert json.loads(good["stdout"])["totals"]["modules"] == len(local.modules)
    assert not (tmp_path / "no").exists()


def test_bytes_before_the_refusal(models: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = models
    big = _bigger(base)
    with FakeHub() as hub:
        hub.add("user/other", {"config.json": (base / "config.json").read_text(), "model.safetensors": big}, sha=SHA)
        hub.reset_count()
        (result,) = run_batch(hub, tmp_path / "cache", [{"cli": ["extract", "--base", str(base), "--tuned", "user/other", "-o", str(tmp_path / "no"), "--rank", "2"]}])
        served = hub.bytes_served
    assert result["exit_code"] == 2
    assert served < 1 << 20, served  # headers only: the 1 GB data section is never sent
