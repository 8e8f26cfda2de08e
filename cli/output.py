"""Output helpers shared by commands: JSON to stdout, tables, progress bars on stderr.

stdout carries data only (a table, or with ``--json`` one JSON document with
``format_version``); progress, warnings and hints go to stderr.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import click

from adapterfmt.constants import FORMAT_VERSION


def emit_json(doc: dict[str, Any]) -> None:
    """Print ``doc`` (with ``format_version`` first) as JSON on stdout.

    The two outer levels are indented; anything deeper (one module row, one finding) is one
    line, encoded by ``json``'s C encoder. A 100k-module report is a 70 MB document: indenting it
    all goes through ``json``'s pure-Python encoder (40 s), and ``json.dumps`` would hold it,
    plus the millions of fragments it joins, in memory at once. So it is streamed in 64 KiB pieces,
    and ``doc`` is consumed: each list item is dropped once written (callers build ``doc`` for this).
    """
    pieces: list[str] = []
    size = 0
    for chunk in _encode({"format_version": FORMAT_VERSION, **doc}, 0):
        pieces.append(chunk)
        size += len(chunk)
        if size >= 1 << 16:
            click.echo("".join(pieces), nl=False)
            pieces.clear()
            size = 0
    pieces.append("\n")
    click.echo("".join(pieces), nl=False)


_OUTER_LEVELS = 2


def _key(key: Any) -> str:
    """A dict key as ``json`` writes it (``True`` -> ``"true"``, ``1`` -> ``"1"``)."""
    return json.dumps({key: None})[1:-7]


def _encode(value: Any, level: int) -> Iterator[str]:
    """JSON text of ``value``: containers above :data:`_OUTER_LEVELS` indented, the rest compact."""
    if level >= _OUTER_LEVELS or not isinstance(value, (dict, list, tuple)) or not value:
        yield _compact(value)
        return
    pad, inner = "  " * level, "  " * (level + 1)
    is_dict = isinstance(value, dict)
    yield "{" if is_dict else "["
    items = value.items() if is_dict else ((None, v) for v in value)
    nested = level + 1 < _OUTER_LEVELS
    for i, (key, item) in enumerate(items):
        head = ("," if i else "") + "\n" + inner + (_key(key) + ": " if is_dict else "")
        if nested:
            yield head
            yield from _encode(item, level + 1)
        else:  # one compact line per item (a module row): no generator per row
            yield head + _compact(item)
        if type(value) is list:
            value[i] = None  # the document is built for this output only: let each row go once written
    yield "\n" + pad + ("}" if is_dict else "]")


def _compact(value: Any) -> str:
    """``value`` as one line of strict JSON (``", "`` and ``": "`` separators; NaN / Infinity as
    null). A record (a ``NamedTuple`` with ``as_dict()``, such as a report's row) is written as its dict,
    or as its own ``to_json()`` line where it has one."""
    if isinstance(value, tuple) and hasattr(value, "as_dict"):
        to_json = getattr(value, "to_json", None)
        if to_json is not None:  # a record that writes its own line (an inspect row: 100k of them)
            return to_json()
        value = value.as_dict()
    try:
        return _ONE_LINE(value)
    except ValueError:  # NaN / Infinity are not JSON: a NaN alpha read from a file is written as null
        return _ONE_LINE(_finite_or_null(value))


#: ``json.dumps(value, separators=...)`` builds a new ``JSONEncoder`` per call, which was a third of
#: the cost of writing a 100k-row report; one encoder serves every row.
_ONE_LINE = json.JSONEncoder(separators=(", ", ": "), allow_nan=False).encode


def _finite_or_null(value: Any) -> Any:
    """``value`` with every NaN / infinite float replaced by ``None`` (strict JSON parsers reject them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


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
