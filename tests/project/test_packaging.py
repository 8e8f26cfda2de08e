"""What a built wheel holds: every package of the library and every data file it reads.

An editable install (what the tests and CI use) reads the source tree, so a package or data file
missing from pyproject.toml goes unnoticed there; a wheel built from it then lacks that code
(this happened to ``adapterfmt/formats``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _setting(section: str, name: str) -> str:
    """The value text of ``name = ...`` in ``[section]`` of pyproject.toml (tomllib is 3.11+ only)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    body = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
    match = re.search(rf"^{re.escape(name)}\s*=\s*(\[[^\]]*\]|.+)$", body, flags=re.MULTILINE)
    assert match, f"pyproject.toml [{section}] has no {name} line"
    return match.group(1)


def test_every_library_package_is_listed() -> None:
    listed = set(ast.literal_eval(_setting("tool.setuptools", "packages")))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "adapterfmt").rglob("__init__.py")}
    assert found and found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"
    assert "adapterfmt_cli" in listed


def test_every_data_file_is_package_data() -> None:
    data = sorted((ROOT / "adapterfmt").rglob("*.json"))
    assert data
    for path in data:
        package = ".".join(path.parent.relative_to(ROOT).parts)
        listed = set(ast.literal_eval(_setting("tool.setuptools.package-data", f'"{package}"')))
        assert path.name in listed, f"{path.relative_to(ROOT)} not in [tool.setuptools.package-data] \"{package}\""
