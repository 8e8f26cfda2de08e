"""``adapterfmt verify DIR``: check a model or adapter directory from its headers."""

from __future__ import annotations

import click

from adapterfmt.reports.verify import verify_directory

from .output import emit_json, table, warn


@click.command("verify")
@click.argument("directory", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with every problem found.")
def verify_command(directory: str, as_json: bool) -> None:
    """Check a model or adapter directory without loading tensors.

    For a model: the index covers every key exactly once, names only shards inside the
    directory, every shard's header is sound and metadata.total_size matches. For an adapter:
    the config is valid, the header is sound, every key fits the grammar and A/B ranks agree.

    Exit code 0: no problem; 1: problems found (listed); 2: DIRECTORY cannot be checked.
    """
    findings = verify_directory(directory)
    if as_json:
        emit_json({"directory": directory, "ok": not findings, "problems": [f.as_dict() for f in findings]})
    elif findings:
        click.echo(table([(f.code, f.message) for f in findings], ["problem", "where and what"]))
    else:
        click.echo(f"{directory}: ok")
    if findings:
        warn(f"{len(findings)} problem(s) found in {directory}")
        raise click.exceptions.Exit(1)
