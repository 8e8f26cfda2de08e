"""``resize`` and ``combine`` take Hub ids (read from huggingface_hub's cache, ``HF_HUB_OFFLINE=1``),
and their output equals the local path's byte for byte; inputs are never modified.

We test: a PEFT adapter repo resized and combined with a local adapter; a kohya file repo resized.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from _algebra_helpers import make_peft_adapter, mlp_stack
from test_resize import _kohya_file


def _hub_snapshot(cache: Path, repo_id: str, source: Path) -> None:
    """``source`` as huggingface_hub caches it: snapshot files are symlinks to ``../../blobs``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if f.is_file():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_hub_ids(tmp_path, run_cli):
    a = make_peft_adapter(mlp_stack, tmp_path / "a", r=4, lora_alpha=8, target_modules=["fc1"])
    b = make_peft_adapter(mlp_stack, tmp_path / "b", seed=5, r=2, lora_alpha=2, target_modules=["fc1", "fc2"])
    kdir = tmp_path / "k"
    kdir.mkdir()
    _kohya_file(kdir / "style.safetensors")
    cache = tmp_path / "hub"
    _hub_snapshot(cache, "user/lora-a", a)
    _hub_snapshot(cache, "user/kohya", kdir)
    inputs = {**_digest(a), **_digest(b), **_digest(kdir)}
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    runs = [
        (["resize", "user/lora-a", "-o", str(tmp_path / "h1"), "--rank", "2"], ["resize", a, "-o", tmp_path / "l1", "--rank", "2"]),
        (["combine", "user/lora-a:0.5", f"{b}:2", "-o", str(tmp_path / "h2"), "--method", "svd", "--rank", "3"],
         ["combine", f"{a}:0.5", f"{b}:2", "-o", tmp_path / "l2", "--method", "svd", "--rank", "3"]),
        (["resize", "user/kohya", "-o", str(tmp_path / "h3.safetensors"), "--energy", "0.9", "--json"],
         ["resize", kdir / "style.safetensors", "-o", tmp_path / "l3.safetensors", "--energy", "0.9"]),
    ]
    # one process for the three Hub runs: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE on import
    script = (
        "import json, sys\n"
        "from adapterfmt_cli.main import cli\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    cli.main(args=args, standalone_mode=False)\n"
    )
    p = subprocess.run([sys.executable, "-c", script, json.dumps([h for h, _ in runs])], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout[p.stdout.index("{"):])["format"] == "kohya"  # the last run's --json
    for _, local_args in runs:
        assert run_cli(*local_args).exit_code == 0
    for h, loc in (("h1", "l1"), ("h2", "l2"), ("h3.safetensors", "l3.safetensors")):
        hp, lp = tmp_path / h, tmp_path / loc
        if hp.is_dir():
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                assert (hp / name).read_bytes() == (lp / name).read_bytes(), (h, name)
        else:
            assert hp.read_bytes() == lp.read_bytes()
    assert {**_digest(a), **_digest(b), **_digest(kdir)} == inputs
