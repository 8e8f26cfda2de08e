"""After a merge, the console script leaves without the interpreter's teardown, with its output
complete: stdout flushed (even into a pipe), the merged directory committed. Errors exit normally."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("TEARDOWN\\n"))
from adapterfmt_cli.main import main
main(sys.argv[1:])
"""


#: ``python -m adapterfmt_cli.main``, with the same hook (runpy is what ``-m`` runs).
SCRIPT_M = """
import atexit, runpy, sys
atexit.register(lambda: sys.stderr.write("TEARDOWN\\n"))
sys.argv[0] = "adapterfmt_cli.main"
runpy.run_module("adapterfmt_cli.main", run_name="__main__", alter_sys=True)
"""


def _run(*args: str, script: str = SCRIPT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / ".shim"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)


def test_merge_exits_without_teardown_after_committing(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    done = _run("merge", "--base", str(REPO / "testdata/tiny-llama"), "--adapter", str(REPO / "testdata/tiny-llama-lora"), "-o", str(out), "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensors_merged"] == 14  # the whole document made it through the pipe
    assert "TEARDOWN" not in done.stderr
    assert (out / "model.safetensors.index.json").is_file() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    failed = _run("merge", "--base", str(REPO / "testdata/tiny-llama"), "--adapter", str(tmp_path / "missing"), "-o", str(tmp_path / "o2"))
    assert failed.returncode == 2 and "TEARDOWN" in failed.stderr


def test_python_dash_m_exits_as_the_console_script_does(tmp_path: Path) -> None:
    """``python -m adapterfmt_cli.main`` runs the module as __main__, a second copy: the flags a
    command sets live in adapterfmt_cli.main, so __main__ must run that module's main, or the
    merge would pay for torch's teardown there (0.2-0.4 s) while the console script does not."""
    out = tmp_path / "merged"
    done = _run("merge", "--base", str(REPO / "testdata/tiny-llama"), "--adapter", str(REPO / "testdata/tiny-llama-lora"), "-o", str(out), "--json", "--quiet", script=SCRIPT_M)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensors_merged"] == 14 and "TEARDOWN" not in done.stderr
    inspected = _run("inspect", str(REPO / "testdata/tiny-llama-lora"), "--json", script=SCRIPT_M)
    assert inspected.returncode == 0 and json.loads(inspected.stdout)["totals"]["adapter_modules"] > 0 and "TEARDOWN" not in inspected.stderr
    failed = _run("merge", "--base", str(REPO / "testdata/tiny-llama"), "--adapter", str(tmp_path / "missing"), "-o", str(tmp_path / "o2"), script=SCRIPT_M)
    assert failed.returncode == 2 and "TEARDOWN" in failed.stderr


def test_inspect_and_check_exit_without_teardown_with_their_output_complete() -> None:
    """inspect and check print, then leave by os._exit (a 100k-module adapter's records are not
    freed one by one); the JSON document is whole. --strict's exit 1 takes the normal way out."""
    adapter, base = str(REPO / "testdata/tiny-llama-lora"), str(REPO / "testdata/tiny-llama")
    inspected = _run("inspect", adapter, "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["totals"]["adapter_modules"] > 0 and "TEARDOWN" not in inspected.stderr
    checked = _run("check", "--base", base, "--adapter", adapter, "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["ok"] is True and "TEARDOWN" not in checked.stderr
    table = _run("inspect", adapter)
    assert table.returncode == 0 and "lora" in table.stdout and "TEARDOWN" not in table.stderr


def test_in_process_commands_keep_nothing_alive(tmp_path: Path) -> None:
    """Called in-process (tests, other programs) a command ends normally: nothing is kept for an exit."""
    from click.testing import CliRunner

    from adapterfmt_cli import main

    result = CliRunner().invoke(main.cli, ["inspect", str(REPO / "testdata/tiny-llama-lora"), "--json"])
    assert result.exit_code == 0 and main._kept_until_exit == []
    frozen = gc.get_freeze_count()
    result = CliRunner().invoke(main.cli, ["merge", "--base", str(REPO / "testdata/tiny-llama"), "--adapter", str(REPO / "testdata/tiny-llama-lora"), "-o", str(tmp_path / "m"), "--quiet"])
    assert result.exit_code == 0 and main._kept_until_exit == [] and gc.get_freeze_count() == frozen  # nothing frozen either
