"""The library's layer rules (pyproject.toml ``[tool.importlinter]``), checked with import-linter.

The contracts: subsystems import only downwards (``layers``), no import cycle between folders or
between modules (``acyclic_siblings``), and the library never imports the CLI, click or a test
oracle (``forbidden``). import-linter's graph (grimp) sees every import: module level, inside a
function (a lazy import that closes a cycle is still a cycle) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports() -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lint-imports" + (".exe" if os.name == "nt" else ""))
    return subprocess.run([str(script), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_contract_is_kept():
    run = _lint_imports()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"Contracts: 3 kept, 0 broken", run.stdout), run.stdout[-2000:]


def test_every_subsystem_folder_is_a_layer():
    """A new folder under adapterfmt/ must be placed in the layers contract, or nothing checks it."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = text.split('type = "layers"', 1)[1].split("layers = [", 1)[1].split("]", 1)[0]
    layered = set(re.findall(r"\w+", block))
    folders = {p.parent.name for p in (ROOT / "adapterfmt").glob("*/__init__.py")}
    assert folders and folders <= layered, f"not in the layers contract: {sorted(folders - layered)}"


def test_graph_sees_lazy_imports():
    """The contracts are only as good as the graph: an import inside a function counts."""
    graph = grimp.build_graph("adapterfmt", cache_dir=None)
    # the PEFT reader reads pickle files through torch_io inside a function
    assert graph.direct_import_exists(importer="adapterfmt.formats.peft.reading", imported="adapterfmt.storage.torch_io")
