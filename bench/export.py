"""Wall time and peak memory of ``adapterfmt export`` against llama.cpp's converter and ``cp -r && sync``.

Usage::

    python bench/export.py [--small] [--rounds N] [--cache DIR]

Uses bench/merge.py's TinyLlama-1.1B shape (built once in ``DIR``, default
``~/.cache/adapterfmt-bench``): a bf16 base in 5 shards and an r=16 adapter on q, k, v, o, gate,
up, down with a full copy of lm_head. Times, each in a fresh process, ``N`` rounds (default 3):

* GGUF: llama.cpp's ``convert_lora_to_gguf.py`` (from ``.oracles/``, scripts/fetch_serving_oracles.py)
  against ``adapterfmt export --for llama.cpp`` on the adapter without its lm_head copy (the
  converter refuses full copies); goal: adapterfmt <= 1/3 of the converter's time;
* serving base: ``cp -r BASE && sync`` against ``adapterfmt export --for vllm --base-out`` (the
  lm_head copy baked); goals: <= 2x ``cp -r && sync``, peak RSS <= 0.5 GB.

Prints min and median wall time, peak RSS, CPU time and the ratios from the same run.
"""

from __future__ import annotations

import os
import sys

# bench/inspect.py is named like the standard ``inspect`` module; keep this folder off the import path.
HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == HERE:
    del sys.path[0]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

ROOT = os.path.dirname(HERE)
GOALS = {"gguf_vs_converter": 1 / 3, "base_vs_cp_sync": 2.0, "rss_gb": 0.5}


def _merge_bench():
    spec = importlib.util.spec_from_file_location("adapterfmt_bench_merge", os.path.join(HERE, "merge.py"))
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _without_full_copy(adapter: str, into: str) -> str:
    """The benchmark adapter less its lm_head copy (what llama.cpp's converter accepts)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = os.path.join(into, "adapter-lora-only")
    if os.path.isfile(os.path.join(out, "adapter_model.safetensors")):
        return out
    os.makedirs(out, exist_ok=True)
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".lora_" in k}
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    doc = json.load(open(os.path.join(adapter, "adapter_config.json")))
    doc["modules_to_save"] = None
    json.dump(doc, open(os.path.join(out, "adapter_config.json"), "w"))
    return out


def _remove(bench, path: str) -> None:
    if os.path.isfile(path):
        os.remove(path)
        os.sync()
    else:
        bench.remove(path)


def _summary(runs: list[dict]) -> dict:
    walls = [r["wall"] for r in runs]
    return {"min": min(walls), "median": statistics.median(walls), "rss_gb": max(r["rss"] for r in runs) / 1e9, "cpu": min(r["cpu"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/adapterfmt-bench"))
    args = parser.parse_args()
    bench = _merge_bench()
    base, adapter = bench.build(args.cache, args.small)
    lora_only = _without_full_copy(adapter, os.path.dirname(adapter))
    converter = os.path.join(ROOT, ".oracles", "llama.cpp", "convert_lora_to_gguf.py")
    if not os.path.isfile(converter):
        raise SystemExit("llama.cpp's converter is missing: run python scripts/fetch_serving_oracles.py")
    cli = os.path.join(os.path.dirname(sys.executable), "adapterfmt")
    print(f"load average before: {os.getloadavg()}")
    results: dict[str, list[dict]] = {"converter": [], "export_gguf": [], "cp_sync": [], "export_base": []}
    work = tempfile.mkdtemp(prefix="adapterfmt-bench-export-")
    try:
        for _ in range(args.rounds):
            out = os.path.join(work, "a.gguf")
            env_py = ["env", f"PYTHONPATH={os.path.dirname(converter)}", "HF_HUB_OFFLINE=1", sys.executable]
            results["converter"].append(bench.timed(*env_py, converter, "--base", base, "--outfile", out, "--outtype", "f32", lora_only))
            _remove(bench, out)
            results["export_gguf"].append(bench.timed(cli, "export", "--adapter", lora_only, "--for", "llama.cpp", "--base", base, "-o", out))
            _remove(bench, out)
            copy = os.path.join(work, "copy")
            results["cp_sync"].append(bench.timed("sh", "-c", f"cp -r '{base}' '{copy}' && sync"))
            bench.remove(copy)
            served, serving = os.path.join(work, "vllm"), os.path.join(work, "serving")
            results["export_base"].append(bench.timed(cli, "export", "--adapter", adapter, "--for", "vllm", "-o", served, "--base", base, "--base-out", serving))
            bench.remove(served)
            bench.remove(serving)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s = {k: _summary(v) for k, v in results.items()}
    for k, v in s.items():
        print(f"{k:12s} min {v['min']:7.2f} s  median {v['median']:7.2f} s  cpu {v['cpu']:7.2f} s  peak RSS {v['rss_gb']:.2f} GB")
    gguf = s["export_gguf"]["min"] / s["converter"]["min"]
    based = s["export_base"]["min"] / s["cp_sync"]["min"]
    print(f"GGUF export / converter: {gguf:.3f} (goal <= {GOALS['gguf_vs_converter']:.3f})")
    print(f"serving base / cp -r && sync: {based:.2f} (goal <= {GOALS['base_vs_cp_sync']})")
    print(f"serving base peak RSS: {s['export_base']['rss_gb']:.2f} GB (goal <= {GOALS['rss_gb']})")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
