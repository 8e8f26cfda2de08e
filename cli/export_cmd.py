"""``adapterfmt export``: an adapter a serving engine accepts, and a serving base for what it can't serve."""

from __future__ import annotations

from typing import Optional

import click

from .base_options import ADAPTER_REVISION_HELP, PICKLE_HELP, REVISION_HELP
from .main import done_without_teardown
from .output import emit_json

EXAMPLES = """
\b
Examples:
  adapterfmt export --adapter A --for vllm -o A-vllm
  adapterfmt export --adapter A --for sglang -o A-sglang --max-lora-rank 64
  adapterfmt export --adapter A --for llama.cpp --base BASE -o A.gguf --outtype f16
  adapterfmt export --adapter A --for portable --base BASE --base-out serving-base -o A-portable --json
"""


@click.command("export", epilog=EXAMPLES)
@click.option("--adapter", required=True, metavar="ADAPTER", help="PEFT LoRA adapter directory or Hub id.")
@click.option("--adapter-revision", metavar="REV", help=ADAPTER_REVISION_HELP)
@click.option("--for", "engine", required=True, type=click.Choice(["vllm", "sglang", "llama.cpp", "portable"]), help="The serving engine (portable: what vLLM, SGLang, TGI, LoRAX and TensorRT-LLM all read alike).")
@click.option("-o", "--output", required=True, metavar="OUT", help="Output adapter directory (llama.cpp: the .gguf file).")
@click.option("--base", metavar="BASE", help="Base model directory or Hub id: its config.json for llama.cpp, its weights for --base-out.")
@click.option("--base-revision", metavar="REV", help=REVISION_HELP)
@click.option("--base-out", metavar="BASE_OUT", help="Write a serving base here: a copy of --base with what the engine cannot serve merged in.")
@click.option("--max-lora-rank", type=int, metavar="N", help="The engine's --max-lora-rank: refuse a higher rank (default: report the one needed).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f32", show_default=True, help="llama.cpp: GGUF tensor type (as convert_lora_to_gguf.py).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (atomically).")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
def export_command(
    adapter: str,
    adapter_revision: Optional[str],
    engine: str,
    output: str,
    base: Optional[str],
    base_revision: Optional[str],
    base_out: Optional[str],
    max_lora_rank: Optional[int],
    outtype: str,
    overwrite: bool,
    allow_pickle: bool,
    as_json: bool,
) -> None:
    """Export a PEFT LoRA adapter for vLLM, SGLang, llama.cpp (GGUF) or all of them (portable).

    Keeps what the engine reads as PEFT does, folds into lora_B what it scales differently
    (rsLoRA, alpha_pattern, rank patterns; bit-exact for a power-of-two factor, else float32),
    drops what no engine reads (base_layer copies), and lists what it cannot serve at all: full
    copies, DoRA and lora_bias modules, trainable tokens, saved base biases. Those go into a
    serving base with --base B --base-out BASE_OUT (merged by the streaming merge engine);
    without them the command stops with exit code 2 and writes nothing.
    """
    if outtype != "f32" and engine != "llama.cpp":
        raise click.UsageError("--outtype applies to --for llama.cpp only")
    from adapterfmt.export.run import export_adapter

    result = export_adapter(
        adapter,
        engine,
        output,
        base=base,
        base_out=base_out,
        max_lora_rank=max_lora_rank,
        outtype=outtype,
        overwrite=overwrite,
        revision=adapter_revision,
        base_revision=base_revision,
        allow_pickle=allow_pickle,
    )
    if as_json:
        emit_json(result.as_dict())
    else:
        plan = result.plan
        folded = [m for m in plan.kept if m.action == "fold"]
        click.echo(
            f"{result.output}: {len(plan.kept)} modules for {engine}"
            + (f" ({len(folded)} with the scale folded into lora_B, {plan.exactness})" if folded else "")
            + (f"; start it with max_lora_rank {plan.max_lora_rank}" if plan.max_lora_rank is not None else "")
        )
        if result.serving_base:
            click.echo(f"{result.serving_base}: serving base ({'; '.join(plan.blockers)})")
        if plan.dropped:
            click.echo(f"dropped {len(plan.dropped)} base_layer copies no engine reads")
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
    done_without_teardown()
