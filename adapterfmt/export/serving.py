"""Whether each serving engine serves an adapter as it is, what blocks it, and the export that fixes it.

:func:`serving_report` is what ``inspect --json`` shows as its ``serving`` block. Headers only
(no torch): it runs the export planner of :mod:`.plan` for every engine and reports, instead of
writing anything, what the engine would refuse, silently drop or scale differently.
"""

from __future__ import annotations

import shlex
from typing import Any

from ..checkpoint.records import AdapterCheckpoint
from ..errors import AdapterFormatError
from .engines import ENGINE_NAMES, ENGINES
from .plan import module_kinds, plan_export


def _silent(adapter: AdapterCheckpoint, engine_name: str) -> list[str]:
    """What the engine would read differently from PEFT without refusing (a different model served)."""
    cfg = adapter.config
    engine = ENGINES[engine_name]
    out = []
    if cfg.use_rslora and engine.scale in ("alpha_over_r", "alpha_over_tensor_rank"):
        out.append("rsLoRA (the engine scales by alpha / r: sqrt(r) times too weak)")
    if cfg.alpha_pattern and engine.scale != "peft":
        out.append("alpha_pattern (ignored by the engine)")
    if cfg.rank_pattern and engine.scale == "alpha_over_r":
        out.append("rank_pattern (ignored by the engine)")
    if engine.name == "vllm" and adapter.token_deltas:
        out.append("trainable_token_indices (vLLM drops the field silently)")
    return out


def serving_report(checkpoint: AdapterCheckpoint) -> dict[str, dict[str, Any]]:
    """Per engine (``vllm``, ``sglang``, ``llama.cpp``, ``portable``): ``accepted`` (the engine
    serves the adapter as it is and computes what PEFT computes), ``blockers`` (one short phrase
    each: what it refuses, drops or scales differently), ``fix_command`` (the ``adapterfmt
    export`` command that makes an adapter it serves; ``None`` where no export can).
    """
    out: dict[str, dict[str, Any]] = {}
    source = shlex.quote(checkpoint.directory)
    kinds = module_kinds(checkpoint)  # one pass over the modules for the four plans
    for name in ENGINE_NAMES:
        engine = ENGINES[name]
        try:
            plan = plan_export(checkpoint, name, kinds=kinds)
        except AdapterFormatError as e:
            out[name] = {"accepted": False, "blockers": [e.message], "fix_command": None}
            continue
        blockers = list(plan.blockers) + _silent(checkpoint, name)
        if engine.output == "gguf":
            blockers.insert(0, "needs a GGUF LoRA file")
        elif name == "portable":
            if plan.folds and not blockers:
                blockers.append("the scale is not in the factors (lora_alpha != r)")
            if plan.pads:
                blockers.append("modules of different ranks")
        if plan.dropped and name in ("sglang", "portable") and not blockers:  # vLLM and llama.cpp skip them themselves
            blockers.append(f"base_layer copies the engine does not read ({len(plan.dropped)})")
        out_name = "adapter.gguf" if engine.output == "gguf" else f"{name}-adapter"
        cmd = f"adapterfmt export --adapter {source} --for {name} -o {out_name}"
        if plan.needs_base:
            cmd += " --base BASE --base-out serving-base"
        elif engine.output == "gguf":
            cmd += " --base BASE"
        out[name] = {"accepted": not blockers, "blockers": blockers, "fix_command": None if not blockers else cmd, "max_lora_rank": plan.max_lora_rank}
    return out


def serving_line(report: dict[str, dict[str, Any]]) -> str:
    """One line for ``inspect``: ``serving: vllm ok, sglang needs export (rsLoRA ...), ...``."""
    parts = []
    for name, r in report.items():
        parts.append(f"{name} ok" if r["accepted"] else f"{name}: {r['blockers'][0]}")
    return "serving: " + "; ".join(parts)
