"""``adapterfmt resize`` / ``combine --method svd`` on an 8B-shaped adapter, against kohya's
``resize_lora.py`` and PEFT's ``add_weighted_adapter(..., "svd")``, ratios from one run.

Usage::

    python bench/algebra.py [--layers 32] [--rank 64] [--new-rank 16] [--kohya-script PATH]
                            [--peft-modules q_proj,k_proj,...] [--kohya-modules ...] [--cache DIR]

Builds (in ``DIR``, default ``~/.cache/adapterfmt-bench/algebra``) two random bf16 PEFT LoRA
adapters shaped like Llama-3-8B all-linear LoRA: rank 64 on q/k/v/o (4096×4096, 1024×4096) and
gate/up/down (14336×4096, 4096×14336) of 32 layers — 224 modules, 168 M parameters each.
Then, each in a fresh process, it times (wall and CPU time of the child):

* ``python -c "import torch"``: the floor of any torch process on this machine;
* ``adapterfmt resize A -o OUT --rank 16`` (goal: ≤ 2 s for the whole process);
* ``adapterfmt combine A B -o OUT --method svd --rank 16`` (all 224 modules);
* kohya's ``resize_lora.py`` per-module work (``merge_linear`` + ``extract_linear``: the dense
  product and a full ``torch.linalg.svd``), the functions taken from the file given by
  ``--kohya-script`` (sd-scripts' ``networks/resize_lora.py``; its imports of ``library.*`` are
  not needed for them), on one module of each shape named by ``--kohya-modules``, extrapolated to
  the 224 modules by shape; skipped without ``--kohya-script``;
* PEFT 0.21's ``add_weighted_adapter([a, b], [1, 1], ..., "svd", svd_rank=16)`` on one layer whose
  modules are ``--peft-modules`` (the base layer built with uninitialised float32 weights), its
  time extrapolated to the 224 modules by shape, and its error against the exact weighted sum next
  to ``combine``'s on the same modules (goal: ≥ 100× faster at ≤ its error). Both errors are those
  of the factors as stored (float32 for both by default), multiplied in float64: PEFT's own
  ``get_delta_weight`` rounds the product to float32, which moves the error by about 10⁻⁸ either way.

Dense SVDs of 14336×4096 take minutes on a small machine; ``--kohya-modules k_proj`` /
``--peft-modules k_proj`` measure the 1024×4096 class only, and the other shapes are extrapolated
by the flop count of a full SVD (``4m²n + 8mn² + 9n³`` for m ≥ n), which the output says.
The machine may be shared: the load average is printed before and after; CPU times are what
other load cannot inflate.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SHAPES = {  # module -> (out, in)
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_path(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if name in ATTN else 'mlp'}.{name}"


def make_adapter(directory: Path, *, layers: int, rank: int, seed: int, names=tuple(SHAPES), task_type: "str | None" = "CAUSAL_LM") -> Path:
    """A PEFT LoRA adapter directory with random bf16 factors (B not zero), α = 2r."""
    import torch
    from safetensors.torch import save_file

    if (directory / "adapter_model.safetensors").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name in names:
            out, inp = SHAPES[name]
            p = f"base_model.model.{module_path(layer, name)}"
            tensors[f"{p}.lora_A.weight"] = (torch.randn(rank, inp, generator=g) / inp**0.5).to(torch.bfloat16)
            decay = torch.logspace(0, -2, rank)  # a spectrum that falls off, as trained adapters' do
            tensors[f"{p}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * decay * 0.02).to(torch.bfloat16)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": 2 * rank, "target_modules": list(names),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "base_model_name_or_path": None}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, child CPU seconds, stdout) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), p.stdout


def svd_flops(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 4 * m * m * n + 8 * m * n * n + 9 * n**3


def extrapolate(per_shape: dict[str, float], layers: int) -> tuple[float, bool]:
    """Seconds for all modules from the measured ones (by flop count for unmeasured shapes)."""
    measured = {SHAPES[n]: s for n, s in per_shape.items()}
    total, guessed = 0.0, False
    for name, shape in SHAPES.items():
        if shape in measured:
            total += measured[shape] * layers
        else:
            ref_shape, ref_s = next(iter(measured.items()))
            total += ref_s * svd_flops(*shape) / svd_flops(*ref_shape) * layers
            guessed = True
    return total, guessed


def kohya_functions(script: Path) -> dict:
    """``merge_linear``, ``extract_linear``, ``rank_resize`` and the ``index_sv_*`` helpers of
    sd-scripts' resize_lora.py, compiled from its source without its ``library.*`` imports."""
    import torch

    tree = ast.parse(script.read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and (n.name in ("merge_linear", "extract_linear", "rank_resize") or n.name.startswith("index_sv_"))]
    keep += [n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "MIN_SV" for t in n.targets)]
    ns: dict = {"torch": torch}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(script), "exec"), ns)
    return ns


