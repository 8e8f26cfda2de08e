"""``adapterfmt inspect``: describe an adapter from its config and header."""

from __future__ import annotations

import os
from typing import Optional

import click

from adapterfmt.constants import ADAPTER_CONFIG_FILE
from adapterfmt.formats.peft.reading import read_adapter
from adapterfmt.reports.inspect import foreign_inspect_report, inspect_report
from adapterfmt.storage.gc_pause import with_gc_paused

from .base_options import ADAPTER_REVISION_HELP, PICKLE_HELP, WEIGHT_NAME_HELP, base_options, single_file_kind_option
from .main import done_without_teardown
from .output import emit_json, emit_report, warn
from .render import render_inspect

EXAMPLES = """
\b
Examples:
  adapterfmt inspect testdata/tiny-llama-lora
  adapterfmt inspect testdata/tiny-llama-multi --subfolder second --json
  adapterfmt inspect testdata/tiny-llama-tied-lora --base testdata/tiny-llama-tied --strict
  adapterfmt inspect user/my-adapter --scan
  adapterfmt inspect my_lora.safetensors --scan --json
  adapterfmt inspect user/sdxl-loras --weight-name style.safetensors --revision v1.0
"""


def _inspect_wrapped(path: str, *, as_json: bool, scan: bool, base: Optional[str], allow_pickle: bool, strict: bool) -> None:
    """A wrapped ``PeftModel.state_dict()``: its layout and copy status, then each adapter in it
    as an adapter (:mod:`adapterfmt.formats.wrapped.reading`)."""
    from adapterfmt.formats.wrapped.reading import read_wrapped

    if base is not None:
        raise click.UsageError("--base does not apply to a wrapped checkpoint: it carries its own base")
    wrapped = read_wrapped(path, allow_pickle=allow_pickle)
    scans = {}
    if scan:
        from adapterfmt.reports.scan import non_finite_findings

        scans = {name: non_finite_findings(ckpt) for name, ckpt in wrapped.adapters.items()}
    reports = {name: inspect_report(ckpt, source=path, scan_findings=scans.get(name)) for name, ckpt in wrapped.adapters.items()}
    warnings = list(wrapped.findings) + [w for r in reports.values() for w in r.warnings]
    if as_json:
        emit_json({"format": "wrapped", "source": path, **wrapped.as_dict(), "adapter_reports": {n: r.as_dict() for n, r in reports.items()},
                   "warnings": [w.as_dict() for w in warnings]})  # each adapter report: the inspect document of one adapter
    else:
        click.echo("\n\n".join([wrapped.summary()] + [render_inspect(r) for r in reports.values()]))
        for w in warnings:
            warn(f"warning[{w.code}]: {w.message}")
    if strict and warnings:
        warn(f"{len(warnings)} warning(s); failing because of --strict")
        raise click.exceptions.Exit(1)


