"""Output of a ``resize`` / ``combine`` report: its JSON (the report's ``as_dict``) or a table and notes."""

from __future__ import annotations

from typing import Any

import click

from .output import emit_json, table


def render(report: Any) -> str:
    """A table of modules (old and new rank, retained energy, relative error) and a totals line."""
    rows = [(r.module, r.layer_kind, r.old_rank, r.new_rank, f"{r.retained_energy:.6f}", f"{r.error:.3e}", "DoRA" if r.dora else "")
            for r in report.rows]
    t = report.totals()
    lines = [
        table(rows, ["module", "kind", "old rank", "new rank", "energy kept", "rel. error", ""], align_right=(2, 3, 4, 5)),
        "",
        f"{t['modules']} modules ({t['changed_rank']} changed rank), {t['params_before']:,} -> {t['params_after']:,} parameters; "
        f"energy kept {t['retained_energy']:.6f}, relative error {t['error']:.3e} (max {t['max_error']:.3e})",
        f"written: {report.output} ({report.format})",
    ]
    if report.carried:
        lines.append(f"carried unchanged: {len(report.carried)} tensor(s) (full copies, trainable tokens, saved base tensors)")
    return "\n".join(lines)


def emit_notes(report: Any) -> None:
    for note in report.notes:
        click.echo(f"note: {note}", err=True)


def print_report(report: Any, as_json: bool) -> None:
    """Print ``report`` (one JSON document, or the table with its notes on stderr); the command is
    then done and the console script may leave without the interpreter's teardown."""
    from .main import done_without_teardown

    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(render(report))
        emit_notes(report)
    done_without_teardown(report)
