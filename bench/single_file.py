"""Wall time and peak RSS of ``adapterfmt merge`` into an SDXL-shaped fp16 single-file checkpoint,
against ``cp && sync`` of that file, measured in the same run.

Usage::

    python bench/single_file.py [--fraction F] [--rounds N] [--cache DIR]

Builds once (in ``DIR``, default ``~/.cache/adapterfmt-bench``) an SDXL single file with the real
shapes (diffusers' ``UNet2DConditionModel`` with SDXL's config, CLIP-L and OpenCLIP ViT-bigG, placed
under their SGM / LDM names by adapterfmt's generated table; fp16, random values; 6.9 GB at
``--fraction 1``; a smaller fraction keeps that share of the UNet's tensors, in file order, and all
of both text encoders) and a kohya LoRA of rank 16 on every UNet attention projection it holds
and on OpenCLIP's q / k / v (rows of the fused ``in_proj_weight``). Then, ``N`` rounds (default 3),
each in a fresh process: ``cp FILE OUT && sync`` and ``adapterfmt merge --base FILE --adapter
LORA -o OUT.safetensors`` (which syncs its output); outputs removed and the filesystem synced
between commands. Prints min / median wall time, peak RSS of each, and the ratios (goal: merge
<= 2x ``cp && sync``, RSS <= 0.5 GB). The page cache is warm (``cp`` runs first).
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402

WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "wall = time.perf_counter() - t\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': p.returncode, 'wall': wall, 'rss': u.ru_maxrss * 1024, 'cpu': u.ru_utime + u.ru_stime}))\n"
)


def _build(folder: str, fraction: float) -> tuple[str, str]:
    import torch
    from safetensors.torch import save_file
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import gen_single_file_tables as gen
    from adapterfmt.tables.single_file_names import to_single_file

    base, lora = os.path.join(folder, f"sdxl-{fraction}.safetensors"), os.path.join(folder, f"sdxl-{fraction}-lora.safetensors")
    if os.path.exists(base) and os.path.exists(lora):
        return base, lora
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**gen._SDXL_UNET).state_dict(),
                 "text_encoder": {"text_model." + k.removeprefix("text_model."): v for k, v in CLIPTextModel(CLIPTextConfig(**gen._CLIP_L)).state_dict().items()},
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**gen._OPEN_CLIP_BIGG)).state_dict()}
    g = torch.Generator().manual_seed(0)
    state, lora_state = {}, {}
    unet_keys = list(parts["unet"])
    keep = set(unet_keys[: max(1, int(len(unet_keys) * fraction))])
    for component, tensors in parts.items():
        fused: dict[str, dict[int, tuple[int, ...]]] = {}
        for key, meta in tensors.items():
            if component == "unet" and key not in keep or key.endswith("position_ids"):
                continue
            segs = to_single_file("sdxl", component, key)
            if segs is None:  # text_projection: stored transposed
                state["conditioner.embedders.1.model.text_projection"] = torch.randn(*meta.shape[::-1], generator=g).half()
                continue
            if len(segs) == 1 and segs[0].end is None:
                state[segs[0].key] = torch.randn(*meta.shape, generator=g).half() * 0.02
            else:
                fused.setdefault(segs[0].key, {})[segs[0].first] = tuple(meta.shape)
            module, _, param = key.rpartition(".")
            if param == "weight" and len(meta.shape) == 2 and module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj"):
                prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
                name = prefix + module.replace(".", "_")
                lora_state[f"{name}.lora_down.weight"] = torch.randn(16, meta.shape[1], generator=g).half() * 0.01
                lora_state[f"{name}.lora_up.weight"] = torch.randn(meta.shape[0], 16, generator=g).half() * 0.01
                lora_state[f"{name}.alpha"] = torch.tensor(16.0)
        for key, pieces in fused.items():
            rows = sum(s[0] for s in pieces.values())
            state[key] = torch.randn(rows, *next(iter(pieces.values()))[1:], generator=g).half() * 0.02
    state["model_ema.decay"] = torch.tensor(0.9999)
    save_file(state, base)
    save_file(lora_state, lora)
    return base, lora


def _timed(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, text=True, check=True).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    if doc["rc"] != 0:
        raise SystemExit(f"{cmd[0]} failed ({doc['rc']})")
    return doc


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/adapterfmt-bench"))
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    base, lora = _build(args.cache, args.fraction)
    out = os.path.join(args.cache, "merged-single.safetensors")
    adapterfmt = os.path.join(os.path.dirname(sys.executable), "adapterfmt")
    print(f"base {os.path.getsize(base) / 1e9:.2f} GB, lora {os.path.getsize(lora) / 1e6:.1f} MB, load {os.getloadavg()}")
    runs: dict[str, list[dict]] = {"cp && sync": [], "adapterfmt merge": []}
    for _ in range(args.rounds):
        for name, cmd in (("cp && sync", ["sh", "-c", f"cp '{base}' '{out}' && sync"]),
                          ("adapterfmt merge", [adapterfmt, "merge", "--base", base, "--adapter", lora, "-o", out, "--quiet"])):
            if os.path.exists(out):
                os.remove(out)
            subprocess.run(["sync"], check=True)
            runs[name].append(_timed(cmd))
    os.remove(out)
    for name, rs in runs.items():
        walls = [r["wall"] for r in rs]
        print(f"{name:18s} wall min {min(walls):7.2f} s  median {statistics.median(walls):7.2f} s  cpu {min(r['cpu'] for r in rs):7.2f} s  "
              f"peak RSS {max(r['rss'] for r in rs) / 1e9:5.2f} GB")
    ratio = min(r["wall"] for r in runs["adapterfmt merge"]) / min(r["wall"] for r in runs["cp && sync"])
    rss = max(r["rss"] for r in runs["adapterfmt merge"]) / 1e9
    print(f"merge / (cp && sync): {ratio:.2f}x (goal <= 2.0x);  merge peak RSS {rss:.2f} GB (goal <= 0.5 GB);  load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
