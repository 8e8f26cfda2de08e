"""After a merge, the console script leaves without the interpreter's teardown, with its output
complete: stdout flushed (even into a pipe), the merged directory committed. Errors exit normally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("TEARDOWN\\n"))
from adapterfmt_cli.main import main
main(sys.argv[1:])
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / ".shim"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


def test_merge_exits_without_teardown_after_committing(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    done = _run("merge", "--base", str(REPO / "testdata/tiny-llama"), "--adapter", str(REPO / "testdata/tiny-llama-lora"), "-o", str(out), "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tensors_merged"] == 14  # the whole document made it through the pipe
    assert "TEARDOWN" not in done.stderr
    assert (out / "model.safetensors.index.json").is_file() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    failed = _run("merge", "--base", str(REPO / "testdata/tiny-llama"), "--adapter", str(tmp_path / "missing"), "-o", str(tmp_path / "o2"))
    assert failed.returncode == 2 and "TEARDOWN" in failed.stderr
