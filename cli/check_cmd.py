"""``adapterfmt check``: prove an adapter binds to a base model, from headers only."""

from __future__ import annotations

from typing import Optional

import click

from adapterfmt.base.reading import read_base
from adapterfmt.formats.peft.reading import read_adapter
from adapterfmt.storage.gc_pause import with_gc_paused
from adapterfmt.base.resolution import resolve
from adapterfmt.reports.summary import CheckReport, check_report

from .base_options import ADAPTER_REVISION_HELP, PICKLE_HELP, WEIGHT_NAME_HELP, base_options
from .main import done_without_teardown
from .output import emit_report

EXAMPLES = """
\b
Examples:
  adapterfmt check --base testdata/tiny-llama --adapter testdata/tiny-llama-lora
  adapterfmt check --base my-vlm --adapter my-lora --prefix-map model.=language_model.model.
"""


def parse_prefix_map(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """``("OLD=NEW", ...)`` -> ``{OLD: NEW}``, in the order given (the first matching rewrite wins)."""
    out: dict[str, str] = {}
    for v in values:
        old, sep, new = v.partition("=")
        if not sep:
            raise click.BadParameter(f"{v!r} is not OLD=NEW (e.g. model.=language_model.model.)", ctx=ctx, param=param)
        out[old] = new
    return out


def render_check(report: CheckReport) -> str:
    """The human-readable check result (stdout)."""
    lines = [report.summary]
    if report.overrides_total:
        lines.append(f"{report.overrides_resolved}/{report.overrides_total} base overrides resolved")
    if report.unresolved_count:
        more = report.unresolved_count - len(report.unresolved)
        lines.append(f"unresolved: {report.unresolved_count}" + (f" (first {len(report.unresolved)} listed)" if more else ""))
        lines += [f"  {u.name}  (no base tensor '{u.looked_for}')" for u in report.unresolved]
        if more:
            lines.append(f"  ... and {more} more")
    suggestion = report.suggestion_text()
    if suggestion:
        lines.append(suggestion)
    if report.shape_errors:
        lines.append(f"shape errors ({len(report.shape_errors)}):")
        lines += [f"  {e}" for e in report.shape_errors]
    if report.unknown_keys:
        lines.append(f"tensors that fit no rule of the format and bind to nothing ({len(report.unknown_keys)}):")
        lines += [f"  {k}" for k in report.unknown_keys[:10]]
    return "\n".join(lines)


@click.command("check", epilog=EXAMPLES)
@click.option("--base", required=True, metavar="MODEL", help="Base model: a model or pipeline directory, a weights file, or a Hub id (headers only).")
@click.option("--adapter", required=True, metavar="ADAPTER", help="Adapter directory, kohya/diffusers file, or Hub id.")
@click.option("--subfolder", metavar="NAME", help="Check the sub-adapter (or kohya/diffusers file) stored in <ADAPTER>/<NAME>/.")
@click.option("--weight-name", metavar="FILE", help=WEIGHT_NAME_HELP)
@click.option("--adapter-revision", metavar="REV", help=ADAPTER_REVISION_HELP)
@click.option(
    "--prefix-map",
    multiple=True,
    metavar="OLD=NEW",
    callback=parse_prefix_map,
    help="Rewrite adapter module paths starting with OLD to start with NEW before matching (repeatable).",
)
@base_options()
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@click.option("--component", metavar="NAME", help="kohya/diffusers files: the component --base stands for (unet, text_encoder, text_encoder_2, transformer).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--strict", is_flag=True, help="Also exit 1 if there is any warning.")
@with_gc_paused  # header-only: millions of acyclic records for a big adapter, which the cyclic collector would walk again and again
def check_command(
    base: str,
    adapter: str,
    subfolder: Optional[str],
    weight_name: Optional[str],
    adapter_revision: Optional[str],
    prefix_map: dict[str, str],
    base_subfolder: Optional[str],
    base_revision: Optional[str],
    allow_pickle: bool,
    component: Optional[str],
    as_json: bool,
    strict: bool,
) -> None:
    """Check that every adapter module resolves to exactly one base tensor with a matching shape.

    Reads config.json and safetensors headers only (no tensor values, no torch). Prints
    "N/N LoRA targets and M/M full copies resolved"; on failure lists the first unresolved
    names and, where one exists, the prefix rewrite that fixes them. Also warns where PEFT's
    plain endswith matching of modules_to_save would bind a different or more than one module.

    Exit status: 0 when everything resolves with matching shapes; 1 on zero or partial
    resolution, a shape error or a tensor the format does not explain (or, with --strict, any
    warning); 2 when an input cannot be read.

    A kohya / LyCORIS or diffusers LoRA file (or a PEFT LoHa / LoKr directory) is checked per
    component against a component or pipeline directory (docs/BEHAVIOUR.md §7.2); in a Hub repo
    it is read by HTTP range requests (header and alpha scalars only).
    """
    from adapterfmt.formats.locate import locate_foreign

    source = locate_foreign(adapter, subfolder=subfolder, weight_name=weight_name, revision=adapter_revision)
    if source is not None:
        from .foreign_inspect import check_foreign

        check_foreign(source, adapter, base=base, component=component, as_json=as_json, strict=strict)
        return
    if component is not None:
        raise click.UsageError("--component applies to kohya/diffusers adapter files only")
    ckpt = read_adapter(adapter, subfolder=subfolder, revision=adapter_revision, allow_pickle=allow_pickle)
    model = read_base(base, subfolder=base_subfolder, revision=base_revision, allow_pickle=allow_pickle)
    res = resolve(ckpt, model, prefix_map=prefix_map or None)
    report = check_report(res, adapter=adapter, base=base, prefix_map=prefix_map)
    emit_report(report, render_check, as_json=as_json)
    done_without_teardown(ckpt, model, res, report)
    if not report.ok or (strict and report.warnings):
        raise click.exceptions.Exit(1)
