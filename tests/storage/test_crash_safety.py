"""``adapterfmt merge`` killed with SIGKILL never leaves a half-written OUT, and a rerun succeeds.

The merge runs through ``tests/_pause_cli.py``, which installs a hook on the library's named
pause points (``adapterfmt.storage.pause``): at the chosen point it writes the point's name to a marker
file and sleeps; the test waits for the marker and kills the process there. The killed merges run as real processes, all
started together; the reruns run in-process.

We test, at every kill point (``start``: staging directory made, no tensor read yet;
``write:1`` / ``write:3``: reading and writing the first / the last shard of three; ``files``:
every shard written; ``rename``: output complete and fsynced, just before the rename):
  * OUT does not exist after the kill; the only thing beside it is the clearly named staging
    directory ``.OUT.adapterfmt-tmp-<pid>`` of the killed process;
  * the inputs are byte-for-byte unchanged;
  * the next run removes the leftover (and says so), succeeds, and writes exactly the bytes of an
    undisturbed run, which ``verify`` accepts.
Also: a killed ``--overwrite`` run keeps the old OUT intact; a second merge into an OUT that a
live merge is writing is refused with one line instead of deleting the live run's files.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from _hardening_helpers import PAUSE_CLI, TESTDATA, CliResult, assert_same_digest, inputs_untouched, invoke_cli, tree_digest
from _portable import staging_leftovers

BASE = TESTDATA / "tiny-llama"
ADAPTER = TESTDATA / "tiny-llama-lora"
SHARDS = 3  # tiny-llama's shard count: write:3 is the last shard
KILL_POINTS = ["start", "write:1", f"write:{SHARDS}", "files", "rename"]
STAGING = re.compile(r"^\.OUT\.adapterfmt-tmp-(\d+)$")
#: Seconds to wait for a merge to reach its pause point (a torch import on a busy box).
REACH_SECONDS = 120


def _merge(out: Path, *extra: str, pause_at: str, marker: Path) -> subprocess.Popen:
    """A merge in a real process that sleeps at ``pause_at`` after writing ``marker``."""
    return _paused(pause_at, marker, "cli", "merge", "--base", str(BASE), "--adapter", str(ADAPTER), "-o", str(out), *extra)


def _paused(pause_at: str, marker: Path, *args: str) -> subprocess.Popen:
    """``tests/_pause_cli.py``: the CLI (``cli ...``) or a save (``save OUT``), sleeping at ``pause_at``."""
    command = [sys.executable, str(PAUSE_CLI), pause_at, str(marker), "600", *args]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, marker: Path, point: str) -> None:
    deadline = time.monotonic() + REACH_SECONDS
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"merge exited ({proc.returncode}) before reaching {point!r}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"merge did not reach pause point {point!r} within {REACH_SECONDS} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()


@dataclass(frozen=True)
class Killed:
    """A merge SIGKILLed at a pause point, and what it left."""

    out: Path
    pid: int
    returncode: int
    left: tuple[str, ...]  #: entries beside (and including) OUT right after the kill


def _rerun(out: Path, *extra: str) -> CliResult:
    """The next run, in-process (only the killed runs need a real process)."""
    return invoke_cli(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "-o", str(out), *extra])


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Killed]:
    """One merge per kill point (plus an ``--overwrite`` one over an existing OUT), all started at
    once so their start-up overlaps, each SIGKILLed when it reaches its point."""
    runs: dict[str, tuple[Path, Path, subprocess.Popen]] = {}
    digest = tree_digest(BASE, ADAPTER)
    try:
        for point in [*KILL_POINTS, "overwrite"]:
            folder = tmp_path_factory.mktemp(point.replace(":", "-"))
            out, marker = folder / "OUT", folder.parent / f"{folder.name}.reached"
            extra = []
            if point == "overwrite":
                out.mkdir()
                (out / "old-model.txt").write_text("the previous output")
                extra = ["--overwrite"]
            runs[point] = (out, marker, _merge(out, *extra, pause_at="rename" if point == "overwrite" else point, marker=marker))
        result = {}
        for point, (out, marker, proc) in runs.items():
            _wait_for(proc, marker, point)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            result[point] = Killed(out, proc.pid, proc.returncode, tuple(sorted(os.listdir(out.parent))))
    finally:
        for _, _, proc in runs.values():
            _stop(proc)
    assert_same_digest(digest, tree_digest(BASE, ADAPTER))
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Digest of an undisturbed merge's files, by name."""
    out = tmp_path_factory.mktemp("reference") / "OUT"
    result = _rerun(out, "--quiet")
    assert result.exit_code == 0, result.stderr
    return _relative_digest(out)


def _relative_digest(out: Path) -> dict[str, str]:
    return {os.path.relpath(k, out): v for k, v in tree_digest(out).items()}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_merge_leaves_no_out_and_a_rerun_succeeds(point: str, killed: dict[str, Killed], reference: dict[str, str]) -> None:
    from adapterfmt.reports.verify import verify_directory

    run = killed[point]
    assert run.returncode == -signal.SIGKILL
    assert run.left == tuple(staging_leftovers(f".OUT.adapterfmt-tmp-{run.pid}")), f"after a kill at {point!r}: {run.left}"

    with inputs_untouched(BASE, ADAPTER):
        rerun = _rerun(run.out)
    assert rerun.exit_code == 0, rerun.stderr
    assert f".OUT.adapterfmt-tmp-{run.pid}" in rerun.stderr, "the rerun should say it removed the leftover"
    assert os.listdir(run.out.parent) == ["OUT"]
    assert verify_directory(run.out) == []
    assert _relative_digest(run.out) == reference


