"""Warnings have one home: every code is built in one module, the rules module (verify's directory
codes aside), and the ``full-copy-suffix`` wording is the same wherever it is reported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from adapterfmt.checkpoint.finding import Finding
from adapterfmt.checkpoint.findings import full_copy_suffix_finding

PACKAGE = Path(__file__).resolve().parents[2] / "adapterfmt"
#: ``verify`` checks a directory's files and has codes of its own (``bad-index``, ``missing-shard`` ...).
OWN_CODES = {"verify.py"}


def _builders() -> dict[str, set[str]]:
    """Warning code -> the modules that pass it as a literal to ``Finding(...)``."""
    where: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Finding"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                where[node.args[0].value].add(path.name)
    return where


def test_every_code_is_built_in_one_module_the_rules_module():
    where = _builders()
    assert "full-copy-suffix" in where and "unresolved-module" in where
    for code, modules in where.items():
        assert len(modules) == 1, f"{code} is built in {sorted(modules)}"
        assert modules <= {"findings.py"} | OWN_CODES, f"{code} is built in {sorted(modules)}, not findings.py"


def test_finding_record_imports_nothing_from_the_package():
    tree = ast.parse((PACKAGE / "checkpoint" / "finding.py").read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert Finding("x-y", "m").as_dict() == {"code": "x-y", "message": "m", "keys": []}


def test_full_copy_suffix_names_both_bindings():
    f = full_copy_suffix_finding("x", ["model.x", "img_model.x"], ["model.x"], ["img_model.x"], adapter="other")
    assert f.code == "full-copy-suffix" and f.keys == ["img_model.x"]
    assert f.message == (
        "adapter 'other': modules_to_save entry 'x' binds model.x, img_model.x under PEFT's plain endswith "
        "matching, but model.x under exact matching; PEFT expects full tensors for every module it binds"
    )
    assert "nothing under exact matching" in full_copy_suffix_finding("x", ["a.x"], [], ["a.x"]).message
