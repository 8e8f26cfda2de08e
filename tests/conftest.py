"""Shared fixtures: the shipped testdata, broken copies of it in tmp_path, and a CLI runner.

Every test runs offline: ``HF_HUB_OFFLINE=1`` is set before anything imports huggingface_hub,
so a Hub id that is not in a test-built cache fails at once instead of reaching the network.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("ADAPTERFMT_DEBUG", None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Test modules live in one folder per subsystem and have unique names: a test may import another
# test module (or its helpers) by name, whichever folders pytest was asked to collect.
sys.path[1:1] = sorted({str(p.parent) for p in Path(__file__).resolve().parent.glob("*/test_*.py")} - set(sys.path))
TESTDATA = REPO / "testdata"
#: Every adapter shipped in testdata/ (relative to it).
ADAPTERS = [
    "tiny-llama-lora",
    "tiny-llama-multi",
    "tiny-llama-multi/second",
    "tiny-bert-classifier",
    "tiny-llama-tied-lora",
    "tiny-llama-dora",
    "tiny-bert-lorabias",
]


def assert_one_error_line(result: Any, *names: str) -> None:
    """Exit 2 with exactly one ``Error: ...`` line on stderr naming every one of ``names``, no traceback."""
    assert result.exit_code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture
def testdata() -> Path:
    """The shipped ``testdata/`` directory (read-only: copy before changing anything)."""
    return TESTDATA


@pytest.fixture
def copy_testdata(tmp_path: Path) -> Callable[[str], Path]:
    """``copy_testdata("tiny-llama-lora")`` -> a private copy under ``tmp_path``."""

    def copy(name: str, dest: Optional[str] = None) -> Path:
        target = tmp_path / (dest or name)
        shutil.copytree(TESTDATA / name, target)
        return target

    return copy


def edit_adapter_weights(
    directory: Path,
    *,
    drop: Iterable[str] = (),
    add: Optional[Mapping[str, Any]] = None,
    change: Optional[Callable[[dict[str, Any]], None]] = None,
) -> None:
    """Rewrite ``directory/adapter_model.safetensors``: drop keys, add tensors, or edit in place.

    Uses safetensors' torch API (adapter files hold bf16 tensors numpy cannot represent).
    """
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    if change is not None:
        change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_adapter_config(directory: Path, **changes: Any) -> None:
    """Set fields of ``directory/adapter_config.json`` (``None`` deletes a field)."""
    path = directory / "adapter_config.json"
    doc = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    path.write_text(json.dumps(doc, indent=2))


def write_header_only(path: Path, tensors: Mapping[str, tuple[str, Iterable[int]]], metadata: Optional[dict] = None) -> None:
    """A valid safetensors file whose data is all zeros, written sparsely (no tensor bytes on disk).

    ``tensors`` maps key -> (dtype name such as ``"F32"``, shape). Lets tests build bases with
    real model shapes at no cost: only headers are read by the code under test.
    """
    from adapterfmt.constants import DTYPE_BITS

    header: dict[str, Any] = {}
    offset = 0
    for key, (dtype, shape) in tensors.items():
        shape = list(shape)
        n = 1
        for d in shape:
            n *= d
        size = n * DTYPE_BITS[dtype] // 8
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def write_base(directory: Path, tensors: Mapping[str, tuple[str, Iterable[int]]], config: Optional[dict] = None) -> Path:
    """A header-only base model directory: ``model.safetensors`` + ``config.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    write_header_only(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps(config if config is not None else {"tie_word_embeddings": False}))
    return directory


def write_adapter(directory: Path, tensors: Mapping[str, tuple[str, Iterable[int]]], config: Mapping[str, Any]) -> Path:
    """A header-only adapter directory with ``adapter_config.json`` (``peft_type`` LORA added)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_header_only(directory / "adapter_model.safetensors", tensors)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return directory


class CliResult:
    """What a CLI run produced: ``exit_code``, ``stdout``, ``stderr``; ``json()`` parses stdout."""

    def __init__(self, exit_code: int, stdout: str, stderr: str, exception: Optional[BaseException]) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.exception = exception

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-2000:]!r})"


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    """``run_cli("inspect", path, "--json")`` runs the click app in-process (click's CliRunner)."""
    from click.testing import CliRunner

    from adapterfmt_cli.main import cli

    def run(*args: Any) -> CliResult:
        argv = [str(a) for a in args]
        result = CliRunner().invoke(cli, argv)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        if "--json" in argv and result.exit_code in (0, 1) and result.stdout.strip():
            from _schemas import validate_json  # every --json document a test produces meets its published schema

            validate_json(argv[0], json.loads(result.stdout))
        return CliResult(result.exit_code, result.stdout, result.stderr, result.exception)

    return run


def tiny_torch_model():
    """A seeded toy ``nn.Module`` with every layer kind PEFT adapts, a container head and the
    ``model.layers.0.x`` / ``img_model.layers.0.x`` name trap. Module names::

        emb (Embedding 16x8), q (Linear 8->8), conv (Conv2d 2->4, 3x3),
        model.layers.0.x, img_model.layers.0.x (Linear 8->8), classifier.dense, classifier.out_proj
    """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = nn.Linear(8, 8)

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block()])

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(8, 8)
            self.out_proj = nn.Linear(8, 3)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)
            self.q = nn.Linear(8, 8)
            self.conv = nn.Conv2d(2, 4, 3)
            self.model = Stack()
            self.img_model = Stack()
            self.classifier = Head()

    torch.manual_seed(0)
    return Tiny()


#: LoRA configurations over :func:`tiny_torch_model` that together produce every saved key kind.
TINY_PEFT_CONFIGS = {
    "lora-embedding-conv-container": dict(target_modules=["q", "emb", "conv"], modules_to_save=["classifier"]),
    "dora": dict(target_modules=["q", "conv", "emb"], use_dora=True),
    "lora-bias-tokens": dict(target_modules=["q"], lora_bias=True, trainable_token_indices={"emb": [1, 3]}),
    "suffix-trap": dict(target_modules=["q"], modules_to_save=["model.layers.0.x"]),
    "bias-all": dict(target_modules=["q", "model.layers.0.x"], bias="all", modules_to_save=["classifier"]),
}


def tiny_peft_model(name: str, *, adapter_name: str = "default"):
    """``get_peft_model(tiny_torch_model(), LoraConfig(r=2, **TINY_PEFT_CONFIGS[name]))`` with non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_torch_model(), LoraConfig(r=2, lora_alpha=4, **TINY_PEFT_CONFIGS[name]), adapter_name=adapter_name)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key or "lora_embedding_B" in key:
                param.normal_()
    return model
