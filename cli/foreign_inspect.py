"""``adapterfmt inspect`` for kohya / LyCORIS and diffusers LoRA files (docs/BEHAVIOUR.md §7.2)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import click

from adapterfmt.checkpoint.finding import Finding
from adapterfmt.formats.locate import ForeignSource
from adapterfmt.formats.diffusion.records import ForeignCheckpoint, base_override_as_dict, full_copy_as_dict

from .output import emit_json, table, warn


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.6g}"


def foreign_document(
    ckpt: ForeignCheckpoint, source: str, checks: list[Any], scan_findings: Optional[Sequence[Finding]] = None
) -> dict[str, Any]:
    """The ``--json`` document: ``format``, ``modules`` (one record per adapted module), totals,
    checks, and the warnings: the file's, then the ``non-finite`` ones of a value scan
    (``scan_findings``; ``None`` when values were not read, JSON ``"scanned": false``)."""
    modules = [m.as_dict() for m in ckpt.modules] + [full_copy_as_dict(c) for c in ckpt.full_copies.values()]
    modules += [base_override_as_dict(k, info, ckpt.base_override_keys[k]) for k, info in ckpt.base_overrides.items()]
    return {
        "format": ckpt.format,
        "source": source,
        "file": ckpt.file,
        "components": {c: len(ckpt.component_modules(c)) for c in ckpt.components},
        "peft_type": ckpt.configs[""].get("peft_type") if ckpt.format == "peft" else None,
        "kinds": ckpt.kinds,
        "modules": modules,
        "totals": {
            "modules": len(modules),
            "full_copies": len(ckpt.full_copies),
            "base_overrides": len(ckpt.base_overrides),
            "params": sum(m["params"] for m in modules),
            "tensors": sum(len(m.all_keys()) for m in ckpt.modules) + sum(len(c.tensors) for c in ckpt.full_copies.values())
            + len(ckpt.base_overrides) + len(ckpt.unknown_keys),
        },
        "unknown_keys": list(ckpt.unknown_keys),
        "lora_adapter_metadata": ckpt.configs or None,
        "check": [c.as_dict() for c in checks] if checks else None,
        "scanned": scan_findings is not None,
        "warnings": [f.as_dict() for f in [*ckpt.findings, *(scan_findings or ())]],
    }


def render_foreign(doc: dict[str, Any]) -> str:
    comps = ", ".join(f"{c} ({n})" for c, n in doc["components"].items()) or "the model"
    lines = [f"adapter: {doc['source']} ({doc['format']} file {doc['file']})", f"components: {comps}; kinds: {', '.join(doc['kinds'])}", ""]
    rows = [
        (m["component"] or "-", m["module"], m["kind"].replace("_", " ") + ("" if m["layer_kind"] in (None, "linear") else f"/{m['layer_kind']}"),
         "-" if m["rank"] is None else m["rank"], _num(m["alpha"]), _num(m["scaling"]), m["dtype"], f"{m['params']:,}")
        for m in doc["modules"]
    ]
    lines.append(table(rows, ("component", "module", "kind", "rank", "alpha", "scaling", "dtype", "params"), align_right=(3, 4, 5, 7)))
    t = doc["totals"]
    extra = [f"{t['full_copies']} full cop{'y' if t['full_copies'] == 1 else 'ies'}"] if t["full_copies"] else []
    extra += [f"{t['base_overrides']} saved base tensor{'' if t['base_overrides'] == 1 else 's'}"] if t["base_overrides"] else []
    lines += ["", f"totals: {t['modules']} modules{' (' + ', '.join(extra) + ')' if extra else ''}; {t['params']:,} params"]
    lines += render_checks(doc["check"] or [])
    if doc["scanned"]:
        lines.append("values: scanned for NaN/Inf")
    return "\n".join(lines)


def render_checks(checks: list[dict[str, Any]]) -> list[str]:
    """One line per component checked against its base, then its unresolved names and shape errors."""
    lines = []
    for c in checks:
        state = "ok" if c["ok"] else "FAILED"
        lines.append(f"base {c['component'] or 'model'}: {c['base']}: {c['resolved']}/{c['total']} modules resolved, {len(c['shape_errors'])} shape errors: {state}")
        lines += [f"  unresolved: {name}" for name in c["unresolved"]]
        lines += [f"  shape: {err}" for err in c["shape_errors"]]
        lines += [f"  cannot apply: {p}" for p in c.get("problems", [])]
    return lines


def _checks(ckpt: ForeignCheckpoint, base: str, component: Optional[str]) -> list[Any]:
    from adapterfmt.formats.diffusion.components import check_component, component_bases, read_component

    bases = {None: read_component(base)} if ckpt.format == "peft" else component_bases(ckpt, base, component)
    return [check_component(ckpt, c, b) for c, b in bases.items()]


def check_foreign(source: ForeignSource, path: str, *, base: str, component: Optional[str], as_json: bool, strict: bool) -> None:
    """``adapterfmt check`` for a foreign file (``path`` as the user named it): names resolved per
    component (exit 1 when one fails)."""
    ckpt = source.read()
    checks = _checks(ckpt, base, component)
    ok = all(c.ok for c in checks)
    if as_json:
        emit_json({"format": ckpt.format, "adapter": path, "base": base, "ok": ok, "check": [c.as_dict() for c in checks],
                   "warnings": [f.as_dict() for f in ckpt.findings]})
    else:
        click.echo("\n".join(render_checks([c.as_dict() for c in checks])))
        for w in ckpt.findings:
            warn(f"warning[{w.code}]: {w.message}")
    if not ok or (strict and ckpt.findings):
        raise click.exceptions.Exit(1)


def inspect_foreign(
    source: ForeignSource, path: str, *, as_json: bool, scan: bool, base: Optional[str], component: Optional[str], strict: bool
) -> None:
    """Print the report of a foreign file (``path`` as the user named it); with ``base``, resolve it
    (exit 1 when that fails); with ``scan``, read every tensor of the file and report NaN / Inf
    (imports torch; a Hub file is then a downloaded one)."""
    ckpt = source.read()
    checks = _checks(ckpt, base, component) if base is not None else []
    scan_findings = None
    if scan:
        from adapterfmt.reports.scan import foreign_non_finite_findings

        scan_findings = foreign_non_finite_findings(ckpt)
    warnings = [*ckpt.findings, *(scan_findings or ())]
    doc = foreign_document(ckpt, path, checks, scan_findings)
    if as_json:
        emit_json(doc)
    else:
        click.echo(render_foreign(doc))
        for w in warnings:
            warn(f"warning[{w.code}]: {w.message}")
    if any(not c.ok for c in checks):
        raise click.exceptions.Exit(1)
    if strict and warnings:
        warn(f"{len(warnings)} warning(s); failing because of --strict")
        raise click.exceptions.Exit(1)
