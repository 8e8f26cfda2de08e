#!/usr/bin/env python
"""(Re)generate the tiny PEFT/transformers fixtures under ``testdata/``.

Everything is built in code from tiny configs with fixed seeds (nothing is
downloaded).  Adapters are produced with real PEFT (``get_peft_model`` +
``save_pretrained``); base models with transformers ``save_pretrained``.

PEFT initialises ``lora_B`` to zero, which would make every merge a no-op, so
after ``get_peft_model`` every adapter parameter is overwritten with small
values from a seeded generator:

* ``lora_A`` / ``lora_B`` (incl. ``lora_B.bias`` with ``lora_bias=True``):
  replaced by ``randn * 0.02``;
* ``lora_magnitude_vector`` (DoRA) and ``modules_to_save`` copies: perturbed,
  ``param += randn * 0.02`` (so they stay close to the base weights but differ
  from them).

Usage (from the repository root or anywhere):

    python scripts/make_testdata.py            # regenerate
    python scripts/make_testdata.py --verify   # regenerate, then reload-check

The script only deletes/recreates the directories and files listed in
``OWNED_DIRS`` / ``OWNED_FILES``; anything else in ``testdata/`` is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTDATA = REPO_ROOT / "testdata"

OWNED_DIRS = [
    "tiny-llama",
    "tiny-llama-lora",
    "tiny-llama-multi",
    "tiny-bert",
    "tiny-bert-classifier",
    "tiny-llama-tied",
    "tiny-llama-tied-lora",
    "tiny-llama-dora",
    "tiny-bert-lorabias",
]
OWNED_FILES = ["VERSIONS.json", "README.md"]

# Shard size for tiny-llama (bf16, ~214 KB total) -> 3 shards.
LLAMA_MAX_SHARD_SIZE = "100KB"

# Each entry: adapter dir -> (base dir, base loader kind, list of adapter names)
ADAPTERS = {
    "tiny-llama-lora": ("tiny-llama", "llama", ["default"]),
    "tiny-llama-multi": ("tiny-llama", "llama", ["default", "second"]),
    "tiny-bert-classifier": ("tiny-bert", "bert", ["default"]),
    "tiny-llama-tied-lora": ("tiny-llama-tied", "llama", ["default"]),
    "tiny-llama-dora": ("tiny-llama", "llama", ["default"]),
    "tiny-bert-lorabias": ("tiny-bert", "bert", ["default"]),
}

ADAPTER_PARAM_MARKERS = ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save")


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def rel(name: str) -> str:
    """Path of a testdata entry relative to the repo root (used in configs)."""
    return f"testdata/{name}"


def out(name: str) -> Path:
    return TESTDATA / name


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"[{record.name}] {record.getMessage()}")


@contextlib.contextmanager
def capture_warnings(tag: str, sink: dict[str, list[str]]):
    """Record python warnings + transformers/peft logger warnings under ``tag``."""
    handler = _ListHandler()
    loggers = [logging.getLogger(n) for n in ("transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
    msgs = [f"[{w.category.__name__}] {w.message}" for w in caught] + handler.records
    # de-duplicate, keep order
    seen: set[str] = set()
    uniq = [m for m in msgs if not (m in seen or seen.add(m))]
    if uniq:
        sink.setdefault(tag, []).extend(uniq)


def llama_config(tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        max_position_embeddings=128,
    )


def bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )


def load_base(name: str, kind: str):
    """Load a saved base model from testdata in float32 (eval mode)."""
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    cls = LlamaForCausalLM if kind == "llama" else BertForSequenceClassification
    # Load via the repo-relative path (cwd is the repo root) so that
    # config.name_or_path -- which PEFT copies into the adapter's README.md
    # model card -- is "testdata/<name>" rather than an absolute path.
    model = cls.from_pretrained(rel(name), dtype=torch.float32)
    model.eval()
    return model


def randomize_adapter(model, seed: int) -> int:
    """Fill adapter params with small seeded random values; returns count."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for pname, p in model.named_parameters():  # deterministic order
            if not any(m in pname for m in ADAPTER_PARAM_MARKERS):
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(noise.to(p.dtype))
            else:  # lora_magnitude_vector, modules_to_save copies: perturb
                p.add_(noise.to(p.dtype))
            n += 1
    return n


