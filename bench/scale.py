"""Cost against adapter size: inspect / check / plan time per 1,000 modules, and a 200k-tensor header.

Usage::

    python bench/scale.py [--sizes 1000,10000,30000] [--header-tensors 200000] [--runs 3] [--cache DIR]

Builds once (in ``DIR``, default ``<tmp>/adapterfmt-scale``) MoE-style adapters of N LoRA modules
(``model.layers.{i}.mlp.experts.{j}.w{1,2,3}``, tiny 4x4 tensors) whose ``target_modules`` lists
every module path, as ``adapterfmt convert`` writes it, with a ``rank_pattern`` of anchored
escaped paths for one module in ten, plus a base model holding each module's weight. Then, in
this process (median of ``--runs``):

* ``inspect``: ``read_adapter`` + ``inspect_report`` (what ``adapterfmt inspect`` does);
* ``check``: ``read_base`` + ``resolve`` + ``check_document``;
* ``plan``: ``plan_merge`` (headers only);

timed as this thread's CPU time (``time.thread_time``), which other processes move less than wall time;
and prints the time per 1,000 modules at each size, with the ratio to the smallest size (the
baseline of the same run: flat is 1.0; the goal is within 1.5). It also runs the whole
``adapterfmt inspect --json`` process on the largest adapter (goal <= 3 s) and on a
safetensors file of ``--header-tensors`` tensors, printing parse time, the peak of Python
allocations while parsing (tracemalloc) and the child's peak RSS (goals: <= 3 s, <= 300 MB),
against ``json.loads`` of the same header bytes and a bare ``python -c pass`` from the same run.
A child's peak RSS is its own ``VmHWM`` (Linux; ``ru_maxrss`` elsewhere), read at exit: the
``ru_maxrss`` a parent gets from ``wait4`` would count the pages of this (large) process it was
forked from. On a shared machine, read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = (4, 4)
RANK = 1


def module_names(n: int) -> list[str]:
    names = []
    layer = 0
    while len(names) < n:
        for expert in range(64):
            for w in ("w1", "w2", "w3"):
                names.append(f"model.layers.{layer}.mlp.experts.{expert}.{w}")
        layer += 1
    return names[:n]


def write_safetensors(path: str, entries: list[tuple[str, str, list[int], int]]) -> None:
    """Write key/dtype/shape/nbytes entries with zero data (streamed, no big buffers)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    os.replace(path + ".tmp", path)


def build(cache: str, n: int) -> tuple[str, str]:
    """``(adapter_dir, base_dir)`` for ``n`` modules, built once."""
    adapter, base = os.path.join(cache, f"adapter-{n}"), os.path.join(cache, f"base-{n}")
    if os.path.exists(os.path.join(adapter, "adapter_model.safetensors")) and os.path.exists(os.path.join(base, "model.safetensors")):
        return adapter, base
    names = module_names(n)
    os.makedirs(adapter, exist_ok=True)
    os.makedirs(base, exist_ok=True)
    odd = names[::10]
    odd_set = set(odd)
    entries = []
    for m in names:
        r = 2 if m in odd_set else RANK
        entries.append((f"base_model.model.{m}.lora_A.weight", "F32", [r, SHAPE[1]], r * SHAPE[1] * 4))
        entries.append((f"base_model.model.{m}.lora_B.weight", "F32", [SHAPE[0], r], SHAPE[0] * r * 4))
    write_safetensors(os.path.join(adapter, "adapter_model.safetensors"), entries)
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 2,
        "target_modules": sorted(names),
        "rank_pattern": {"^" + re.escape(m): 2 for m in odd},
        "task_type": "CAUSAL_LM",
    }
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(base, "model.safetensors"), [(f"{m}.weight", "F32", list(SHAPE), 64) for m in names])
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump({"model_type": "mixtral", "tie_word_embeddings": False}, f)
    return adapter, base


def timed(fn, runs: int) -> float:
    """Median CPU seconds of this thread (less moved by other processes than wall time)."""
    times = []
    for _ in range(runs):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def bench_sizes(cache: str, sizes: list[int], runs: int) -> dict[int, dict[str, float]]:
    from adapterfmt.base.reading import read_base
    from adapterfmt.formats.peft.reading import read_adapter
    from adapterfmt.merging.plan import plan_merge
    from adapterfmt.base.resolution import resolve
    from adapterfmt.reports.check import check_document
    from adapterfmt.reports.inspect import inspect_report

    out = {}
    for n in sizes:
        adapter, base = build(cache, n)

        def do_inspect() -> None:
            inspect_report(read_adapter(adapter), source=adapter).as_dict()

        def do_check() -> None:
            ckpt, b = read_adapter(adapter), read_base(base)
            check_document(resolve(ckpt, b), adapter=adapter, base=base).as_dict()

        def do_plan() -> None:
            plan_merge(read_base(base), [read_adapter(adapter)])

        out[n] = {name: timed(fn, runs) for name, fn in (("inspect", do_inspect), ("check", do_check), ("plan", do_plan))}
    return out


