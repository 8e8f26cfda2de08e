"""Fetch the serving engines' own code that the export tests compare against, into ``.oracles/``.

Two oracles cannot be ordinary entries of the ``test`` extra, because installing them would move
torch or compile C++ (pyproject's test extra says so):

- vLLM ``VLLM_VERSION``: the wheel is downloaded with ``pip download --no-deps`` and only
  ``vllm/lora/peft_helper.py`` and ``vllm/lora/utils.py`` are extracted; ``tests/_serving_oracles.py``
  runs ``PEFTHelper`` and ``parse_fine_tuned_lora_name`` from them (vLLM's runtime is not needed).
- llama.cpp's ``convert_lora_to_gguf.py`` with its ``conversion/`` package and gguf-py, from the
  ``llama-cpp-python`` ``LLAMA_CPP_PYTHON_VERSION`` sdist (``pip download --no-deps --no-binary :all:``);
  the tests run it offline as a subprocess (torch, transformers, numpy and its gguf-py only).

Idempotent: a folder whose ``VERSION`` file matches is kept. Run with the project's venv python.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VLLM_VERSION = "0.33.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parents[1]
ORACLES = ROOT / ".oracles"
VLLM_FILES = ("vllm/lora/peft_helper.py", "vllm/lora/utils.py")
LLAMA_PARTS = ("convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def _current(folder: Path, version: str) -> bool:
    return (folder / "VERSION").is_file() and (folder / "VERSION").read_text().strip() == version


def _download(args: list[str], into: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *args, "-d", into], check=True)
    (found,) = list(Path(into).iterdir())
    return found


def fetch_vllm() -> Path:
    folder = ORACLES / "vllm"
    if _current(folder, VLLM_VERSION):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download([f"vllm=={VLLM_VERSION}", "--only-binary", ":all:"], tmp)
        with zipfile.ZipFile(wheel) as z:
            for name in VLLM_FILES:
                target = folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    (folder / "VERSION").write_text(VLLM_VERSION + "\n")
    return folder


def fetch_llama_cpp() -> Path:
    folder = ORACLES / "llama.cpp"
    if _current(folder, LLAMA_CPP_PYTHON_VERSION):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _download([f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "--no-binary", ":all:"], tmp)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name[len(prefix):] if member.name.startswith(prefix) else None
                if rel and member.isfile() and any(rel == p or rel.startswith(p) for p in LLAMA_PARTS):
                    target = folder / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None
                    target.write_bytes(source.read())
    (folder / "VERSION").write_text(LLAMA_CPP_PYTHON_VERSION + "\n")
    return folder


if __name__ == "__main__":
    print(fetch_vllm())
    print(fetch_llama_cpp())
