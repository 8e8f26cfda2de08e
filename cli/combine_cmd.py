"""``adapterfmt combine A[:W] B[:W] ... -o OUT --method M``."""

from __future__ import annotations

from typing import Optional

import click


EXAMPLES = """
\b
Examples:
  adapterfmt combine style-a style-b -o both --method cat
  adapterfmt combine style-a:0.7 style-b:0.3 -o mix --method svd --rank 32
  adapterfmt combine a b c -o merged --method ties --density 0.5 --rank 64 --json
  adapterfmt combine a b -o merged --method dare_linear --density 0.3 --seed 7
"""


def parse_source(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); a colon whose tail is no number belongs to the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


@click.command("combine", epilog=EXAMPLES)
@click.argument("sources", nargs=-1, required=True, metavar="ADAPTER[:WEIGHT]...")
@click.option("-o", "--output", required=True, metavar="OUT", help="Adapter directory to create (new or empty).")
@click.option("--method", required=True, metavar="M", help="cat, linear, svd, ties, dare_linear, dare_ties or magnitude_prune.")
@click.option("--rank", type=int, metavar="N", help="Rank of every output module (default: the sum of the sources' ranks, exact for cat/linear/svd).")
@click.option("--density", type=float, metavar="D", help="ties / dare_* / magnitude_prune: fraction of each delta kept, in (0, 1].")
@click.option("--majority-sign", "majority_sign", default="total", show_default=True, metavar="total|frequency", help="ties / dare_ties: how the sign is elected.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare_*: seed of the drop masks (same result on every run and machine).")
@click.option("--dtype", default="fp32", show_default=True, metavar="fp32|bf16|fp16|source",
              help="dtype of the combined factors (source: the sources' own, when they agree); errors are measured as stored.")
@click.option("--copies-from", "copies_from", type=int, metavar="N", help="Take full copies / trainable tokens / saved base tensors from source N (0-based) when the sources' differ.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def combine_command(sources: tuple[str, ...], output: str, method: str, rank: Optional[int], density: Optional[float], majority_sign: str,
                    seed: int, dtype: str, copies_from: Optional[int], overwrite: bool, as_json: bool) -> None:
    """Combine LoRA adapters into one, on their deltas: Σ wᵢ·sᵢ·Bᵢ·Aᵢ with each source's own scale.

    cat is exact at rank Σrᵢ (PEFT's bits); linear and svd are exact at that rank or truncated by
    the exact SVD of the stacked factors to --rank; ties, dare_linear, dare_ties and
    magnitude_prune apply PEFT's rules to each module's dense deltas, one module at a time, and
    factorize the result. Factors are written in float32 unless --dtype says otherwise. The report gives per module the relative error against the exact
    weighted sum (docs/BEHAVIOUR.md §9.2). Sources are PEFT LoRA directories or Hub ids; no base
    model is loaded.

    Exit status: 0 on success; 2 when the inputs cannot be combined (one "Error:" line; nothing written).
    """
    from adapterfmt.algebra.combine import combine

    parsed = [parse_source(s) for s in sources]
    report = combine(parsed, output, method=method, rank=rank, density=density,
                     majority_sign=majority_sign, seed=seed, copies_from=copies_from, overwrite=overwrite, dtype=dtype)
    from .algebra_text import print_report

    print_report(report, as_json)
