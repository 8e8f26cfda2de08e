"""The data behind ``adapterfmt check`` (and ``inspect --base``): one record shape for every format.

An adapter checked against a base is a :class:`CheckDocument`: one :class:`ComponentCheckReport`
per component it adapts (one, ``component`` ``None``, for a single model such as any PEFT
adapter), each with the same fields whatever the method or file format — counts, what did not
bind and why, and ``bindings``: every adapted module, full copy and saved base tensor with the
base tensor it binds to. JSON: ``docs/schemas/check.schema.json`` (BEHAVIOUR §4.3). Headers
only, no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

from ..checkpoint.adalora import is_adalora
from ..checkpoint.finding import Finding
from ..checkpoint.findings import shape_mismatch_finding, unresolved_module_finding
from ..checkpoint.keys import weight_key
from ..storage.gc_pause import with_gc_paused

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from ..base.resolution import Resolution
    from ..checkpoint.records import AdapterCheckpoint
    from ..formats.diffusion.components import ComponentCheck
    from ..formats.diffusion.records import ForeignCheckpoint

#: How many unresolved names, shape errors and problems a report lists (the rest are counted).
MAX_LISTED = 10


class Unresolved(NamedTuple):
    """A name that bound to no base tensor, and what was looked for (``None`` where the name is
    matched against module names, as a kohya file's flattened names are)."""

    name: str
    looked_for: Optional[str]

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


class ComponentCheckReport(NamedTuple):
    """One component (or the single model) of an adapter against its base.

    ``ok``: every adapted module, full copy and saved base tensor bound to exactly one base tensor
    with agreeing shapes, nothing found that merge or load would refuse (``problems``), and the
    file holds no tensor the format does not explain (``unknown_keys``: it would bind to nothing,
    and PEFT would drop it silently). ``counts``: per row type (``adapter``, ``full_copy``,
    ``base_override``) ``{"resolved", "total"}``. ``bindings``: ``{"module", "type", "method",
    "base_key", "layout"}`` per bound tensor. ``suggestion``: a prefix rewrite ``(old, new)`` that
    would make the names resolve (PEFT adapters).
    """

    component: Optional[str]
    base: str
    ok: bool
    summary: str
    resolved: int
    total: int
    counts: dict[str, dict[str, int]]
    unresolved: list[Unresolved]
    unresolved_count: int
    shape_errors: list[str]
    problems: list[str]
    unknown_keys: list[str]
    suggestion: Optional[tuple[str, str]]
    bindings: list[dict[str, Any]]

    def suggestion_text(self) -> Optional[str]:
        """``did you mean `model.` → `language_model.model.`?`` and the ``--prefix-map`` that applies it."""
        if self.suggestion is None:
            return None
        old, new = self.suggestion
        what = f"`{old}` → `{new}`" if old else f"`{new}` in front of every module path"
        return f"did you mean {what}? (rerun with --prefix-map '{old}={new}')"

    def failure_findings(self) -> list[Finding]:
        """``unresolved-module`` and ``shape-mismatch`` warnings (what inspect lists) for this component's failures."""
        out = []
        if self.unresolved_count:
            first = self.unresolved[0]
            looked_for = first.looked_for or f"a {self.component or 'model'} module of that name"
            out.append(unresolved_module_finding(self.base, self.unresolved_count, first.name, looked_for, [u.name for u in self.unresolved]))
        return out + [shape_mismatch_finding(msg) for msg in self.shape_errors]

    def as_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "base": self.base,
            "ok": self.ok,
            "summary": self.summary,
            "resolved": self.resolved,
            "total": self.total,
            "counts": {t: dict(c) for t, c in self.counts.items()},
            "unresolved": [u.as_dict() for u in self.unresolved],
            "unresolved_count": self.unresolved_count,
            "shape_errors": list(self.shape_errors),
            "problems": list(self.problems),
            "unknown_keys": list(self.unknown_keys),
            "suggestion": None if self.suggestion is None else {"old": self.suggestion[0], "new": self.suggestion[1]},
            "bindings": list(self.bindings),
        }


class CheckDocument(NamedTuple):
    """An adapter checked against a base: what ``adapterfmt check`` prints (``format`` as in inspect)."""

    format: str
    adapter: str
    base: str
    components: list[ComponentCheckReport]
    warnings: list[Finding]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.components)

    def failure_findings(self) -> list[Finding]:
        return [f for c in self.components for f in c.failure_findings()]

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "adapter": self.adapter,
            "base": self.base,
            "ok": self.ok,
            "components": [c.as_dict() for c in self.components],
            "warnings": [w.as_dict() for w in self.warnings],
        }


