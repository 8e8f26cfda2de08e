"""The text pages of ``inspect`` and ``check``: one layout for every adapter format.

Both render the report records of :mod:`adapterfmt.reports` (the same records ``--json`` prints),
so the table and the JSON never disagree, and a kohya file, a diffusers file and a PEFT LoRA, LoHa
or LoKr adapter are shown in the same columns.
"""

from __future__ import annotations

from typing import Optional

from adapterfmt.reports.check import CheckDocument, ComponentCheckReport
from adapterfmt.reports.inspect import InspectReport

from .output import table

#: How each method is named in text.
METHOD_NAMES = {"lora": "LoRA", "adalora": "AdaLoRA", "loha": "LoHa", "lokr": "LoKr"}


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.6g}"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _config_line(report: InspectReport) -> Optional[str]:
    """``config:  r=8 lora_alpha=16 use_rslora task=CAUSAL_LM peft=0.21.2 base=...`` (PEFT adapters)."""
    c = report.config
    if c is None:
        return None
    alpha = c.get("lora_alpha", c.get("alpha"))
    line = "config:  " + (f"peft_type={report.peft_type} " if report.peft_type not in (None, "LORA") else "")
    line += f"r={c.get('r')} " + ("lora_alpha" if "lora_alpha" in c else "alpha") + f"={_num(alpha)}"
    line += (" use_rslora" if c.get("use_rslora") else "") + (" use_dora" if c.get("use_dora") else "")
    line += f" task={c['task_type']}" if c.get("task_type") else ""
    line += f" peft={c['peft_version']}" if c.get("peft_version") else ""
    line += f" base={c['base_model_name_or_path']}" if c.get("base_model_name_or_path") else ""
    return line


def render_inspect(report: InspectReport) -> str:
    """The human-readable inspect page (stdout)."""
    name = (report.config or {}).get("name")
    lines = [f"adapter: {report.source} ({report.format} file {report.file}" + (f", name '{name}'" if name else "") + ")"]
    config = _config_line(report)
    if config:
        lines.append(config)
    if report.components:
        lines.append("components: " + ", ".join(f"{c} ({n})" for c, n in report.components.items()))
    lines.append("")
    with_component = bool(report.components)
    headers = (("component",) if with_component else ()) + ("module", "kind", "layer", "rank", "alpha", "scaling", "dtype", "params")
    shift = 1 if with_component else 0
    rows = [
        ((m.component or "-",) if with_component else ())
        + ("".join(m.shown), m.kind, m.layer_kind or "-", "-" if m.rank is None else m.rank,
           _num(m.alpha), _num(m.scaling), m.dtype, f"{m.params:,}")
        for m in report.modules
    ]
    lines.append(table(rows, headers, align_right=tuple(i + shift for i in (3, 4, 5, 7))))
    marks = {m.shown[1] for m in report.modules}
    if "*" in marks:
        lines.append("* read from the file's names alone, not checked against a model (give --base to check them)")
    if "?" in marks:
        lines.append("? as the file names it: no unique module path (see grammar_note in --json)")
    t = report.totals
    methods = [METHOD_NAMES.get(m, m) for m in report.methods]
    method = methods[0] if len(methods) == 1 else "adapted"  # "14 LoRA modules", "12 adapted modules (LoRA, LoHa)"
    adapted = f"{t.adapter_modules} {method} modules" + (f" ({', '.join(methods)})" if len(methods) > 1 else "")
    lines.append("")
    lines.append(
        f"totals: {adapted}, {_plural(t.full_copies, 'full copy', 'full copies')}"
        + (f", {t.token_deltas} token deltas" if t.token_deltas else "")
        + (f", {t.base_overrides} base overrides" if t.base_overrides else "")
        + f"; {t.params:,} params ({method} {t.adapter_params:,}, full copies {t.full_copy_params:,}); {t.nbytes:,} bytes"
    )
    if report.sub_adapters:
        lines.append(f"sub-adapters: {', '.join(report.sub_adapters)} (inspect one with --subfolder {report.sub_adapters[0]})")
    if report.check is not None:
        lines += render_check(report.check, heading=True)
    if report.serving is not None:
        from adapterfmt.export.serving import serving_line

        lines.append(serving_line(report.serving))
    if report.scanned:
        lines.append("values: scanned for NaN/Inf")
    return "\n".join(lines)


def _component_lines(c: ComponentCheckReport, *, label: str) -> list[str]:
    lines = [f"{label}{c.summary}: {'ok' if c.ok else 'FAILED'}"]
    base_overrides = c.counts.get("base_override", {"total": 0})
    if base_overrides["total"] and c.component is None and "LoRA targets" in c.summary:
        lines.append(f"{base_overrides['resolved']}/{base_overrides['total']} base overrides resolved")
    if c.unresolved_count:
        more = c.unresolved_count - len(c.unresolved)
        lines.append(f"unresolved: {c.unresolved_count}" + (f" (first {len(c.unresolved)} listed)" if more else ""))
        lines += [
            f"  {u.name}  " + (f"(no base tensor '{u.looked_for}')" if u.looked_for else f"(no {c.component or 'model'} module of that name)")
            for u in c.unresolved
        ]
        if more:
            lines.append(f"  ... and {more} more")
    suggestion = c.suggestion_text()
    if suggestion:
        lines.append(suggestion)
    if c.shape_errors:
        lines.append(f"shape errors ({len(c.shape_errors)}):")
        lines += [f"  {e}" for e in c.shape_errors]
    lines += [f"cannot apply: {p}" for p in c.problems]
    if c.unknown_keys:
        lines.append(f"tensors that fit no rule of the format and bind to nothing ({len(c.unknown_keys)}):")
        lines += [f"  {k}" for k in c.unknown_keys[:10]]
    return lines


def render_check(doc: CheckDocument, *, heading: bool = False) -> list[str]:
    """The check lines: per component (``unet: …``) its summary and ``ok`` / ``FAILED``, then what
    did not bind and why. ``heading``: start with ``base: BASE`` (inside an inspect page)."""
    lines = [f"base: {doc.base}"] if heading else []
    for c in doc.components:
        lines += _component_lines(c, label=f"{c.component}: " if c.component else "")
    return lines


def check_text(doc: CheckDocument) -> str:
    return "\n".join(render_check(doc))