def test_killed_overwrite_keeps_the_old_output(killed: dict[str, Killed], reference: dict[str, str]) -> None:
    run = killed["overwrite"]
    assert run.left == tuple(sorted(["OUT", *staging_leftovers(f".OUT.adapterfmt-tmp-{run.pid}")]))
    assert os.listdir(run.out) == ["old-model.txt"] and (run.out / "old-model.txt").read_text() == "the previous output"

    rerun = _rerun(run.out, "--overwrite", "--quiet")
    assert rerun.exit_code == 0, rerun.stderr
    assert os.listdir(run.out.parent) == ["OUT"]
    assert _relative_digest(run.out) == reference


def test_second_merge_into_a_live_output_is_refused(tmp_path: Path) -> None:
    out, marker = tmp_path / "OUT", tmp_path / "reached"
    live = _merge(out, pause_at="write:1", marker=marker)
    try:
        _wait_for(live, marker, "write:1")
        staged = [e for e in os.listdir(tmp_path) if STAGING.match(e)]
        second = _rerun(out)
        assert second.exit_code == 2, second.stderr
        assert len(second.stderr_lines) == 1 and second.stderr_lines[0].startswith("Error: "), second.stderr
        assert str(live.pid) in second.stderr_lines[0]
        assert [e for e in os.listdir(tmp_path) if STAGING.match(e)] == staged, "the live run's staging directory was touched"
        assert not out.exists()
    finally:
        _stop(live)


# ---------------------------------------------------------------------------------------------
# the same rule for every writer: convert (with --base-out) and save
# ---------------------------------------------------------------------------------------------

#: Pause points every staged writer passes (``start`` twice for convert: OUT's stage, then BASE's).
WRITER_POINTS = ["start", "files", "rename"]


@pytest.fixture(scope="module")
def wrapped_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``PeftModel.state_dict()``-style file of tiny-llama + its LoRA, named by ``wrapped_names``."""
    from safetensors.torch import load_file, save_file

    from adapterfmt.base.reading import read_base
    from adapterfmt.convert.wrapped import wrapped_names
    from adapterfmt.formats.peft.reading import read_adapter

    base = {}
    for shard in sorted(BASE.glob("*.safetensors")):
        base.update(load_file(str(shard)))
    adapter = read_adapter(ADAPTER)
    saved = load_file(adapter.weights_file)
    names = wrapped_names(adapter, list(read_base(BASE).tensors))
    state = {k: (base[s.key] if s.kind == "base" else saved[s.key]).contiguous() for k, s in names.items()}
    directory = tmp_path_factory.mktemp("wrapped")
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text((BASE / "config.json").read_text())
    return directory


def _run_and_kill(point: str, marker: Path, *args: str) -> int:
    proc = _paused(point, marker, *args)
    try:
        _wait_for(proc, marker, point)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        return proc.pid
    finally:
        _stop(proc)


@pytest.mark.parametrize("point", WRITER_POINTS)
def test_killed_convert_leaves_no_output(point: str, wrapped_checkpoint: Path, tmp_path: Path) -> None:
    out, base_out = tmp_path / "OUT", tmp_path / "BASE"
    digest = tree_digest(wrapped_checkpoint)
    args = ["convert", str(wrapped_checkpoint), "-o", str(out), "--base-out", str(base_out), "--alpha", "16"]
    pid = _run_and_kill(point, tmp_path.parent / f"{tmp_path.name}.reached", "cli", *args)
    assert_same_digest(digest, tree_digest(wrapped_checkpoint))
    left = sorted(os.listdir(tmp_path))
    assert not out.exists() and not base_out.exists(), f"after a kill at {point!r}: {left}"
    assert set(left) <= {f".OUT.adapterfmt-tmp-{pid}", f".BASE.adapterfmt-tmp-{pid}"} and left, left

    rerun = invoke_cli(args)
    assert rerun.exit_code == 0, rerun.stderr
    assert sorted(os.listdir(tmp_path)) == ["BASE", "OUT"]
    from adapterfmt.reports.verify import verify_directory

    assert verify_directory(out) == [] and verify_directory(base_out) == []


@pytest.mark.parametrize("point", WRITER_POINTS)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-old"])
def test_killed_save_leaves_old_or_nothing(point: str, existing: bool, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    if existing:
        out.mkdir()
        (out / "README.md").write_text("kept")
        (out / "adapter_config.json").write_text("{}")
    before = tree_digest(out) if existing else None
    pid = _run_and_kill(point, tmp_path.parent / f"{tmp_path.name}.reached", "save", str(out))
    left = sorted(os.listdir(tmp_path))
    if existing:
        assert tree_digest(out) == before, f"a kill at {point!r} changed the old output"
    else:
        assert not out.exists(), f"after a kill at {point!r}: {left}"
    assert [e for e in left if e != "OUT"] == [f".OUT.adapterfmt-tmp-{pid}"], left


def test_save_keeps_other_files_and_replaces_its_own(tmp_path: Path) -> None:
    import json

    import adapterfmt
    from _load_helpers import tiny_llama

    out = tmp_path / "OUT"
    out.mkdir()
    (out / "README.md").write_text("kept")
    (out / "adapter_config.json").write_text("{}")
    leftover = tmp_path / f".OUT.adapterfmt-tmp-{2**22 + 7}"  # a dead process's stage
    leftover.mkdir()
    model = tiny_llama()
    adapterfmt.load(model, ADAPTER)
    adapterfmt.save(model, out)
    assert sorted(os.listdir(tmp_path)) == ["OUT"]
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (out / "README.md").read_text() == "kept"
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16
