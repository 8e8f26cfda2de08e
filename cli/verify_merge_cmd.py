"""``adapterfmt verify-merge``: is a merged model the merge of this adapter into this base?"""

from __future__ import annotations

from typing import Optional

import click

from .base_options import PICKLE_HELP, base_options
from .main import done_without_teardown
from .output import emit_json, table, warn

EXAMPLES = """
\b
Examples:
  adapterfmt verify-merge --base testdata/tiny-llama --adapter testdata/tiny-llama-lora --merged merged
  adapterfmt verify-merge --base M --adapter A --merged merged-on-gpu --tolerance ulp --json
"""


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


@click.command("verify-merge", epilog=EXAMPLES)
@click.option("--base", required=True, metavar="MODEL", help="The base model: a directory, weights file or Hub id.")
@click.option("--adapter", required=True, metavar="ADAPTER", help="The adapter directory or Hub id that was merged.")
@click.option("--merged", required=True, metavar="MERGED", help="The merged model directory or weights file to check.")
@click.option("--tolerance", type=click.Choice(["exact", "ulp"]), default="exact", show_default=True,
              help="exact: bit-equal to one of PEFT's merge paths; ulp: every element within one ulp of the merged dtype.")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@base_options()
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not only the merged, replaced and failing ones.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/schemas/verify-merge.schema.json).")
def verify_merge_command(
    base: str, adapter: str, merged: str, tolerance: str, allow_pickle: bool, base_subfolder: Optional[str], base_revision: Optional[str], show_all: bool, as_json: bool
) -> None:
    """Check MERGED against the merge of ADAPTER into BASE, tensor by tensor, streaming.

    Untouched tensors must be byte-equal to the base, full copies in place, merged tensors equal
    to one of PEFT's merge paths (default merge_and_unload, safe_merge) or, with --tolerance ulp,
    within one ulp. Each failing tensor gets a verdict naming the likely cause: not-applied,
    applied-twice, scale (with the factor), negated, transposed, wrong-module,
    full-copy-not-applied, tied-head-not-untied, changed, rounding, dtype.

    Exit code 0: the merge is right; 1: a tensor failed; 2: bad input (one line).
    """
    from adapterfmt.merge_verification.verify import verify_merge

    report = verify_merge(base, adapter, merged, tolerance=tolerance, allow_pickle=allow_pickle, base_subfolder=base_subfolder, base_revision=base_revision)
    ok, failed = report.ok, len(report.failures)
    if as_json:
        emit_json(report.as_dict())
    else:
        rows = [
            (t.key, t.action, t.verdict, t.path or "", _num(t.max_error), _num(t.mean_error), t.detail)
            for t in report.tensors
            if show_all or not t.ok or t.action != "copy"
        ]
        click.echo(table(rows, ["tensor", "action", "verdict", "path", "max err/Δ", "mean err/Δ", "detail"]))
        counts = report.counts()
        click.echo(f"{counts['passed']}/{counts['tensors']} tensors ok ({report.tolerance})" + (f", {failed} failed" if failed else ""))
    done_without_teardown(report)
    if not ok:
        warn(f"{failed} tensor(s) of {merged} are not the merge of {adapter} into {base}")
        raise click.exceptions.Exit(1)