def bench_kohya(script: Path, adapter: Path, names: list[str], new_rank: int) -> tuple[dict[str, float], dict[str, float]]:
    import torch
    from safetensors import safe_open

    ns = kohya_functions(script)
    out, cpus = {}, {}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for name in names:
            p = f"base_model.model.{module_path(0, name)}"
            down, up = f.get_tensor(f"{p}.lora_A.weight").float(), f.get_tensor(f"{p}.lora_B.weight").float()
            t, c = time.perf_counter(), time.process_time()
            weight = ns["merge_linear"](down, up, "cpu")
            ns["extract_linear"](weight, new_rank, None, None, "cpu", 2.0)
            out[name] = time.perf_counter() - t
            cpus[name] = time.process_time() - c
            print(f"  kohya {name} {SHAPES[name]}: wall {out[name]:.2f} s, cpu {cpus[name]:.2f} s", flush=True)
    del torch
    return out, cpus


def bench_peft(a: Path, b: Path, names: list[str], new_rank: int, cache: Path) -> tuple[dict[str, float], dict[str, float], dict[str, float], Path, Path]:
    """PEFT svd on one layer of ``names``: wall and CPU seconds per module, error per module vs the exact sum."""
    import torch
    from peft import PeftModel
    from torch import nn

    # no task_type: PEFT then wraps the bare layer without asking it for generation hooks
    la = make_adapter(cache / f"peft1-a-{'-'.join(names)}", layers=1, rank=64, seed=1, names=tuple(names), task_type=None)
    lb = make_adapter(cache / f"peft1-b-{'-'.join(names)}", layers=1, rank=64, seed=2, names=tuple(names), task_type=None)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = nn.Module()
            self.mlp = nn.Module()
            for n in names:
                o, i = SHAPES[n]
                setattr(self.self_attn if n in ATTN else self.mlp, n, torch.nn.utils.skip_init(nn.Linear, i, o, bias=False))

    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([Layer()])
    pm = PeftModel.from_pretrained(root, str(la), adapter_name="a")
    pm.load_adapter(str(lb), adapter_name="b")
    per, err = {}, {}
    from peft.tuners.lora import LoraLayer

    t, c = time.perf_counter(), time.process_time()
    pm.add_weighted_adapter(["a", "b"], [1.0, 1.0], "mix", combination_type="svd", svd_rank=new_rank)
    total = time.perf_counter() - t
    cpu = time.process_time() - c
    print(f"  PEFT add_weighted_adapter on {names}: wall {total:.2f} s, cpu {cpu:.2f} s", flush=True)
    def stored(mod, name: str) -> "torch.Tensor":  # the factors as stored, multiplied in float64 (as adapterfmt's report does)
        return (mod.lora_B[name].weight.double() @ mod.lora_A[name].weight.double()) * mod.scaling[name]

    with torch.no_grad():
        for path, mod in pm.base_model.model.named_modules():
            if isinstance(mod, LoraLayer) and "mix" in mod.lora_A:
                exact = stored(mod, "a") + stored(mod, "b")
                err[path.rsplit(".", 1)[-1]] = float(torch.linalg.norm(stored(mod, "mix") - exact) / torch.linalg.norm(exact))
    # one add_weighted_adapter call does every module: split its time by flop count
    flops = {n: svd_flops(*SHAPES[n]) for n in names}
    cpus = {}
    for n in names:
        per[n] = total * flops[n] / sum(flops.values())
        cpus[n] = cpu * flops[n] / sum(flops.values())
    return per, cpus, err, la, lb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--new-rank", type=int, default=16)
    ap.add_argument("--kohya-script", type=Path)
    ap.add_argument("--kohya-modules", default="k_proj,q_proj,gate_proj,down_proj")
    ap.add_argument("--peft-modules", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "adapterfmt-bench" / "algebra")
    args = ap.parse_args()
    cli = shutil.which("adapterfmt") or str(Path(sys.executable).parent / "adapterfmt")
    print(f"load average before: {os.getloadavg()}, CPUs: {os.cpu_count()}", flush=True)
    a = make_adapter(args.cache / f"a-{args.layers}-{args.rank}", layers=args.layers, rank=args.rank, seed=1)
    b = make_adapter(args.cache / f"b-{args.layers}-{args.rank}", layers=args.layers, rank=args.rank, seed=2)
    modules = args.layers * len(SHAPES)
    print(f"adapters: {modules} modules, rank {args.rank}, {os.path.getsize(a / 'adapter_model.safetensors') / 1e6:.0f} MB each (bf16)")
    work = args.cache / "out"
    results: dict[str, tuple[float, float]] = {}

    def best(label: str, cmd: list[str]) -> str:
        runs = []
        text = ""
        for _ in range(args.rounds):
            shutil.rmtree(work, ignore_errors=True)
            wall, cpu, text = timed(cmd)
            runs.append((wall, cpu))
        results[label] = min(runs)
        print(f"{label:<28} wall {min(r[0] for r in runs):7.2f} s (min of {args.rounds})  cpu {min(r[1] for r in runs):7.2f} s", flush=True)
        return text

    best("python -c 'import torch'", [sys.executable, "-c", "import torch"])
    doc = json.loads(best(f"resize --rank {args.new_rank}", [cli, "resize", str(a), "-o", str(work), "--rank", str(args.new_rank), "--json"]))
    print(f"  resize: energy kept {doc['totals']['retained_energy']:.4f}, relative error {doc['totals']['error']:.3e}")
    comb = json.loads(best(f"combine svd --rank {args.new_rank}",
                           [cli, "combine", str(a), str(b), "-o", str(work), "--method", "svd", "--rank", str(args.new_rank), "--json"]))
    ours_resize, ours_combine = results[f"resize --rank {args.new_rank}"], results[f"combine svd --rank {args.new_rank}"]
    print(f"\nresize whole process: {ours_resize[0]:.2f} s (goal ≤ 2 s: {'met' if ours_resize[0] <= 2 else 'NOT met'} on this machine)")

    if args.kohya_script:
        if args.kohya_script.is_file():
            print("\nkohya resize_lora.py (dense product + full SVD per module):")
            per, cpus = bench_kohya(args.kohya_script, a, args.kohya_modules.split(","), args.new_rank)
            total, guessed = extrapolate(per, args.layers)
            cpu_total, _ = extrapolate(cpus, args.layers)
            print(f"  kohya, {modules} modules: wall {total:.0f} s, cpu {cpu_total:.0f} s "
                  f"{'(some shapes extrapolated by flop count)' if guessed else '(extrapolated by layer)'}; adapterfmt resize (whole process) "
                  f"is {total / ours_resize[0]:.0f}x faster in wall time, {cpu_total / ours_resize[1]:.0f}x in CPU time")
        else:
            print(f"\nkohya: {args.kohya_script} not found; skipped")
    else:
        print("\nkohya: no --kohya-script given; skipped")

    names = args.peft_modules.split(",")
    print(f"\nPEFT add_weighted_adapter svd on one layer of {names}:")
    per, cpus, err, la, lb = bench_peft(a, b, names, args.new_rank, args.cache)
    total, guessed = extrapolate(per, args.layers)
    cpu_total, _ = extrapolate(cpus, args.layers)
    print(f"  PEFT, {modules} modules: wall {total:.0f} s, cpu {cpu_total:.0f} s "
          f"{'(some shapes extrapolated by flop count)' if guessed else '(extrapolated by layer)'}; adapterfmt combine (whole process) "
          f"is {total / ours_combine[0]:.0f}x faster in wall time, {cpu_total / ours_combine[1]:.0f}x in CPU time")
    shutil.rmtree(work, ignore_errors=True)
    _, _, text = timed([cli, "combine", str(la), str(lb), "-o", str(work), "--method", "svd", "--rank", str(args.new_rank), "--json"])
    rows = {m["module"].rsplit(".", 1)[-1]: m for m in json.loads(text)["modules"]}
    for n in names:
        ours = rows[n]["error"]
        print(f"  {n:<10} relative error vs exact sum (factors as stored, {rows[n]['dtype']} / PEFT F32): PEFT {err[n]:.10e}  "
              f"adapterfmt {ours:.10e}  (adapterfmt − PEFT: {ours - err[n]:+.2e}, {'≤' if ours <= err[n] else '>'} PEFT's)")
    shutil.rmtree(work, ignore_errors=True)
    del comb
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
