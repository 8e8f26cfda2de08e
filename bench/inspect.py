"""Whole-process wall time of ``adapterfmt inspect`` on a 154-module adapter, against ``python -c pass``.

Usage::

    python bench/inspect.py [--runs 21] [--cache DIR]

Builds once (in ``DIR``, default ``<tmp>/adapterfmt-bench``, outside the repository) a
TinyLlama-shaped LoRA adapter: 22 layers x 7 projections = 154 modules, r=16, float32, about
50 MB, written with safetensors like any adapter. Then it runs ``adapterfmt inspect DIR`` (table
and ``--json``) and ``python -c pass`` in fresh processes, interleaved, and prints the medians,
the difference (what inspect costs beyond starting Python) and the ratio, and how both compare
with the 0.1 s goal. CPU times are printed too: on a busy machine they move less than wall times.

Children run with bytecode caching on (``PYTHONPYCACHEPREFIX`` under ``DIR``) and one warm-up
run each, as an installed package would: compiling the sources on every run would be measured
otherwise when the shell sets ``PYTHONDONTWRITEBYTECODE``.
"""

import os
import sys

# This file is named like the standard ``inspect`` module; keep its folder off the import path.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

#: TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 4 key/value heads of 64.
HIDDEN, INTERMEDIATE, LAYERS, KV = 2048, 5632, 22, 256
RANK, ALPHA = 16, 32
#: projection -> (in_features, out_features)
PROJECTIONS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}
GOAL_S = 0.1


def build_adapter(directory: str) -> None:
    """Write the benchmark adapter to ``directory`` (staged, then renamed into place)."""
    import numpy as np
    from safetensors.numpy import save_file

    if os.path.isfile(os.path.join(directory, "adapter_model.safetensors")):
        return
    tensors = {}
    for layer in range(LAYERS):
        for proj, (fan_in, fan_out) in PROJECTIONS.items():
            key = f"base_model.model.model.layers.{layer}.{proj}"
            tensors[f"{key}.lora_A.weight"] = np.zeros((RANK, fan_in), dtype=np.float32)
            tensors[f"{key}.lora_B.weight"] = np.zeros((fan_out, RANK), dtype=np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "r": RANK,
        "lora_alpha": ALPHA,
        "target_modules": sorted(p.split(".")[1] for p in PROJECTIONS),
        "bias": "none",
    }
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".stage-", dir=os.path.dirname(directory))
    try:
        save_file(tensors, os.path.join(stage, "adapter_model.safetensors"))
        with open(os.path.join(stage, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        os.replace(stage, directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def adapterfmt_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m``."""
    script = os.path.join(os.path.dirname(sys.executable), "adapterfmt")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "adapterfmt_cli.main"]


def wall(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one fresh process; CPU time is less disturbed by a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="fresh processes per command (default 21)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "adapterfmt-bench"), help="where the adapter is built")
    args = parser.parse_args()

    adapter = os.path.join(args.cache, "tinyllama-lora-r16-154")
    build_adapter(adapter)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(args.cache, "pycache")

    tool = adapterfmt_command()
    doc = json.loads(subprocess.run(tool + ["inspect", adapter, "--json"], env=env, check=True, capture_output=True, text=True).stdout)
    modules = doc["totals"]["lora_modules"]
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "adapterfmt inspect": tool + ["inspect", adapter],
        "adapterfmt inspect --json": tool + ["inspect", adapter, "--json"],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for cmd in commands.values():  # warm-up: bytecode cache, page cache
        wall(cmd, env)
    for _ in range(args.runs):
        for name, cmd in commands.items():
            times[name].append(wall(cmd, env))

    size_mb = os.path.getsize(os.path.join(adapter, "adapter_model.safetensors")) / 1e6
    print(f"adapter: {adapter} ({modules} LoRA modules, {size_mb:.1f} MB)")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"{args.runs} fresh processes per command; median wall (min .. max), median CPU")
    base_wall = statistics.median(w for w, _ in times["python -c pass"])
    base_cpu = statistics.median(c for _, c in times["python -c pass"])
    for name, ts in times.items():
        walls = [w for w, _ in ts]
        med, cpu = statistics.median(walls), statistics.median(c for _, c in ts)
        extra = "" if name.startswith("python") else (
            f"  +{med - base_wall:.3f} s wall over python (ratio {med / base_wall:.2f}x), +{cpu - base_cpu:.3f} s CPU"
        )
        print(f"  {name:26s} {med:.3f} s ({min(walls):.3f} .. {max(walls):.3f}) CPU {cpu:.3f} s{extra}")
    inspect_wall = statistics.median(w for w, _ in times["adapterfmt inspect"])
    over = inspect_wall - base_wall
    print(f"goal {GOAL_S} s: whole process {inspect_wall:.3f} s ({'met' if inspect_wall <= GOAL_S else 'not met'}); "
          f"beyond starting Python {over:.3f} s ({'met' if over <= GOAL_S else 'not met'})")


if __name__ == "__main__":
    main()
