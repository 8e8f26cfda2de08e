"""``adapterfmt extract``: a PEFT LoRA adapter for the difference between a fine-tune and its base."""

from __future__ import annotations

from typing import Optional

import click

from .main import done_without_teardown
from .output import emit_json, table, warn

EXAMPLES = """
\b
Examples:
  adapterfmt extract --base meta-llama/Llama-3.2-1B --tuned my-finetune -o my-adapter --rank 16
  adapterfmt extract --base B --tuned T -o OUT --energy 0.9 --target-modules q_proj v_proj --json
  adapterfmt extract --base B --tuned T -o OUT --rank 64 --full-copies lm_head
  adapterfmt extract --base B --tuned T -o OUT --rank 32 --for vllm
"""


@click.command("extract", epilog=EXAMPLES)
@click.option("--base", required=True, metavar="MODEL", help="The base model: a directory, weights file or Hub id.")
@click.option("--tuned", required=True, metavar="MODEL", help="The fine-tuned model (same architecture and shapes).")
@click.option("-o", "--output", "out", required=True, metavar="OUT", help="The adapter directory to write (atomically).")
@click.option("--rank", type=int, metavar="N", help="Rank of every module (capped at its smallest dimension).")
@click.option("--energy", type=float, metavar="F", help="Keep the fraction F of each module's squared Frobenius norm (0 < F <= 1); rank per module.")
@click.option("--target-modules", multiple=True, metavar="NAME", help="Only these modules (PEFT's suffix rule; repeatable, or several after one flag).")
@click.option("--full-copies", multiple=True, metavar="NAME", help="Save these modules whole (modules_to_save) where they changed (repeatable).")
@click.option("--for", "target", type=click.Choice(["vllm"]), help="An adapter this engine loads: no full copies, no lora_bias, rank <= 512.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True, help="dtype of the LoRA factors (errors are measured as stored).")
@click.option("--svd", type=click.Choice(["auto", "randomized", "exact"]), default="auto", show_default=True,
              help="auto: randomized, exact SVD where it misses the rule's target; randomized: with --rank, take the randomized result "
                   "without the optimality certificate (fast on dense deltas; its error is still exact); exact: always the exact SVD.")
@click.option("--base-revision", metavar="REV", help="Hub revision of --base.")
@click.option("--tuned-revision", metavar="REV", help="Hub revision of --tuned.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/schemas/extract.schema.json).")
@click.argument("extra_targets", nargs=-1, metavar="")
def extract_command(
    base: str,
    tuned: str,
    out: str,
    rank: Optional[int],
    energy: Optional[float],
    target_modules: tuple[str, ...],
    full_copies: tuple[str, ...],
    target: Optional[str],
    seed: int,
    dtype: str,
    svd: str,
    base_revision: Optional[str],
    tuned_revision: Optional[str],
    overwrite: bool,
    as_json: bool,
    extra_targets: tuple[str, ...],
) -> None:
    """Extract a PEFT LoRA adapter for TUNED − BASE, one module at a time.

    Per module: a randomized SVD whose error is then computed exactly, the exact SVD where it
    misses the target of the rule (--rank or --energy). Bias deltas go to lora_B.bias
    (lora_bias: true), unchanged tensors are skipped, changed tensors that are not low-rank
    material (norms, embeddings, resized vocabularies) are listed, and saved whole only when
    named in --full-copies.
    """
    from adapterfmt.extraction.extract import extract_adapter

    if extra_targets and not target_modules:
        raise click.UsageError(f"unexpected argument {extra_targets[0]!r}")
    targets = list(target_modules) + list(extra_targets) if target_modules else None
    summary = extract_adapter(
        base, tuned, out, rank=rank, energy=energy, target_modules=targets, full_copies=full_copies, target=target,
        seed=seed, dtype=dtype, svd=svd, overwrite=overwrite, base_revision=base_revision, tuned_revision=tuned_revision,
    )  # fmt: skip
    doc = summary.as_dict()
    if as_json:
        emit_json(doc)
    else:
        rows = [(m["module"], "x".join(map(str, m["shape"])), m["rank"], f"{m['retained_energy']:.4f}", f"{m['relative_error']:.4f}", m["method"]) for m in doc["modules"]]
        click.echo(table(rows, ["module", "shape", "rank", "energy kept", "rel. error", "svd"], align_right=(2, 3, 4)))
        t = doc["totals"]
        click.echo(
            f"{summary.output}: {t['modules']} LoRA modules, {t['params']:,} params, relative error {t['relative_error']:.4f} "
            f"(energy kept {t['retained_energy']:.4f}); {t['unchanged_tensors']} tensors unchanged; {t['full_copies']} full copies"
        )
        for n in summary.not_low_rank:
            warn(f"{'saved as a full copy' if n.saved else 'not extracted'}: {n.key} ({n.reason})")
        for d in summary.dropped:
            warn(f"dropped: {d}")
    done_without_teardown(summary)
