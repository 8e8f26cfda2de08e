"""Which deliberately wrong merges ``adapterfmt verify-merge`` and deltalint 0.1.0 each catch.

Usage::

    python bench/verify_merge_peers.py [--dtype bf16|fp32] [--dir DIR]

Builds a tiny Llama (hidden 64, 1 layer; float32 or bf16) and a PEFT LoRA adapter (r=4, alpha=8,
every projection, random non-zero B, a full copy of ``lm_head``), then merged models: PEFT's
``merge_and_unload`` (default and ``safe_merge``, both right), and the wrong ones users ship
(not applied, applied twice, alpha instead of alpha/r, an rsLoRA adapter merged with alpha/r,
subtracted, one square delta transposed, two deltas swapped between modules, the full copy
not applied, an unrelated tensor changed, and — on a tied model — PEFT's own merge of a full
copy of ``lm_head`` saved with the tie kept). Each is checked by both tools (their CLIs, exit
codes: adapterfmt 0 ok / 1 failed; deltalint 0 pass / 1 fail / 3 inconclusive) and a Markdown
table is printed: the exit code and each tool's named causes (deltalint's ``diagnosis`` per failing layer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Running ``python bench/verify_merge_peers.py`` puts bench/ first on sys.path, where
# bench/inspect.py would shadow the standard library's inspect.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

R, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BIN = Path(sys.executable).parent


def base_model(root: Path, dtype: torch.dtype, tied: bool) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied)
    path = root / ("base-tied" if tied else "base")
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(str(path))
    return path


def load(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def adapter(root: Path, base: Path, dtype: torch.dtype, name: str, **kw: object) -> Path:
    torch.manual_seed(1)
    args = dict(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False, modules_to_save=["lm_head"])
    args.update(kw)
    model = get_peft_model(load(base, dtype), LoraConfig(**args))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    model.save_pretrained(str(root / name))
    return root / name


def peft_merge(base: Path, ad: Path, dtype: torch.dtype, *, safe: bool = False, factor: float = 1.0) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(load(base, dtype), str(ad))
    for m in model.modules():
        if isinstance(getattr(m, "scaling", None), dict):
            m.scaling["default"] *= factor
    return {k: v.detach().clone().contiguous() for k, v in model.merge_and_unload(safe_merge=safe).state_dict().items()}


def save(root: Path, name: str, base: Path, tensors: dict[str, torch.Tensor], drop: tuple[str, ...] = ()) -> Path:
    out = root / name
    out.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items() if k not in drop}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((base / "config.json").read_text())
    return out


def cases(root: Path, dtype: torch.dtype) -> list[tuple[str, Path, Path, Path]]:
    base = base_model(root, dtype, tied=False)
    ad = adapter(root, base, dtype, "lora")
    rs = adapter(root, base, dtype, "rslora", use_rslora=True)
    plain = {k: v.contiguous() for k, v in load(base, dtype).state_dict().items()}
    right = peft_merge(base, ad, dtype)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    transposed, swapped, changed, no_copy = dict(right), dict(right), dict(right), dict(right)
    transposed[q] = (plain[q].float() + (right[q].float() - plain[q].float()).T).to(dtype)
    swapped[q] = (plain[q].float() + right[o].float() - plain[o].float()).to(dtype)
    swapped[o] = (plain[o].float() + right[q].float() - plain[q].float()).to(dtype)
    changed["model.norm.weight"] = (plain["model.norm.weight"].float() + 0.01).to(dtype)
    no_copy["lm_head.weight"] = plain["lm_head.weight"]
    out = [
        ("PEFT merge_and_unload (right)", base, ad, save(root, "ok", base, right)),
        ("PEFT safe_merge (right)", base, ad, save(root, "ok-safe", base, peft_merge(base, ad, dtype, safe=True))),
        ("not applied", base, ad, save(root, "none", base, plain)),
        ("applied twice", base, ad, save(root, "twice", base, peft_merge(base, ad, dtype, factor=2.0))),
        ("alpha instead of alpha/r", base, ad, save(root, "alpha", base, peft_merge(base, ad, dtype, factor=R))),
        ("rsLoRA merged with alpha/r", base, rs, save(root, "rs", base, peft_merge(base, rs, dtype, factor=1 / math.sqrt(R)))),
        ("subtracted", base, ad, save(root, "neg", base, peft_merge(base, ad, dtype, factor=-1.0))),
        ("q_proj delta transposed", base, ad, save(root, "transposed", base, transposed)),
        ("q/o deltas swapped (wrong module)", base, ad, save(root, "swapped", base, swapped)),
        ("full copy not applied", base, ad, save(root, "nocopy", base, no_copy)),
        ("unrelated tensor changed (norm)", base, ad, save(root, "changed", base, changed)),
    ]
    tbase = base_model(root, dtype, tied=True)
    tad = adapter(root, tbase, dtype, "lora-tied", target_modules=["q_proj"])
    tied = peft_merge(tbase, tad, dtype)
    out.append(("tied head not untied (full copy of lm_head)", tbase, tad, save(root, "tied", tbase, tied, drop=("lm_head.weight",))))
    return out


def run(args: list[str]) -> tuple[int, dict]:
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        return done.returncode, json.loads(done.stdout)
    except json.JSONDecodeError:
        return done.returncode, {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--dir")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    root = Path(a.dir or tempfile.mkdtemp(prefix="verify-peers-"))
    print(f"| case ({a.dtype}) | adapterfmt verify-merge | deltalint 0.1.0 |")
    print("|---|---|---|")
    for name, base, ad, merged in cases(root, dtype):
        rc, doc = run([str(BIN / "adapterfmt"), "verify-merge", "--base", str(base), "--adapter", str(ad), "--merged", str(merged), "--json"])
        ours = "ok" if rc == 0 else f"exit {rc}: " + ", ".join(f"{k}×{v}" for k, v in doc.get("failed_verdicts", {}).items()) or str(doc)
        drc, ddoc = run([str(BIN / "deltalint"), "check", "--base", str(base), "--adapter", str(ad), "--merged", str(merged), "--json"])
        layers = ddoc.get("layers", []) if isinstance(ddoc, dict) else []
        bad: dict[str, int] = {}
        for layer in layers:
            v = str(layer.get("verdict"))
            if v.lower() not in ("pass", "verdict.pass"):
                why = str(layer.get("diagnosis") or v)
                bad[why] = bad.get(why, 0) + 1
        missing = len(ddoc.get("missing_layers", []) or []) if isinstance(ddoc, dict) else 0
        theirs = {0: "pass", 1: "FAIL", 2: "error", 3: "inconclusive"}.get(drc, f"exit {drc}")
        extra = ", ".join(f"{k}×{v}" for k, v in bad.items()) + (f", missing×{missing}" if missing else "")
        print(f"| {name} | {ours} | {theirs}{(': ' + extra) if extra and drc else ''} |")


if __name__ == "__main__":
    main()
