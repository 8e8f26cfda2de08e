"""Wall time and peak memory of ``adapterfmt merge`` against ``cp -r && sync`` and PEFT, on a TinyLlama-1.1B shape.

Usage::

    python bench/merge.py [--small] [--check] [--rounds N] [--peft-rounds M] [--cache DIR]

Builds once (in ``DIR``, default ``~/.cache/adapterfmt-bench``, outside the repository) with
transformers and PEFT, from a config with random weights:

* a base ``LlamaForCausalLM`` in bf16 — hidden 2048, intermediate 5632, 22 layers, 32 heads / 4
  key-value heads, vocab 32000, untied head (1.1 B parameters, 2.2 GB) — saved in 5 shards;
* an adapter: r=16 on q, k, v, o, gate, up, down (random, non-zero B) plus a full copy of lm_head.

Then it times, each in a fresh process, in ``N`` rounds (default 3): ``cp -r`` of the base (alone,
and followed by ``sync``), ``adapterfmt merge`` (which makes its output durable), and in the first
``M`` rounds (default 1) PEFT's ``merge_and_unload`` + ``save_pretrained``. Every output is
removed, and the filesystem synced, before the next command is timed (deleting the last round's
2.2 GB is not part of any of them). It prints the min and median wall time and peak RSS
(``ru_maxrss`` of the child, read by a small wrapper process) of each, its CPU time (user +
system: what other load on the machine cannot inflate), the ratios against the goals
(adapterfmt <= 2x ``cp -r && sync``, >= 6x faster than PEFT, <= 0.5 GB peak RSS), computed from
the same run, and adapterfmt's own split of its time.
``--check`` then compares every tensor of the two merged outputs, bit for bit.

The machine may be shared: the load average is printed before and after, and the min over rounds
is the figure least disturbed by other work. The page cache cannot be dropped here: the base is
read warm (``cp -r`` runs first and leaves it cached), which is the usual case right after
downloading a model. ``--small`` (hidden 512, 4 layers) runs in under a minute.
"""

from __future__ import annotations

import os
import sys

# bench/inspect.py is named like the standard ``inspect`` module; keep this folder off the import path.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=32000)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARDS = 5
GOALS = {"vs_cp_sync": 2.0, "vs_peft": 6.0, "rss_gb": 0.5}

#: Runs one command and prints its wall time and the peak RSS of its process tree (KiB -> bytes).
WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)\n"
    "wall = time.perf_counter() - t\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': p.returncode, 'wall': wall, 'rss': u.ru_maxrss * 1024, 'cpu': u.ru_utime + u.ru_stime, 'stdout': p.stdout.decode()}))\n"
)

BUILD = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
from huggingface_hub import split_state_dict_into_shards_factory
shape, base, adapter, shards, targets = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
torch.manual_seed(0)
config = LlamaConfig(tie_word_embeddings=False, **shape)
model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
sizes = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
# the smallest shard limit that gives `shards` files, by bisection on huggingface_hub's own planner
lo, hi = 1, sum(sizes.values())
while lo < hi:
    mid = (lo + hi) // 2
    n = len(split_state_dict_into_shards_factory(sizes, get_storage_size=lambda s: s, filename_pattern="m{suffix}", max_shard_size=mid).filename_to_tensors)
    lo, hi = (mid + 1, hi) if n > shards else (lo, mid)