@click.command("inspect", epilog=EXAMPLES)
@click.argument("adapter", metavar="PATH_OR_HUB_ID")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (modules, totals, warnings) instead of a table.")
@click.option("--scan", is_flag=True, help="Also read every tensor's values (kohya/diffusers alpha scalars included) and report NaN/Inf (non-finite); loads torch.")
@click.option("--base", "base", metavar="MODEL", help="Also resolve against this base model (directory or Hub id), from headers.")
@click.option("--subfolder", metavar="NAME", help="Inspect the sub-adapter (or kohya/diffusers file) stored in <PATH>/<NAME>/.")
@click.option("--weight-name", metavar="FILE", help=WEIGHT_NAME_HELP)
@click.option("--revision", metavar="REV", help=ADAPTER_REVISION_HELP)
@base_options()
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@single_file_kind_option
@click.option("--component", metavar="NAME", help="kohya/diffusers files: the component (unet, text_encoder, text_encoder_2, transformer) --base stands for. A PEFT adapter on a single-file checkpoint: the component it adapts, where its names and shapes fit several.")
@click.option("--strict", is_flag=True, help="Exit 1 if there is any warning.")
@with_gc_paused  # header-only: millions of acyclic records for a big adapter, which the cyclic collector would walk again and again
def inspect_command(
    adapter: str,
    as_json: bool,
    scan: bool,
    base: Optional[str],
    subfolder: Optional[str],
    weight_name: Optional[str],
    revision: Optional[str],
    base_subfolder: Optional[str],
    base_revision: Optional[str],
    allow_pickle: bool,
    single_file_kind: Optional[str],
    component: Optional[str],
    strict: bool,
) -> None:
    """Describe a LoRA adapter: one row per module (kind, rank, alpha, scaling, dtype, params).

    Reads adapter_config.json and the safetensors header only; tensor values are read (and torch
    imported) only with --scan. Warnings (codes such as orphan-lora, rank-mismatch, unknown-key,
    config-tensor-mismatch, target-and-full-copy, tied-full-copy with --base, non-finite with
    --scan) go to stderr, or into "warnings" with --json.

    The format is detected (JSON "format"): a PEFT directory, a wrapped state dict, a kohya /
    LyCORIS file (lora_unet_*, lora_te*_*) or a diffusers LoRA file (unet.*, transformer.*,
    text_encoder*.*), see docs/FORMAT.md §10. --scan works for every format. A Hub repo holding
    such a file is read by HTTP range requests (header and alpha scalars; --scan downloads it).

    Exit status: 0 when the adapter could be read, warnings or not; 1 with --strict when there
    is a warning, or when --base does not resolve a kohya/diffusers file; 2 when the input cannot
    be read (one "Error:" line).
    """
    # An adapter directory is never a wrapped state dict; only other paths pay for importing that reader.
    if subfolder is None and weight_name is None and os.path.exists(adapter) and not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG_FILE)):
        from adapterfmt.formats.detect import detect_format

        if detect_format(adapter) == "wrapped":
            _inspect_wrapped(adapter, as_json=as_json, scan=scan, base=base, allow_pickle=allow_pickle, strict=strict)
            return
    from adapterfmt.formats.locate import locate_foreign

    # kohya / LyCORIS / diffusers files and PEFT's LoHa / LoKr: the factor records of docs/FORMAT.md §10
    source = locate_foreign(adapter, subfolder=subfolder, weight_name=weight_name, revision=revision, download=scan)
    check = None
    if source is not None:
        foreign = keep = source.read()
        if base is not None:
            from .check_cmd import foreign_check

            check = foreign_check(foreign, adapter, base, None if source.format == "peft" else component, single_file_kind)
        scan_findings = None
        if scan:
            from adapterfmt.reports.scan import foreign_non_finite_findings

            scan_findings = foreign_non_finite_findings(foreign)
        report = foreign_inspect_report(foreign, source=adapter, check=check, scan_findings=scan_findings)
    else:
        ckpt = keep = read_adapter(adapter, subfolder=subfolder, revision=revision, allow_pickle=allow_pickle)
        if base is not None:
            from adapterfmt.reports.check import check_document  # only with --base: keeps the plain path's imports small

            from .check_cmd import peft_resolution

            _model, res = peft_resolution(ckpt, base, component=component, single_file_kind=single_file_kind, base_subfolder=base_subfolder,
                                          base_revision=base_revision, allow_pickle=allow_pickle, prefix_map=None)
            check = check_document(res, adapter=adapter, base=base)
        scan_findings = None
        if scan:
            from adapterfmt.reports.scan import non_finite_findings

            scan_findings = non_finite_findings(ckpt)
        from adapterfmt.export.serving import serving_report

        report = inspect_report(ckpt, source=adapter, check=check, scan_findings=scan_findings, serving=serving_report(ckpt))
    if as_json:
        emit_json(report.as_dict(rows_as_records=True))
    else:
        emit_report(report, render_inspect, as_json=False)
    done_without_teardown(keep, report)
    if source is not None and check is not None and not check.ok:  # a kohya / diffusers file that does not resolve (BEHAVIOUR §7.2)
        raise click.exceptions.Exit(1)
    if strict and report.warnings:
        warn(f"{len(report.warnings)} warning(s); failing because of --strict")
        raise click.exceptions.Exit(1)
