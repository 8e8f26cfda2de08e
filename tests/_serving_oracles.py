"""The serving engines' own code as test oracles, from ``.oracles/`` (scripts/fetch_serving_oracles.py).

vLLM: ``PEFTHelper`` is run from ``vllm/lora/peft_helper.py`` of the pinned wheel, executed as a
module whose only two vLLM imports (``vllm.config.lora.LoRAConfig``, of which ``validate_legal``
reads ``max_lora_rank``, and ``vllm.logger.init_logger``) are given stand-ins: importing the
real ones pulls in vLLM's runtime (CUDA kernels, its own torch pin). ``parse_fine_tuned_lora_name``
is the function's own source cut out of ``vllm/lora/utils.py`` with ``ast`` and executed alone
(it uses nothing but ``str``). Nothing of either is rewritten.

llama.cpp: ``convert_lora_to_gguf.py`` run as a subprocess, offline, with its own ``conversion/``
package and gguf-py.
"""

from __future__ import annotations

import ast
import logging
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
ORACLES = ROOT / ".oracles"
FETCH = "run `python scripts/fetch_serving_oracles.py` (README's test command does)"


def _oracle_dir(name: str) -> Path:
    folder = ORACLES / name
    if not (folder / "VERSION").is_file():
        raise RuntimeError(f"{folder} is missing: {FETCH}")
    return folder


@dataclass
class _LoRAConfigStandIn:
    """``vllm.config.lora.LoRAConfig``: ``validate_legal`` reads ``max_lora_rank`` only."""

    max_lora_rank: int = 16


class _Logger(logging.LoggerAdapter):
    def info_once(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.info(msg, *args)

    def warning_once(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.warning(msg, *args)


def vllm_peft_helper() -> Any:
    """vLLM's ``PEFTHelper`` class, and the ``LoRAConfig`` stand-in as ``PEFTHelper.LoRAConfig``."""
    source = (_oracle_dir("vllm") / "vllm" / "lora" / "peft_helper.py").read_text()
    config_mod = types.ModuleType("vllm.config.lora")
    config_mod.LoRAConfig = _LoRAConfigStandIn  # type: ignore[attr-defined]
    logger_mod = types.ModuleType("vllm.logger")
    logger_mod.init_logger = lambda name: _Logger(logging.getLogger(name), {})  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("vllm", "vllm.config", "vllm.config.lora", "vllm.logger")}
    sys.modules.update({"vllm": types.ModuleType("vllm"), "vllm.config": types.ModuleType("vllm.config"), "vllm.config.lora": config_mod, "vllm.logger": logger_mod})
    try:
        module = types.ModuleType("vllm_peft_helper_oracle")
        module.__file__ = str(_oracle_dir("vllm") / "vllm" / "lora" / "peft_helper.py")
        sys.modules[module.__name__] = module  # dataclasses resolve annotations through sys.modules
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    helper = module.PEFTHelper
    helper.LoRAConfig = _LoRAConfigStandIn
    return helper


def vllm_parse_lora_name() -> Callable[[str], tuple[str, bool]]:
    """vLLM's ``parse_fine_tuned_lora_name`` (its source, cut out of ``vllm/lora/utils.py``)."""
    path = _oracle_dir("vllm") / "vllm" / "lora" / "utils.py"
    tree = ast.parse(path.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "parse_fine_tuned_lora_name"]
    module = ast.Module(body=[fn], type_ignores=[])
    namespace: dict[str, Any] = {}
    exec(compile(module, str(path), "exec"), namespace)
    return namespace["parse_fine_tuned_lora_name"]


def vllm_accepts(adapter_dir: str, *, max_lora_rank: int) -> None:
    """What vLLM does when it loads a LoRA directory, up to its tensors: ``PEFTHelper.from_local_dir``,
    ``validate_legal`` and every tensor name through ``parse_fine_tuned_lora_name`` (``lora_model.py``
    refuses names it cannot parse). Raises ValueError as vLLM does."""
    from safetensors import safe_open

    helper = vllm_peft_helper()
    peft_helper = helper.from_local_dir(adapter_dir, max_position_embeddings=None)
    peft_helper.validate_legal(helper.LoRAConfig(max_lora_rank=max_lora_rank))
    parse = vllm_parse_lora_name()
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".base_layer.weight") and any(n in key for n in ("embed_tokens", "lm_head")):
                continue  # lora_model.py skips these (is_base_embedding_weights)
            parse(key)


def llama_cpp_convert(adapter_dir: str, base_dir: str, outfile: str, outtype: str = "f32") -> subprocess.CompletedProcess:
    """llama.cpp's ``convert_lora_to_gguf.py``, offline, with its bundled gguf-py."""
    folder = _oracle_dir("llama.cpp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(folder)}
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(folder / "convert_lora_to_gguf.py"), "--base", base_dir, "--outfile", outfile, "--outtype", outtype, adapter_dir]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(folder))


def read_gguf(path: str) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...], Any]]]:
    """``(metadata key -> value, tensor name -> (type, shape, raw numpy data))`` of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    kv = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        kv[name] = field.contents()
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), t.data.copy()) for t in reader.tensors}
    return kv, tensors


_DRIVER = r"""
import json, runpy, sys, traceback
jobs = json.loads(sys.argv[1])
script = sys.argv[2]
results = []
for args in jobs:
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        results.append(0)
    except SystemExit as e:
        results.append(int(e.code or 0))
    except Exception:
        traceback.print_exc()
        results.append(1)
print("RESULTS " + json.dumps(results))
"""


def llama_cpp_convert_many(jobs: list[tuple[str, str, str, str]]) -> list[int]:
    """Run the converter on each ``(adapter_dir, base_dir, outfile, outtype)`` in one fresh process
    (torch and transformers are imported once); the exit status of each run."""
    import json

    folder = _oracle_dir("llama.cpp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(folder)}
    env.pop("NO_LOCAL_GGUF", None)
    args = [["--base", b, "--outfile", o, "--outtype", t, a] for a, b, o, t in jobs]
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(args), str(folder / "convert_lora_to_gguf.py")], env=env, capture_output=True, text=True, cwd=str(folder)
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the converter driver failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULTS "):])
