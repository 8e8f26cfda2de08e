"""``adapterfmt inspect``: describe an adapter from its config and header."""

from __future__ import annotations

import os
from typing import Optional

import click

from adapterfmt.constants import ADAPTER_CONFIG_FILE
from adapterfmt.formats.peft.reading import read_adapter
from adapterfmt.storage.gc_pause import with_gc_paused
from adapterfmt.reports.summary import InspectReport, check_report, inspect_report

from .base_options import ADAPTER_REVISION_HELP, PICKLE_HELP, WEIGHT_NAME_HELP, base_options
from .main import done_without_teardown
from .output import emit_json, emit_report, table, warn

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


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.6g}"


def render_inspect(report: InspectReport) -> str:
    """The human-readable inspect page (stdout)."""
    a = report.adapter
    lines = [
        f"adapter: {report.source} (name '{a['name']}', {a['weights_file']})",
        f"config:  r={a['r']} lora_alpha={_num(a['lora_alpha'])}"
        + (" use_rslora" if a["use_rslora"] else "")
        + (" use_dora" if a["use_dora"] else "")
        + (f" task={a['task_type']}" if a["task_type"] else "")
        + (f" peft={a['peft_version']}" if a["peft_version"] else "")
        + (f" base={a['base_model_name_or_path']}" if a["base_model_name_or_path"] else ""),
        "",
    ]
    rows = [
        (m.module, m.kind, "-" if m.rank is None else m.rank, _num(m.alpha), _num(m.scaling), m.dtype, f"{m.params:,}")
        for m in report.modules
    ]
    lines.append(table(rows, ("module", "kind", "rank", "alpha", "scaling", "dtype", "params"), align_right=(2, 3, 4, 6)))
    t = report.totals
    lines.append("")
    lines.append(
        f"totals: {t.lora_modules} LoRA modules, {t.full_copies} full cop{'y' if t.full_copies == 1 else 'ies'}"
        + (f", {t.token_deltas} token deltas" if t.token_deltas else "")
        + (f", {t.base_overrides} base overrides" if t.base_overrides else "")
        + f"; {t.params:,} params (LoRA {t.lora_params:,}, full copies {t.full_copy_params:,}); {t.nbytes:,} bytes"
    )
    if report.sub_adapters:
        subs = ", ".join(report.sub_adapters)
        lines.append(f"sub-adapters: {subs} (inspect one with --subfolder {report.sub_adapters[0]})")
    if report.check is not None:
        lines.append(f"base: {report.check.base}: {report.check.summary}")
    if report.scanned:
        lines.append("values: scanned for NaN/Inf")
    return "\n".join(lines)


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
                   "warnings": [w.as_dict() for w in warnings]})
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
@click.option("--component", metavar="NAME", help="kohya/diffusers files: the component (unet, text_encoder, text_encoder_2, transformer) --base stands for.")
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
    if source is not None:
        from .foreign_inspect import inspect_foreign

        inspect_foreign(source, adapter, as_json=as_json, scan=scan, base=base, component=None if source.format == "peft" else component, strict=strict)
        return
    ckpt = read_adapter(adapter, subfolder=subfolder, revision=revision, allow_pickle=allow_pickle)
    check = None
    if base is not None:
        from adapterfmt.base.reading import read_base  # only with --base: keeps the plain path's imports small
        from adapterfmt.base.resolution import resolve

        model = read_base(base, subfolder=base_subfolder, revision=base_revision, allow_pickle=allow_pickle)
        check = check_report(resolve(ckpt, model), adapter=adapter, base=base)
    scan_findings = None
    if scan:
        from adapterfmt.reports.scan import non_finite_findings

        scan_findings = non_finite_findings(ckpt)
    report = inspect_report(ckpt, source=adapter, check=check, scan_findings=scan_findings)
    if as_json:
        emit_json({"format": "peft", **report.as_dict(rows_as_records=True)})
    else:
        emit_report(report, render_inspect, as_json=False)
    done_without_teardown(ckpt, report)
    if strict and report.warnings:
        warn(f"{len(report.warnings)} warning(s); failing because of --strict")
        raise click.exceptions.Exit(1)