def _looked_for(name: str, adapter: AdapterCheckpoint, prefix_map: Optional[dict[str, str]]) -> str:
    """The base key :func:`~adapterfmt.base.resolution.resolve` looked up for an unresolved ``name``."""
    for old, new in (prefix_map or {}).items():
        if name.startswith(old):
            name_mapped = new + name[len(old) :]
            break
    else:
        name_mapped = name
    return weight_key(name_mapped) if name in adapter.lora else name_mapped


@with_gc_paused
def check_document(
    res: Resolution,
    *,
    adapter: str,
    base: str,
    prefix_map: Optional[dict[str, str]] = None,
) -> CheckDocument:
    """The check record of a PEFT LoRA / AdaLoRA adapter, from a :class:`~adapterfmt.base.resolution.Resolution`.

    Args:
        res: ``resolve(adapter, base, prefix_map=prefix_map)``.
        adapter: the adapter as the user named it.
        base: the base as the user named it.
        prefix_map: the rewrites ``res`` was made with (to show which base key was looked for).

    ``warnings`` holds the adapter's findings and the resolution's (``tied-full-copy``,
    ``full-copy-suffix``, ``full-copy-incomplete``).
    """
    ckpt = res.adapter
    method = "adalora" if is_adalora(ckpt.config.raw) else "lora"
    bindings = [{"module": p, "type": "adapter", "method": method, "base_key": r.base_key, "layout": r.layout} for p, r in res.lora.items()]
    for p, bound in res.param_lora.items():  # target_parameters: every on-disk tensor (expert piece) it changes
        bindings += [
            {"module": p, "type": "adapter", "method": method, "base_key": r.base_key, "layout": "expert-rows" if r.expert else "parameter"}
            for r in bound
        ]
    for p, params in res.full_copies.items():
        bindings += [{"module": p, "type": "full_copy", "method": None, "base_key": k, "layout": "replace"} for k in params.values()]
    bindings += [{"module": s, "type": "base_override", "method": None, "base_key": k, "layout": "replace"} for k, s in res.overrides.items()]
    counts = {
        "adapter": {"resolved": len(res.lora) + len(res.param_lora), "total": res.lora_total},
        "full_copy": {"resolved": len(res.full_copies), "total": res.full_total},
        "base_override": {"resolved": len(res.overrides), "total": len(ckpt.base_overrides)},
    }
    report = ComponentCheckReport(
        component=None,
        base=base,
        ok=res.ok and not ckpt.unknown_keys,
        summary=res.summary(),
        resolved=sum(c["resolved"] for c in counts.values()),
        total=sum(c["total"] for c in counts.values()),
        counts=counts,
        unresolved=[Unresolved(n, _looked_for(n, ckpt, prefix_map)) for n in res.unresolved[:MAX_LISTED]],
        unresolved_count=len(res.unresolved),
        shape_errors=list(res.shape_errors),
        problems=[],
        unknown_keys=list(ckpt.unknown_keys),
        suggestion=res.suggestion,
        bindings=bindings,
    )
    warnings = list(ckpt.findings) + [f for f in res.findings if f not in ckpt.findings]
    return CheckDocument("peft", adapter, base, [report], warnings)


def foreign_check_document(ckpt: ForeignCheckpoint, checks: Sequence[ComponentCheck], *, adapter: str, base: str) -> CheckDocument:
    """The check record of a kohya / LyCORIS / diffusers file or a PEFT LoHa / LoKr directory,
    from its per-component checks (:func:`~adapterfmt.formats.diffusion.components.check_component`)."""
    reports = []
    for c in checks:
        adapted = c.counts["adapter"]
        what = f"{adapted['resolved']}/{adapted['total']} {c.component or 'model'} modules resolved"
        reports.append(
            ComponentCheckReport(
                component=c.component,
                base=c.base,
                ok=c.ok and not ckpt.unknown_keys,
                summary=what + f", {len(c.shape_errors)} shape errors",
                resolved=c.resolved,
                total=c.total,
                counts=c.counts,
                unresolved=[Unresolved(n, None) for n in c.unresolved[:MAX_LISTED]],
                unresolved_count=len(c.unresolved),
                shape_errors=c.shape_errors[:MAX_LISTED],
                problems=c.problems[:MAX_LISTED],
                unknown_keys=list(ckpt.unknown_keys),
                suggestion=None,
                bindings=list(c.bindings),
            )
        )
    return CheckDocument(ckpt.format, adapter, base, reports, list(ckpt.findings))