def save_adapter(peft_model, name: str, base_name: str) -> None:
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = rel(base_name)
        cfg.revision = None
    peft_model.save_pretrained(str(out(name)))


# --------------------------------------------------------------------------- #
# base models
# --------------------------------------------------------------------------- #


def make_tiny_llama(log):
    from transformers import LlamaForCausalLM

    with capture_warnings("tiny-llama", log):
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(tie=False))
        model.to(torch.bfloat16)
        model.save_pretrained(str(out("tiny-llama")), max_shard_size=LLAMA_MAX_SHARD_SIZE)
    shards = sorted(out("tiny-llama").glob("model-*.safetensors"))
    if not (2 <= len(shards) <= 3) or not (out("tiny-llama") / "model.safetensors.index.json").exists():
        raise SystemExit(f"tiny-llama: expected 2-3 shards + index, got {[s.name for s in shards]}")


def make_tiny_llama_tied(log):
    from transformers import LlamaForCausalLM

    with capture_warnings("tiny-llama-tied", log):
        torch.manual_seed(1)
        model = LlamaForCausalLM(llama_config(tie=True))
        model.save_pretrained(str(out("tiny-llama-tied")))


def make_tiny_bert(log):
    from transformers import BertForSequenceClassification

    with capture_warnings("tiny-bert", log):
        torch.manual_seed(2)
        model = BertForSequenceClassification(bert_config())
        model.save_pretrained(str(out("tiny-bert")))


# --------------------------------------------------------------------------- #
# adapters
# --------------------------------------------------------------------------- #

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_llama_lora(log):
    from peft import LoraConfig, get_peft_model

    name = "tiny-llama-lora"
    with capture_warnings(name, log):
        base = load_base("tiny-llama", "llama")
        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=LLAMA_ALL,
            modules_to_save=["lm_head"],
            task_type="CAUSAL_LM",
            rank_pattern={"down_proj": 4},
            alpha_pattern={"down_proj": 8},
        )
        model = get_peft_model(base, cfg)
        randomize_adapter(model, seed=100)
        save_adapter(model, name, "tiny-llama")