_PEAK = """
import atexit, os, resource, sys
def _peak():
    kb = None
    try:  # VmHWM: this process's own peak (ru_maxrss would include the forking parent's pages)
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    sys.stderr.write(f"\\nPEAK_RSS_KB {kb}\\n")
    sys.stderr.flush()
atexit.register(_peak)
_os_exit = os._exit
def _exit_after_peak(code):  # the console script may leave by os._exit, which skips atexit
    _peak()
    _os_exit(code)
os._exit = _exit_after_peak
"""


def child_rss(args: list[str]) -> tuple[float, float, int]:
    """``(wall s, peak RSS MB, exit code)`` of one fresh Python process running ``args``' code."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert args[1] == "-c"
    args = [args[0], "-c", _PEAK + args[2], *args[3:]]
    start = time.perf_counter()
    proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    wall = time.perf_counter() - start
    peak = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    return wall, (peak[-1] / 1024 if peak else float("nan")), proc.returncode


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from adapterfmt_cli.main import main; main(sys.argv[1:])", *args]


def bench_header(cache: str, n: int, runs: int) -> dict[str, float]:
    from adapterfmt.storage.header import read_header

    adapter = os.path.join(cache, f"header-{n}")
    path = os.path.join(adapter, "adapter_model.safetensors")
    if not os.path.exists(path):
        os.makedirs(adapter, exist_ok=True)
        entries = []
        for m in module_names(n // 2):
            entries.append((f"base_model.model.{m}.lora_A.weight", "F32", [RANK, SHAPE[1]], RANK * SHAPE[1] * 4))
            entries.append((f"base_model.model.{m}.lora_B.weight", "F32", [SHAPE[0], RANK], SHAPE[0] * RANK * 4))
        write_safetensors(path, entries)
        with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": 2, "target_modules": ["w1", "w2", "w3"]}, f)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
    parse = timed(lambda: read_header(path), runs)
    floor = timed(lambda: json.loads(raw), runs)
    tracemalloc.start()
    read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    python = statistics.median(child_rss([sys.executable, "-c", "pass"])[0] for _ in range(runs))
    python_rss = child_rss([sys.executable, "-c", "pass"])[1]
    runs_json = [child_rss(cli("inspect", adapter, "--json")) for _ in range(runs)]
    return {
        "header_mb": size / 2**20,
        "parse_s": parse,
        "json_loads_s": floor,
        "parse_peak_mb": peak / 2**20,
        "inspect_json_s": statistics.median(r[0] for r in runs_json),
        "inspect_json_rss_mb": max(r[1] for r in runs_json),
        "inspect_json_exit": max(r[2] for r in runs_json),
        "python_s": python,
        "python_rss_mb": python_rss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,30000")
    ap.add_argument("--header-tensors", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "adapterfmt-scale"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    os.makedirs(args.cache, exist_ok=True)

    results = bench_sizes(args.cache, sizes, args.runs)
    first = sizes[0]
    print("in-process CPU seconds (thread time), median of --runs:")
    print(f"{'modules':>8} " + " ".join(f"{c + ' s':>10} {'per 1k':>8} {'ratio':>6}" for c in ("inspect", "check", "plan")))
    for n in sizes:
        cells = []
        for c in ("inspect", "check", "plan"):
            per = results[n][c] / n * 1000
            base = results[first][c] / first * 1000
            cells.append(f"{results[n][c]:10.3f} {per:8.4f} {per / base:6.2f}")
        print(f"{n:8d} " + " ".join(cells))
    worst = max(results[n][c] / n / (results[first][c] / first) for n in sizes for c in ("inspect", "check", "plan"))
    print(f"time per 1,000 modules, worst ratio to {first} modules: {worst:.2f} (goal <= 1.5)")

    largest = max(sizes)
    adapter, _ = build(args.cache, largest)
    wall = statistics.median(child_rss(cli("inspect", adapter, "--json"))[0] for _ in range(args.runs))
    print(f"whole-process inspect --json of {largest} modules: {wall:.2f} s (goal <= 3 s)")

    h = bench_header(args.cache, args.header_tensors, args.runs)
    print(
        f"header of {args.header_tensors} tensors ({h['header_mb']:.1f} MB): read_header {h['parse_s']:.2f} s "
        f"({h['parse_s'] / h['json_loads_s']:.1f}x json.loads {h['json_loads_s']:.2f} s), "
        f"peak Python allocations {h['parse_peak_mb']:.0f} MB ({h['parse_peak_mb'] / h['header_mb']:.1f}x the header)"
    )
    print(
        f"whole-process inspect --json: {h['inspect_json_s']:.2f} s (python -c pass {h['python_s']:.2f} s, {h['python_rss_mb']:.0f} MB), "
        f"peak RSS {h['inspect_json_rss_mb']:.0f} MB, exit {h['inspect_json_exit']} (goals <= 3 s, <= 300 MB)"
    )


if __name__ == "__main__":
    main()
