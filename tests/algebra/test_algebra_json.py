"""``resize --json`` and ``combine --json`` validate against docs/schemas/*.schema.json, and the
text output names every module.

We test real output (a PEFT directory, a kohya file, every combine method) with ``jsonschema``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from _algebra_helpers import make_peft_adapter, mlp_stack
from test_resize import _kohya_file

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def _schema(name: str) -> dict:
    doc = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(doc)
    return doc


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("json")
    a = make_peft_adapter(mlp_stack, root / "a", r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_dora=True, modules_to_save=["head"])
    b = make_peft_adapter(mlp_stack, root / "b", seed=4, r=3, lora_alpha=3, target_modules=["fc1"])
    c = make_peft_adapter(mlp_stack, root / "c", seed=5, r=2, lora_alpha=3, target_modules=["fc1", "fc2"])
    return a, b, c


@pytest.mark.parametrize("rule", [("--rank", "2"), ("--energy", "0.9"), ("--ratio", "4"), ("--cumulative", "0.7")])
def test_resize_json_schema(adapters, run_cli, tmp_path, rule):
    r = run_cli("resize", adapters[0], "-o", tmp_path / "o", *rule, "--json")
    assert r.exit_code == 0, r
    jsonschema.validate(r.json(), _schema("resize"))


def test_resize_kohya_json_schema_and_text(run_cli, tmp_path):
    src = tmp_path / "k.safetensors"
    _kohya_file(src)
    r = run_cli("resize", src, "-o", tmp_path / "o.safetensors", "--energy", "0.8", "--json")
    assert r.exit_code == 0, r
    jsonschema.validate(r.json(), _schema("resize"))
    r = run_cli("resize", src, "-o", tmp_path / "t.safetensors", "--rank", "3")
    assert r.exit_code == 0, r
    assert "unet.mid_block_proj_in" in r.stdout or "mid_block_proj_in" in r.stdout
    assert "relative error" in r.stdout


@pytest.mark.parametrize("method,extra", [("cat", []), ("linear", ["--rank", "2"]), ("svd", []), ("ties", ["--density", "0.5"]),
                                          ("dare_linear", ["--density", "0.5", "--seed", "3"]), ("dare_ties", ["--density", "0.7"]),
                                          ("magnitude_prune", ["--density", "0.3"])])
def test_combine_json_schema(adapters, run_cli, tmp_path, method, extra):
    _, b, c = adapters
    r = run_cli("combine", f"{b}:0.5", f"{c}:2", "-o", tmp_path / "o", "--method", method, *extra, "--json")
    assert r.exit_code == 0, r
    doc = r.json()
    jsonschema.validate(doc, _schema("combine"))
    assert doc["method"] == method and len(doc["modules"]) == 26
