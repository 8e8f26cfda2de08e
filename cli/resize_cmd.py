"""``adapterfmt resize ADAPTER -o OUT (--rank N | --energy F | --ratio R | --cumulative C)``."""

from __future__ import annotations

from typing import Optional

import click

from .base_options import ADAPTER_REVISION_HELP, WEIGHT_NAME_HELP

EXAMPLES = """
\b
Examples:
  adapterfmt resize my-adapter -o my-adapter-r16 --rank 16
  adapterfmt resize my-adapter -o smaller --energy 0.99 --json
  adapterfmt resize lora.safetensors -o lora-small.safetensors --ratio 8
"""


@click.command("resize", epilog=EXAMPLES)
@click.argument("adapter", metavar="ADAPTER")
@click.option("-o", "--output", required=True, metavar="OUT", help="Output: an adapter directory (PEFT source) or a .safetensors file (kohya / diffusers source).")
@click.option("--rank", type=float, metavar="N", help="Keep at most N singular values per module.")
@click.option("--energy", type=float, metavar="F", help="Keep the fewest singular values that hold the fraction F of ‖Δ‖² (kohya sv_fro p = energy p²).")
@click.option("--ratio", type=float, metavar="R", help="Keep every singular value ≥ S₀/R (kohya sv_ratio).")
@click.option("--cumulative", type=float, metavar="C", help="Keep the fewest singular values whose sum is the fraction C of ΣS (kohya sv_cumulative).")
@click.option("--dtype", default="fp32", show_default=True, metavar="fp32|bf16|fp16|source",
              help="dtype of the new factors (source: each module's own); errors are measured as stored.")
@click.option("--weight-name", metavar="FILE", help=WEIGHT_NAME_HELP)
@click.option("--revision", metavar="REV", help=ADAPTER_REVISION_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def resize_command(adapter: str, output: str, rank: Optional[float], energy: Optional[float], ratio: Optional[float],
                   cumulative: Optional[float], dtype: str, weight_name: Optional[str], revision: Optional[str], overwrite: bool,
                   as_json: bool) -> None:
    """Lower the rank of every module of a LoRA adapter, exactly, from its factors.

    Per module, the SVD of its delta s·B·A is computed from the factors (no m×n matrix), the
    rank is chosen by the rule, and the new factors U·√S and √S·Vᵀ are written (float32 unless
    --dtype says otherwise) with ranks and alphas that give PEFT's scale 1 (rank_pattern / alpha_pattern where modules differ). The
    report gives per module the old and new rank, the retained energy and the relative
    Frobenius error ‖Δ − Δ′‖/‖Δ‖ of what was written (docs/BEHAVIOUR.md §9.1).

    ADAPTER is a PEFT adapter directory, a Hub id, or a kohya / LyCORIS / diffusers LoRA file
    (written back as a file of its own format).

    Exit status: 0 on success; 2 when the input cannot be resized (one "Error:" line; nothing written).
    """
    from adapterfmt.algebra.resize import resize
    from adapterfmt.deltas.rank_rules import make_rule
    from adapterfmt.errors import InvalidConfigError

    given = [(k, v) for k, v in (("rank", rank), ("energy", energy), ("ratio", ratio), ("cumulative", cumulative)) if v is not None]
    if len(given) != 1:
        raise InvalidConfigError("give exactly one of --rank, --energy, --ratio, --cumulative", hint="e.g. --rank 16 or --energy 0.99")
    rule = make_rule(*given[0])
    report = resize(adapter, output, rule=rule, overwrite=overwrite, revision=revision, weight_name=weight_name, dtype=dtype)
    from .algebra_text import print_report

    print_report(report, as_json)