model.save_pretrained(base, max_shard_size=lo)
lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets, modules_to_save=["lm_head"], init_lora_weights=False)
get_peft_model(model, lora).save_pretrained(adapter)
"""

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""


def build(cache: str, small: bool) -> tuple[str, str]:
    """Base and adapter directories, built on first use."""
    name = "tinyllama-small" if small else "tinyllama-1.1b"
    root = os.path.join(cache, name)
    base, adapter = os.path.join(root, "base"), os.path.join(root, "adapter")
    if os.path.isfile(os.path.join(root, "done")):
        return base, adapter
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    print(f"building {name} in {root} (once) ...", file=sys.stderr, flush=True)
    shape = SMALL if small else FULL
    subprocess.run([sys.executable, "-c", BUILD, json.dumps(shape), base, adapter, str(SHARDS), json.dumps(TARGETS)], check=True)
    open(os.path.join(root, "done"), "w").close()
    return base, adapter


def timed(*command: str) -> dict[str, Any]:
    """Wall time and peak RSS of ``command`` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], check=True, stdout=subprocess.PIPE)
    result = json.loads(done.stdout)
    if result["rc"]:
        raise SystemExit(f"{' '.join(command)} failed with exit code {result['rc']}")
    return result


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def compare(ours: str, peft: str) -> str:
    """Every tensor of the two merged outputs, bit for bit."""
    from safetensors import safe_open

    def tensors(directory: str) -> dict[str, tuple[str, str]]:
        return {k: (os.path.join(directory, f), k) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors") for k in safe_open(os.path.join(directory, f), "pt").keys()}

    import torch

    a, b = tensors(ours), tensors(peft)
    if set(a) != set(b):
        return f"key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    bad = []
    for key in a:
        with safe_open(a[key][0], "pt") as fa, safe_open(b[key][0], "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                bad.append(key)
    return f"{len(a)} tensors, {len(bad)} differ" + (f": {bad[:5]}" if bad else " (bit-identical)")


def remove(path: str) -> None:
    """Delete an output before the next command is timed, and sync: on a filesystem mounted with
    ``discard`` the deletion of 2.2 GB is otherwise paid by whichever command comes next."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="hidden 512, 4 layers: under a minute")
    parser.add_argument("--check", action="store_true", help="compare every tensor of adapterfmt's and PEFT's outputs")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of cp / cp && sync / adapterfmt (min and median reported)")
    parser.add_argument("--peft-rounds", type=int, default=1, help="rounds that also run PEFT (it is slow)")
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/adapterfmt-bench"))
    args = parser.parse_args()
    base, adapter = build(args.cache, args.small)
    adapterfmt = shutil.which("adapterfmt") or os.path.join(os.path.dirname(sys.executable), "adapterfmt")
    command = [adapterfmt] if os.path.exists(adapterfmt) else [sys.executable, "-m", "adapterfmt_cli.main"]
    work = tempfile.mkdtemp(prefix="run-", dir=args.cache)  # same filesystem as the base
    try:
        size = du(base)
        print(f"base: {base} ({size / 1e9:.2f} GB), adapter: {adapter} ({du(adapter) / 1e6:.0f} MB); page cache: warm", flush=True)
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores", flush=True)
        rows: dict[str, list[dict[str, Any]]] = {"cp -r": [], "cp -r && sync": [], "adapterfmt merge": [], "PEFT merge_and_unload": []}
        ours, peft = os.path.join(work, "adapterfmt"), os.path.join(work, "peft")
        for round_ in range(max(1, args.rounds)):
            rows["cp -r"].append(timed("cp", "-r", base, os.path.join(work, "cp")))
            remove(os.path.join(work, "cp"))
            rows["cp -r && sync"].append(timed("sh", "-c", f"cp -r '{base}' '{work}/cp' && sync"))
            remove(os.path.join(work, "cp"))
            remove(ours)
            rows["adapterfmt merge"].append(timed(*command, "merge", "--base", base, "--adapter", adapter, "-o", ours, "--quiet", "--json"))
            if round_ < args.peft_rounds:
                remove(peft)
                rows["PEFT merge_and_unload"].append(timed(sys.executable, "-c", PEFT_MERGE, base, adapter, peft))
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]['wall']:.2f} s" for k, v in rows.items() if len(v) > round_), flush=True)
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        def stat(name: str, key: str, how: Any) -> float:
            return float(how([r[key] for r in rows[name]]))

        print(f"\n{'':24}{'min s':>8}{'median s':>10}{'CPU s':>8}{'peak RSS MB':>13}{'GB/s':>7}{'runs':>6}")
        for name, runs in rows.items():
            if runs:
                best = stat(name, "wall", min)
                cpu = stat(name, "cpu", min)
                print(f"{name:24}{best:8.2f}{stat(name, 'wall', statistics.median):10.2f}{cpu:8.2f}{stat(name, 'rss', max) / 1e6:13.0f}{size / best / 1e9:7.2f}{len(runs):6}")
        for how, label in ((min, "min"), (statistics.median, "median")):
            af, sync = stat("adapterfmt merge", "wall", how), stat("cp -r && sync", "wall", how)
            print(
                f"\n[{label}] adapterfmt / cp -r && sync {af / sync:6.2f}x  (goal <= {GOALS['vs_cp_sync']}x: {'met' if af / sync <= GOALS['vs_cp_sync'] else 'MISSED'})"
                f"\n[{label}] adapterfmt / cp -r         {af / stat('cp -r', 'wall', how):6.2f}x  (no sync: the copy may still sit in the page cache)"
            )
            if rows["PEFT merge_and_unload"]:  # --peft-rounds 0 skips PEFT
                pf = stat("PEFT merge_and_unload", "wall", how)
                print(f"[{label}] PEFT / adapterfmt          {pf / af:6.1f}x  (goal >= {GOALS['vs_peft']}x: {'met' if pf / af >= GOALS['vs_peft'] else 'MISSED'})")
        rss = stat("adapterfmt merge", "rss", max) / 1e9
        print(f"\nadapterfmt peak RSS (max over runs) {rss:6.2f} GB (goal <= {GOALS['rss_gb']} GB: {'met' if rss <= GOALS['rss_gb'] else 'MISSED'})")
        summary = json.loads(rows["adapterfmt merge"][0]["stdout"])
        print("adapterfmt time split (s, first run): " + ", ".join(f"{k} {v:.2f}" for k, v in summary.get("timings", {}).items()))
        print(f"adapterfmt: {summary.get('tensors_merged')} merged, {summary.get('tensors_replaced')} replaced, {summary.get('tensors_copied')} copied")
        if args.check and rows["PEFT merge_and_unload"]:
            print("check: " + compare(ours, peft))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
