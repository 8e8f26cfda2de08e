"""Whole-process time of "build the model, load the adapter": adapterfmt.load vs PEFT.

Each measurement is a fresh ``python`` process (interpreter start and imports included) that builds
``testdata/tiny-llama`` (float32, base weights loaded) and loads ``testdata/tiny-llama-lora`` onto
it, timed from the parent. Four scenarios:

* ``adapterfmt/torch``: a plain torch model with Llama's module tree, ``adapterfmt.load``;
* ``peft/torch``: the same model, ``PeftModel.from_pretrained`` (``import peft`` pulls in transformers);
* ``adapterfmt/transformers``, ``peft/transformers``: transformers' ``LlamaForCausalLM``.

Each child also reports its own split (imports, build, load) and checks that 14 LoRA layers and
one full copy were installed. Scenarios run interleaved; the table shows medians.

    python bench/load.py            # 5 runs per scenario
    python bench/load.py --runs 9
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running ``python bench/load.py`` puts bench/ first on sys.path, where bench/inspect.py would
# shadow the standard library's ``inspect`` (which torch imports); drop it.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "testdata" / "tiny-llama"
ADAPTER = ROOT / "testdata" / "tiny-llama-lora"
SCENARIOS = ("adapterfmt/torch", "peft/torch", "adapterfmt/transformers", "peft/transformers")


def _plain_llama(config: dict):
    """A torch-only module tree with ``LlamaForCausalLM``'s names and shapes (loading needs no forward)."""
    from torch import nn

    h, inter = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

    def layer() -> nn.Module:
        attn = nn.Module()
        for name, (i, o) in {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}.items():
            setattr(attn, name, nn.Linear(i, o, bias=False))
        mlp = nn.Module()
        for name, (i, o) in {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}.items():
            setattr(mlp, name, nn.Linear(i, o, bias=False))
        block = nn.Module()
        block.self_attn, block.mlp = attn, mlp
        block.input_layernorm, block.post_attention_layernorm = nn.RMSNorm(h), nn.RMSNorm(h)
        return block

    decoder = nn.Module()
    decoder.embed_tokens = nn.Embedding(config["vocab_size"], h)
    decoder.layers = nn.ModuleList(layer() for _ in range(config["num_hidden_layers"]))
    decoder.norm = nn.RMSNorm(h)
    model = nn.Module()
    model.model, model.lm_head = decoder, nn.Linear(h, config["vocab_size"], bias=False)
    return model


def _build(kind: str):
    import torch

    if kind == "transformers":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    from safetensors.torch import load_file

    model = _plain_llama(json.loads((BASE / "config.json").read_text()))
    shards = sorted(set(json.loads((BASE / "model.safetensors.index.json").read_text())["weight_map"].values()))
    state = {k: v for s in shards for k, v in load_file(str(BASE / s)).items()}
    model.load_state_dict(state, strict=True)
    return model


def child(scenario: str) -> None:
    """Run one scenario in this process and print its split as JSON."""
    t0 = time.perf_counter()
    tool, kind = scenario.split("/")
    import torch  # noqa: F401

    if tool == "adapterfmt":
        import adapterfmt

        def load(model):
            adapterfmt.load(model, ADAPTER)
            return model
    else:
        from peft import LoraConfig, PeftModel

        def load(model):
            config = LoraConfig.from_pretrained(str(ADAPTER))
            config.task_type = None  # a plain torch model has no generation API for PeftModelForCausalLM
            return PeftModel.from_pretrained(model, str(ADAPTER), config=config)

    if kind == "transformers":
        import transformers.models.llama.modeling_llama  # noqa: F401
    t1 = time.perf_counter()
    model = _build(kind)
    t2 = time.perf_counter()
    wrapped = load(model)
    t3 = time.perf_counter()
    lora = sum("lora_A" in m._modules for m in wrapped.modules())
    copies = sum("original_module" in m._modules for m in wrapped.modules())
    assert (lora, copies) == (14, 1), (lora, copies)
    print(json.dumps({"imports": t1 - t0, "build": t2 - t1, "load": t3 - t2}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    walls: dict[str, list[float]] = {s: [] for s in SCENARIOS}
    splits: dict[str, list[dict]] = {s: [] for s in SCENARIOS}
    for _ in range(args.runs):
        for s in SCENARIOS:
            t = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", s], check=True, capture_output=True, text=True)
            walls[s].append(time.perf_counter() - t)
            splits[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"median of {args.runs} fresh processes (seconds)")
    print(f"{'scenario':26} {'process':>8} {'imports':>8} {'build':>8} {'load':>8}")
    for s in SCENARIOS:
        med = {k: statistics.median(d[k] for d in splits[s]) for k in ("imports", "build", "load")}
        print(f"{s:26} {statistics.median(walls[s]):8.2f} {med['imports']:8.2f} {med['build']:8.2f} {med['load']:8.3f}")
    for kind in ("torch", "transformers"):
        ratio = statistics.median(walls[f"peft/{kind}"]) / statistics.median(walls[f"adapterfmt/{kind}"])
        print(f"speed-up on the {kind} model: {ratio:.2f}x (process wall time, PEFT / adapterfmt)")


if __name__ == "__main__":
    main()
