"""The header-only commands never import torch (nor huggingface_hub or tqdm for local paths).

Each command runs in a fresh interpreter that reports, after the command returns, which of
these packages ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TESTDATA

HEAVY = ("torch", "huggingface_hub", "tqdm", "numpy", "safetensors")

#: Runs the CLI, then prints the heavy packages that were imported as the last stderr line. The
#: console script may end by ``os._exit`` once its output is printed: the report is made there too.
_WRAPPER = f"""
import json, os, sys
def report():
    sys.stdout.flush()
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
    print("LOADED " + json.dumps(loaded), file=sys.stderr, flush=True)
real_exit = os._exit
def exit_after_report(code):
    report()
    real_exit(code)
os._exit = exit_after_report
from adapterfmt_cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = 0
report()
sys.exit(code)
"""


def run_and_report(*args: str) -> tuple[int, list[str], str]:
    result = subprocess.run([sys.executable, "-c", _WRAPPER, *args], capture_output=True, text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("LOADED "), result.stderr
    return result.returncode, json.loads(last[len("LOADED ") :]), result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", str(TESTDATA / "tiny-llama-lora")),
        ("inspect", str(TESTDATA / "tiny-llama-lora"), "--json"),
        ("inspect", str(TESTDATA / "tiny-llama-tied-lora"), "--base", str(TESTDATA / "tiny-llama-tied"), "--json"),
        ("check", "--base", str(TESTDATA / "tiny-llama"), "--adapter", str(TESTDATA / "tiny-llama-lora")),
        ("check", "--base", str(TESTDATA / "tiny-bert"), "--adapter", str(TESTDATA / "tiny-llama-lora")),
        ("targets", "--base", str(TESTDATA / "tiny-llama"), "--target-modules", "q_proj"),
    ],
    ids=["inspect", "inspect-json", "inspect-base", "check", "check-failing", "targets"],
)
def test_header_only_commands_import_no_torch(args):
    code, loaded, stdout = run_and_report(*args)
    assert stdout  # the command did its work
    assert code in (0, 1)
    # torch must never load here; the others would only cost start-up time (budget: bench/inspect.py)
    assert loaded == [], f"header-only command imported {loaded}"


def test_scan_is_the_one_that_loads_torch():
    """The wrapper does see torch when a command does import it (the check above is not vacuous)."""
    code, loaded, _ = run_and_report("inspect", str(TESTDATA / "tiny-llama-lora"), "--scan")
    assert code == 0
    assert "torch" in loaded
