"""The README's set-up commands are the ones CI runs, and its library example is true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    commands = _readme_commands()
    assert len(commands) >= 2
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in ci.splitlines()


def test_readme_main_job_uses_shipped_testdata() -> None:
    main_job = _readme_commands()[0]
    for path in re.findall(r"testdata/[\w-]+", main_job):
        assert (ROOT / path).is_dir(), path
    assert "adapterfmt inspect" in main_job and "adapterfmt merge" in main_job


def test_readme_key_mapping_example() -> None:
    import adapterfmt

    assert (
        adapterfmt.saved_to_wrapped("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    )
    ckpt = adapterfmt.read_adapter(ROOT / "testdata" / "tiny-llama-lora")
    base = adapterfmt.read_base(ROOT / "testdata" / "tiny-llama")
    assert adapterfmt.resolve(ckpt, base).summary() == "14/14 LoRA targets and 1/1 full copies resolved"
