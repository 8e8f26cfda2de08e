"""A merge onto a filesystem that is too small fails with one line saying how much space it needs,
and leaves nothing behind.

We test, on a small tmpfs mounted for the test (skipped, with the reason, where mounting is not
permitted):
  * the free-space check before anything is written: exit 2, one ``Error:`` line naming the
    bytes needed, the filesystem left empty, the inputs unchanged;
  * the disk filling up *during* the merge (another writer takes the space while the merge is
    paused at its ``start`` point, after its check passed): exit 2, one line, no staging
    directory and no OUT left, only the other writer's file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from _hardening_helpers import PAUSE_CLI, TESTDATA, inputs_untouched, invoke_cli

BASE = TESTDATA / "tiny-llama"
ADAPTER = TESTDATA / "tiny-llama-lora"
NEEDS = re.compile(r"needs [\d.]+ ?[KMGT]?B|needs \d+ bytes")


@pytest.fixture
def small_fs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of 200k (or the size given by indirect parametrization), unmounted afterwards."""
    size = getattr(request, "param", "200k")
    mount = tmp_path / "small"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


def test_too_small_filesystem_is_refused_before_writing(small_fs: Path) -> None:
    out = small_fs / "merged"
    with inputs_untouched(BASE, ADAPTER):
        result = invoke_cli(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "-o", str(out), "--quiet"])
    assert result.exit_code == 2, result.stdout + result.stderr
    line = _one_error_line(result.stderr)
    assert NEEDS.search(line), line
    assert os.listdir(small_fs) == []


@pytest.mark.parametrize("small_fs", ["24m"], indirect=True)
def test_disk_filling_up_during_the_merge_leaves_nothing(small_fs: Path) -> None:
    out = small_fs / "merged"
    marker = small_fs.parent / "reached-start"
    args = [sys.executable, str(PAUSE_CLI), "start", str(marker), "3", "cli", "merge", "--base", str(BASE), "--adapter", str(ADAPTER), "-o", str(out), "--quiet"]
    with inputs_untouched(BASE, ADAPTER):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the merge never reached its start point"
                time.sleep(0.02)
            filler = small_fs / "someone-else.bin"
            with open(filler, "wb") as f:  # take all but 64 KiB of what is left
                f.truncate(0)
                free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
                f.write(b"\0" * max(0, free - (64 << 10)))
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 2, stdout + stderr
    line = _one_error_line(stderr)
    assert "space" in line and NEEDS.search(line), line
    assert os.listdir(small_fs) == ["someone-else.bin"]
