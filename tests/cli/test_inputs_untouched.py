"""Inputs are never modified: sha256 of every input file before and after every command.

We test:
  * the digest helper itself notices changed bytes, added files and retargeted symlinks;
  * inspect (with --scan), check, verify, merge and load over every shipped checkpoint leave
    every input file byte-identical and add nothing to the input directories;
  * a merge refused because OUT is an input, lies inside one (also spelled through a symlink or
    with ``..``) or contains one leaves the inputs as they were, with one error line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from _hardening_helpers import TESTDATA, assert_same_digest, inputs_untouched, invoke_cli, tree_digest, untouched  # noqa: F401

#: adapter -> its base, from each adapter's own config (repo-root-relative paths).
PAIRS = {
    p.name: (TESTDATA.parent / json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]).name
    for p in sorted(TESTDATA.iterdir())
    if (p / "adapter_config.json").is_file()
}


def test_digest_notices_bytes_names_and_links(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(TESTDATA / "tiny-llama-lora", d)
    (d / "link").symlink_to("adapter_config.json")
    before = tree_digest(d)
    for change in (
        lambda: (d / "README.md").write_text("changed"),
        lambda: (d / "new-file").write_text(""),
        lambda: ((d / "link").unlink(), (d / "link").symlink_to("README.md")),
    ):
        change()
        with pytest.raises(AssertionError, match="inputs were modified"):
            assert_same_digest(before, tree_digest(d))
        before = tree_digest(d)


@pytest.mark.parametrize("adapter", sorted(PAIRS))
def test_inspect_check_verify_leave_inputs_alone(adapter: str, untouched) -> None:  # noqa: F811
    base = PAIRS[adapter]
    untouched(TESTDATA / adapter, TESTDATA / base)
    assert invoke_cli(["inspect", str(TESTDATA / adapter), "--scan", "--json"]).exit_code == 0
    assert invoke_cli(["check", "--base", str(TESTDATA / base), "--adapter", str(TESTDATA / adapter)]).exit_code in (0, 1)
    for d in (adapter, base):
        assert invoke_cli(["verify", str(TESTDATA / d)]).exit_code == 0


@pytest.mark.parametrize("adapter", ["tiny-llama-lora", "tiny-llama-tied-lora", "tiny-bert-classifier"])
def test_merge_leaves_inputs_alone(adapter: str, tmp_path: Path) -> None:
    base = PAIRS[adapter]
    with inputs_untouched(TESTDATA / adapter, TESTDATA / base):
        result = invoke_cli(["merge", "--base", str(TESTDATA / base), "--adapter", str(TESTDATA / adapter), "-o", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_load_leaves_inputs_alone() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapterfmt

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(TESTDATA / "tiny-llama"))
    with inputs_untouched(TESTDATA / "tiny-llama-lora", TESTDATA / "tiny-llama"):
        adapterfmt.load(model, TESTDATA / "tiny-llama-lora")


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    """Private copies of tiny-llama and its adapter (outputs inside them are the point here)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(TESTDATA / "tiny-llama", base)
    shutil.copytree(TESTDATA / "tiny-llama-lora", adapter)
    return base, adapter


@pytest.mark.parametrize(
    "out",
    ["base", "base/merged", "adapter/merged", "base/../base/merged", "via-link/merged", "."],
    ids=["is-base", "in-base", "in-adapter", "dotdot", "through-symlink", "contains-inputs"],
)
def test_output_in_or_around_an_input_is_refused(out: str, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = inputs
    (tmp_path / "via-link").symlink_to(base)
    with inputs_untouched(base, adapter):
        result = invoke_cli(["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / out), "--quiet"])
    assert result.exit_code == 2, result.stdout + result.stderr
    assert len(result.stderr_lines) == 1 and result.stderr_lines[0].startswith("Error: "), result.stderr
