"""A merge into a single file killed mid-write leaves no OUT; the next run removes its stage and
writes the same bytes as an undisturbed run; an existing OUT survives a killed ``--overwrite``."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from _flux_helpers import IN, flux_state, write_flux

PAUSE_CLI = Path(__file__).resolve().parents[1] / "_pause_cli.py"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill_at(point: str, args: list[str], marker: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(PAUSE_CLI), point, str(marker), "600", "cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"never reached {point}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_killed_single_file_merge(tmp_path, run_cli):
    state = flux_state()
    base = write_flux(str(tmp_path / "flux.safetensors"), state)
    g = torch.Generator().manual_seed(1)
    lora = str(tmp_path / "k.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, IN, generator=g),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(9216, 4, generator=g)}, lora)
    before = _sha(Path(base))
    reference = tmp_path / "reference.safetensors"
    assert run_cli("merge", "--base", base, "--adapter", lora, "-o", reference).exit_code == 0
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    for point in ("write:1", "rename"):
        out = out_dir / f"{point.replace(':', '-')}.safetensors"
        _kill_at(point, ["merge", "--base", base, "--adapter", lora, "-o", str(out)], tmp_path / f"{point}.reached")
        assert not out.exists()
        assert [e for e in os.listdir(out_dir) if "adapterfmt-tmp" in e]  # the stage of the killed run
        res = run_cli("merge", "--base", base, "--adapter", lora, "-o", out)
        assert res.exit_code == 0, res
        assert _sha(out) == _sha(reference)
        assert not [e for e in os.listdir(out_dir) if "adapterfmt-tmp" in e]
    # --overwrite killed before its rename: the old file is still there, whole
    old = out_dir / "old.safetensors"
    old.write_bytes(b"the previous output")
    _kill_at("rename", ["merge", "--base", base, "--adapter", lora, "-o", str(old), "--overwrite"], tmp_path / "ow.reached")
    assert old.read_bytes() == b"the previous output"
    assert run_cli("merge", "--base", base, "--adapter", lora, "-o", old).exit_code == 2  # exists: needs --overwrite
    assert _sha(Path(base)) == before
