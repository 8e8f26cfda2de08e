"""``adapterfmt extract`` against mergekit 0.1.5 on CPU, and ``adapterfmt verify-merge`` against ``cat`` of its inputs.

Usage::

    python bench/extract_verify.py [--layers N] [--rank R] [--cache DIR] [--skip-mergekit] [--skip-auto]

Builds once (in ``DIR``, default ``~/.cache/adapterfmt-bench``, outside the repository) a bf16
``LlamaForCausalLM`` of the TinyLlama-1.1B shape (hidden 2048, intermediate 5632, 32 / 4 heads,
vocab 32000, untied; ``--layers`` of its 22 layers, default 22) and a fine-tune of it where
**every linear** changed: a rank-64 update plus dense noise at 5% of its norm (the spectrum of a
full fine-tune: a strong head, a flat tail); embeddings, norms and head unchanged. Then, each in
a fresh process, one run of:

* ``adapterfmt extract --rank R --svd randomized`` and ``--svd auto`` (the default: the
  randomized SVD certified within the bf16 rounding of the optimum, BEHAVIOUR §10.2, the exact
  SVD where it cannot be; the modules of each method are printed);
* ``mergekit-extract-lora --max-rank R`` (full ``torch.linalg.svd`` per module), unless skipped;
* ``cat`` of the base, adapter and merged files into ``wc -c`` (a pipe, so that the bytes are
  really read: ``cat > /dev/null`` may splice without reading; twice, the faster kept: a warm
  page cache, as verify-merge then finds it), and ``adapterfmt verify-merge`` of
  ``adapterfmt merge``'s output (a PEFT r=16 adapter on every linear, from the build step).

It prints wall time, CPU time and peak RSS of each, the ratios (extract vs mergekit, goal >= 10x
faster and RSS <= 1 GB; verify-merge vs cat, goal <= 2x and RSS <= 0.5 GB) from the same run, and
the per-module relative errors of adapterfmt and mergekit (mean and worst of adapterfmt's
excess over mergekit's). The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import os
import sys

# ``python bench/extract_verify.py`` puts bench/ first on sys.path, where bench/inspect.py would
# shadow the standard library's inspect.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
BIN = os.path.dirname(sys.executable)

WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)\n"
    "wall = time.perf_counter() - t\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': p.returncode, 'wall': wall, 'rss': u.ru_maxrss * 1024, 'cpu': u.ru_utime + u.ru_stime, 'stdout': p.stdout.decode()}))\n"
)

BUILD = """
import json, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
shape, root = json.loads(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = LlamaForCausalLM._from_config(LlamaConfig(tie_word_embeddings=False, **shape), dtype=torch.bfloat16)
model.save_pretrained(root + "/base", max_shard_size="1GB")
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            m, n = p.shape
            low = (torch.randn(m, 64, generator=g) @ torch.randn(64, n, generator=g)) * (0.02 / (64 * n) ** 0.5 * n ** 0.5)
            noise = torch.randn(m, n, generator=g)
            noise *= 0.05 * low.norm() / noise.norm()
            p.add_((low + noise).to(p.dtype))
model.save_pretrained(root + "/tuned", max_shard_size="1GB")
torch.manual_seed(0)
base = LlamaForCausalLM._from_config(LlamaConfig(tie_word_embeddings=False, **shape), dtype=torch.bfloat16)
lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
get_peft_model(base, lora).save_pretrained(root + "/adapter")
"""

ERRORS = """
import json, sys, torch
from safetensors import safe_open
from safetensors.torch import load_file
import glob
def tensors(d):
    out = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = (f, k)
    return out
def get(index, key):
    f, k = index[key]
    with safe_open(f, "pt") as h:
        return h.get_tensor(k).float()
base, tuned, mk, ours = sys.argv[1:5]
B, T = tensors(base), tensors(tuned)
doc = json.load(open(ours))
cfg = json.load(open(mk + "/adapter_config.json"))
ad = load_file(mk + "/adapter_model.safetensors")
rows = []
for m in doc["modules"]:
    key = m["module"] + ".weight"
    d = get(T, key) - get(B, key)
    a = ad["base_model.model." + m["module"] + ".lora_A.weight"].float()
    b = ad["base_model.model." + m["module"] + ".lora_B.weight"].float()
    r = a.shape[0]
    alpha = cfg.get("alpha_pattern", {}).get(m["module"].rsplit(".", 1)[-1], cfg["lora_alpha"])
    err = float((d - (alpha / r) * (b @ a)).double().norm() / d.double().norm())
    rows.append((m["module"], m["relative_error"], err))
print(json.dumps(rows))
"""


def timed(*command: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], check=True, stdout=subprocess.PIPE)
    result = json.loads(done.stdout)
    if result["rc"]:
        raise SystemExit(f"{' '.join(command)} failed with exit code {result['rc']}")
    return result


def line(name: str, r: dict[str, Any]) -> str:
    return f"{name:<34} wall {r['wall']:8.2f} s  cpu {r['cpu']:8.2f} s  peak RSS {r['rss'] / 2**30:6.2f} GB"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/adapterfmt-bench"))
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--skip-auto", action="store_true", help="only --svd randomized")
    a = p.parse_args()
    root = os.path.join(a.cache, f"extract-{a.layers}")
    if not os.path.isfile(os.path.join(root, "done")):
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        print(f"building the {a.layers}-layer fine-tune in {root} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-c", BUILD, json.dumps({**SHAPE, "num_hidden_layers": a.layers}), root], check=True)
        open(os.path.join(root, "done"), "w").close()
    base, tuned, adapter = (os.path.join(root, n) for n in ("base", "tuned", "adapter"))
    print(f"load average before: {os.getloadavg()}")
    work = tempfile.mkdtemp(prefix="bench-extract-", dir=a.cache)
    try:
        af = os.path.join(BIN, "adapterfmt")
        res = {}
        modes = ("randomized",) if a.skip_auto else ("randomized", "auto")
        for svd in modes:
            out = os.path.join(work, f"ours-{svd}")
            res[svd] = timed(af, "extract", "--base", base, "--tuned", tuned, "-o", out, "--rank", str(a.rank), "--svd", svd, "--json")
            totals = json.loads(res[svd]["stdout"])["totals"]
            print(line(f"adapterfmt extract --svd {svd}", res[svd]) + f"  ({totals['randomized']} randomized, {totals['exact']} exact)")
            with open(os.path.join(work, f"ours-{svd}.json"), "w") as f:
                f.write(res[svd]["stdout"])
        if not a.skip_mergekit:
            mk = os.path.join(work, "mergekit")
            res["mergekit"] = timed(os.path.join(BIN, "mergekit-extract-lora"), "--model", tuned, "--base-model", base, "--out-path", mk, "--max-rank", str(a.rank), "--no-copy-tokenizer")
            print(line("mergekit-extract-lora", res["mergekit"]))
            for svd in modes:
                print(f"  extract --svd {svd}: {res['mergekit']['wall'] / res[svd]['wall']:.2f}x faster than mergekit (goal >= 10x), RSS {res[svd]['rss'] / 2**30:.2f} GB (goal <= 1 GB)")
                done = subprocess.run([sys.executable, "-c", ERRORS, base, tuned, mk, os.path.join(work, f"ours-{svd}.json")], check=True, stdout=subprocess.PIPE)
                rows = json.loads(done.stdout)
                excess = [ours / theirs - 1 for _, ours, theirs in rows if theirs > 0]
                print(f"  relative error --svd {svd}: mean {sum(o for _, o, _ in rows) / len(rows):.5f} vs mergekit {sum(t for _, _, t in rows) / len(rows):.5f}; "
                      f"excess over mergekit (ours/theirs - 1) mean {sum(excess) / len(excess):+.2e}, worst {max(excess):+.2e}, "
                      f"{sum(e > 0 for e in excess)} of {len(excess)} modules above mergekit")
        merged = os.path.join(work, "merged")
        subprocess.run([af, "merge", "--base", base, "--adapter", adapter, "-o", merged, "--quiet"], check=True, stdout=subprocess.DEVNULL)
        files = [os.path.join(r, f) for d in (base, adapter, merged) for r, _, fs in os.walk(d) for f in fs if f.endswith(".safetensors")]
        # twice, the faster kept: the second reads from a warm page cache, as verify-merge right after it does
        res["cat"] = min((timed("sh", "-c", 'cat "$@" | wc -c > /dev/null', "cat", *files) for _ in range(2)), key=lambda r: r["wall"])
        print(line("cat base + adapter + merged | wc", res["cat"]))
        res["verify"] = timed(af, "verify-merge", "--base", base, "--adapter", adapter, "--merged", merged, "--json")
        print(line("adapterfmt verify-merge", res["verify"]))
        print(f"  verify-merge: {res['verify']['wall'] / res['cat']['wall']:.2f}x cat (goal <= 2x), RSS {res['verify']['rss'] / 2**30:.2f} GB (goal <= 0.5 GB), ok={json.loads(res['verify']['stdout'])['ok']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