def make_llama_multi(log):
    from peft import LoraConfig, get_peft_model

    name = "tiny-llama-multi"
    with capture_warnings(name, log):
        base = load_base("tiny-llama", "llama")
        cfg1 = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        cfg2 = LoraConfig(
            r=2,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["o_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, cfg1, adapter_name="default")
        model.add_adapter("second", cfg2)
        randomize_adapter(model, seed=101)
        save_adapter(model, name, "tiny-llama")


def make_bert_classifier(log):
    from peft import LoraConfig, get_peft_model

    name = "tiny-bert-classifier"
    with capture_warnings(name, log):
        base = load_base("tiny-bert", "bert")
        cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
        model = get_peft_model(base, cfg)
        randomize_adapter(model, seed=102)
        save_adapter(model, name, "tiny-bert")


def make_llama_tied_lora(log):
    from peft import LoraConfig, get_peft_model

    name = "tiny-llama-tied-lora"
    with capture_warnings(name, log):
        base = load_base("tiny-llama-tied", "llama")
        cfg = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["lm_head"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, cfg)
        randomize_adapter(model, seed=103)
        save_adapter(model, name, "tiny-llama-tied")


def make_llama_dora(log):
    from peft import LoraConfig, get_peft_model

    name = "tiny-llama-dora"
    with capture_warnings(name, log):
        base = load_base("tiny-llama", "llama")
        cfg = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            use_dora=True,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, cfg)
        randomize_adapter(model, seed=104)
        save_adapter(model, name, "tiny-llama")


def make_bert_lorabias(log):
    from peft import LoraConfig, get_peft_model

    name = "tiny-bert-lorabias"
    with capture_warnings(name, log):
        base = load_base("tiny-bert", "bert")
        cfg = LoraConfig(
            task_type="SEQ_CLS",
            r=4,
            lora_alpha=8,
            target_modules=["query", "value"],
            lora_bias=True,
        )
        model = get_peft_model(base, cfg)
        randomize_adapter(model, seed=105)
        save_adapter(model, name, "tiny-bert")


# --------------------------------------------------------------------------- #
# metadata
# --------------------------------------------------------------------------- #

README = """\
# testdata

Tiny, deterministic fixtures generated by `scripts/make_testdata.py` with real
transformers/PEFT `save_pretrained` (versions in `VERSIONS.json`).  Adapter
weights are float32; `lora_B` is filled with seeded random values (not PEFT's
zero init) so merges are non-trivial.  `base_model_name_or_path` in each
`adapter_config.json` is a repo-root-relative path (`testdata/<base>`).

| directory | what |
|---|---|
| `tiny-llama/` | base `LlamaForCausalLM` (vocab 256, hidden 64, 2 layers, GQA 4/2 heads, untied), **bfloat16**, sharded into {n_shards} safetensors files + `model.safetensors.index.json` |
| `tiny-llama-lora/` | LoRA on `tiny-llama`: r=8, alpha=16, all 7 linear projections, `rank_pattern`/`alpha_pattern` `down_proj`: r=4/alpha=8, `modules_to_save=["lm_head"]` |
| `tiny-llama-multi/` | two adapters on `tiny-llama` from one `save_pretrained`: `default` (root; r=4, alpha=8, q_proj/v_proj) and `second/` (r=2, alpha=4, `use_rslora`, o_proj/down_proj) |
| `tiny-bert/` | base `BertForSequenceClassification` (vocab 128, hidden 32, 2 layers, 3 labels), float32, single file |
| `tiny-bert-classifier/` | LoRA on `tiny-bert`, `task_type=SEQ_CLS`, r=4, alpha=8, query/value; PEFT adds the `classifier` head to `modules_to_save` |
| `tiny-llama-tied/` | base `LlamaForCausalLM` like `tiny-llama` but `tie_word_embeddings=True`, float32, single file (no `lm_head.weight` stored) |
| `tiny-llama-tied-lora/` | LoRA on `tiny-llama-tied`: r=4, alpha=8, q_proj/v_proj, `modules_to_save=["lm_head"]` (full copy of a tied module) |
| `tiny-llama-dora/` | DoRA (`use_dora=True`) on `tiny-llama`: r=4, alpha=8, q_proj/v_proj (has `lora_magnitude_vector`) |
| `tiny-bert-lorabias/` | LoRA on `tiny-bert` with `lora_bias=True` (`lora_B.bias` tensors), SEQ_CLS, r=4, alpha=8, query/value |

Regenerate (deletes and recreates only the entries above, plus this README and
`VERSIONS.json`):

    python scripts/make_testdata.py            # add --verify to reload-check every adapter
"""


def write_metadata() -> None:
    import diffusers
    import peft
    import safetensors
    import transformers

    versions = {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "safetensors": safetensors.__version__,
        "python": "%d.%d.%d" % sys.version_info[:3],
        "command": "python scripts/make_testdata.py",
    }
    (TESTDATA / "VERSIONS.json").write_text(json.dumps(versions, indent=2) + "\n")
    n_shards = len(list(out("tiny-llama").glob("model-*.safetensors")))
    (TESTDATA / "README.md").write_text(README.format(n_shards=n_shards))


def print_table() -> int:
    total = 0
    print(f"\n{'path':<60} {'bytes':>10}")
    print("-" * 71)
    for d in OWNED_DIRS:
        for f in sorted(out(d).rglob("*")):
            if f.is_file():
                size = f.stat().st_size
                total += size
                print(f"{str(f.relative_to(TESTDATA)):<60} {size:>10}")
    for f in OWNED_FILES:
        size = (TESTDATA / f).stat().st_size
        total += size
        print(f"{f:<60} {size:>10}")
    print("-" * 71)
    print(f"{'TOTAL':<60} {total:>10}  ({total / 1024:.1f} KiB)")
    return total


# --------------------------------------------------------------------------- #
# verification
# --------------------------------------------------------------------------- #


def _adapter_file(d: Path) -> Path:
    return d / "adapter_model.safetensors"


def verify(log) -> list[str]:
    """Reload every adapter against its base; return list of failures."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    failures: list[str] = []
    torch.manual_seed(1234)
    for name, (base_name, kind, adapters) in ADAPTERS.items():
        tag = f"verify:{name}"
        with capture_warnings(tag, log):
            base = load_base(base_name, kind)
            if kind == "llama":
                inputs = {"input_ids": torch.randint(0, 256, (2, 7))}
            else:
                inputs = {"input_ids": torch.randint(0, 128, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
            with torch.no_grad():
                ref = base(**inputs).logits.clone()
            model = PeftModel.from_pretrained(base, str(out(name)), adapter_name=adapters[0])
            for extra in adapters[1:]:
                model.load_adapter(str(out(name) / extra), adapter_name=extra)
            model.eval()

            for a in adapters:
                path = out(name) if a == adapters[0] else out(name) / a
                saved = load_file(str(_adapter_file(path)))
                live = get_peft_model_state_dict(model, adapter_name=a)
                if set(saved) != set(live):
                    failures.append(
                        f"{name}/{a}: key mismatch: only-saved={sorted(set(saved) - set(live))} "
                        f"only-live={sorted(set(live) - set(saved))}"
                    )
                    continue
                bad = [k for k in saved if not torch.equal(saved[k], live[k].detach().cpu())]
                if bad:
                    failures.append(f"{name}/{a}: value mismatch after reload: {bad[:5]}")
                if any(t.dtype != torch.float32 for t in saved.values()):
                    failures.append(f"{name}/{a}: non-float32 tensors in adapter file")
                zero_b = [k for k, t in saved.items() if "lora_B" in k and not t.abs().sum() > 0]
                if zero_b:
                    failures.append(f"{name}/{a}: all-zero lora_B tensors: {zero_b[:3]}")

                model.set_adapter(a)
                with torch.no_grad():
                    got = model(**inputs).logits
                    if torch.allclose(got, ref):
                        failures.append(f"{name}/{a}: adapter does not change the output")
                    # merged weights must reproduce the unmerged forward pass
                    model.merge_adapter([a])
                    merged = model(**inputs).logits
                    model.unmerge_adapter()
                diff = (merged - got).abs().max().item()
                if diff > 1e-4:
                    failures.append(f"{name}/{a}: merged vs unmerged max diff {diff:g}")
                print(f"verify {name}/{a}: {len(saved)} tensors OK; |adapter-base|max="
                      f"{(got - ref).abs().max().item():.3g}, |merged-unmerged|max={diff:.2g}")
        for msg in log.get(tag, []):
            low = msg.lower()
            if "missing" in low or "unexpected" in low:
                failures.append(f"{name}: load warning: {msg}")
    return failures


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # PEFT stores target_modules as a set and serialises it in iteration
    # order, which depends on str hashing; pin the hash seed (re-exec once) so
    # adapter_config.json is byte-for-byte reproducible.
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = dict(os.environ, PYTHONHASHSEED="0")
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", action="store_true", help="reload every adapter and check it afterwards")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.chdir(REPO_ROOT)
    torch.use_deterministic_algorithms(True)

    TESTDATA.mkdir(exist_ok=True)
    for d in OWNED_DIRS:
        shutil.rmtree(out(d), ignore_errors=True)
    for f in OWNED_FILES:
        (TESTDATA / f).unlink(missing_ok=True)

    log: dict[str, list[str]] = {}
    make_tiny_llama(log)
    make_tiny_llama_tied(log)
    make_tiny_bert(log)
    make_llama_lora(log)
    make_llama_multi(log)
    make_bert_classifier(log)
    make_llama_tied_lora(log)
    make_llama_dora(log)
    make_bert_lorabias(log)
    write_metadata()

    total = print_table()

    failures: list[str] = []
    if args.verify:
        print()
        failures = verify(log)

    if log:
        print("\nwarnings seen:")
        for tag, msgs in log.items():
            for m in msgs:
                print(f"  {tag}: {m}")
    if total > 4 * 1024 * 1024:
        failures.append(f"testdata too large: {total} bytes")
    if failures:
        print("\nFAILURES:")
        for f in failures:
            print("  " + f)
        return 1
    if args.verify:
        print("\nverify: all adapters OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
