"""Output helpers shared by commands: JSON to stdout, tables, progress bars on stderr.

stdout carries data only (a table, or with ``--json`` one JSON document with
``format_version``); progress, warnings and hints go to stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, Iterable, Sequence

import click

from adapterfmt.constants import FORMAT_VERSION


def emit_json(doc: dict[str, Any]) -> None:
    """Print ``doc`` (with ``format_version`` first) as JSON on stdout."""
    click.echo(json.dumps({"format_version": FORMAT_VERSION, **doc}, indent=2, sort_keys=False))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str], *, align_right: Iterable[int] = ()) -> str:
    """A padded text table."""
    right = set(align_right)
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit_report(report: Any, render: Callable[[Any], str], *, as_json: bool) -> None:
    """A report as JSON (``report.as_dict()``) or as text on stdout plus its warnings on stderr."""
    if as_json:
        emit_json(report.as_dict())
        return
    click.echo(render(report))
    for w in report.warnings:
        warn(f"warning[{w.code}]: {w.message}")


def warn(message: str) -> None:
    """One line on stderr."""
    click.echo(message, err=True)


def progress_enabled(quiet: bool) -> bool:
    """Progress bars only for humans: stderr is a TTY and ``--quiet`` is not set."""
    return not quiet and sys.stderr.isatty()
