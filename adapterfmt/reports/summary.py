"""The data behind ``adapterfmt inspect``, ``check`` and ``targets``, as plain records.

Each report is an immutable record the CLI renders as a table or, through ``as_dict()``, as
JSON; the same record feeds both, so the table and ``--json`` never disagree. Nothing here
prints, reads tensor values or imports torch.

The records are ``typing.NamedTuple`` rather than dataclasses on purpose: on Python 3.11 a
dataclass costs about 1 ms of code generation at import per class, and this module is on the
start-up path of ``adapterfmt inspect``, whose whole run is budgeted at 0.1 s (bench/inspect.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence, Union

from ..checkpoint.finding import Finding
from ..checkpoint.findings import shape_mismatch_finding, targets_findings, unresolved_module_finding
from ..storage.gc_pause import with_gc_paused
from ..storage.header import TensorInfo
from ..checkpoint.keys import weight_key
from ..checkpoint.matching import TargetSpec, module_names_from_keys, select_targets

if TYPE_CHECKING:  # pragma: no cover - annotations only; inspect needs neither base nor resolve
    from ..base.reading import BaseModel
    from ..checkpoint.records import AdapterCheckpoint
    from ..base.resolution import Resolution

#: How many unresolved names a report lists (the rest are counted).
MAX_LISTED = 10


def _tensor_dict(key: str, info: TensorInfo) -> dict[str, Any]:
    return {"key": key, "dtype": info.dtype, "shape": list(info.shape)}


class ModuleRow(NamedTuple):
    """One line of the inspect table: a LoRA module, a full copy, a token delta or a base override.

    ``rank``, ``alpha`` and ``scaling`` are ``None`` for everything but LoRA modules.
    ``tensors`` maps a slot (``lora_A``, ``lora_B``, ``magnitude``, a full copy's parameter) to
    ``{"key", "dtype", "shape"}``.
    """

    module: str
    type: str  #: ``lora``, ``full_copy``, ``token_delta`` or ``base_override``
    layer_kind: Optional[str]
    rank: Optional[int]
    config_rank: Optional[int]
    alpha: Optional[float]
    scaling: Optional[float]
    use_dora: bool
    lora_bias: bool
    dtype: str
    params: int
    tensors: dict[str, dict[str, Any]]

    @property
    def kind(self) -> str:
        """The table's ``kind`` column: ``linear``, ``linear+dora``, ``full copy``, ..."""
        if self.type != "lora":
            return self.type.replace("_", " ")
        return (self.layer_kind or "?") + ("+dora" if self.use_dora else "") + ("+bias" if self.lora_bias else "")

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


class Totals(NamedTuple):
    """Counts and sizes over a whole adapter."""

    lora_modules: int
    full_copies: int
    token_deltas: int
    base_overrides: int
    lora_params: int
    full_copy_params: int
    params: int
    tensors: int
    nbytes: int

    def as_dict(self) -> dict[str, int]:
        return self._asdict()


class Unresolved(NamedTuple):
    """A name that bound to no base tensor, and the base key that was looked for."""

    name: str
    looked_for: str

    def as_dict(self) -> dict[str, str]:
        return self._asdict()


class CheckReport(NamedTuple):
    """An adapter resolved against a base: what ``adapterfmt check`` prints.

    ``ok`` is true when every LoRA module, full copy and base override bound to exactly one base
    tensor with agreeing shapes, and the file holds no tensor the format does not explain
    (``unknown_keys``: such a tensor binds to nothing, and PEFT would drop it silently).
    ``unresolved`` holds at most :data:`MAX_LISTED` entries; ``unresolved_count`` counts all.
    """

    adapter: str
    base: str
    ok: bool
    summary: str
    lora_resolved: int
    lora_total: int
    full_copies_resolved: int
    full_copies_total: int
    overrides_resolved: int
    overrides_total: int
    unresolved: list[Unresolved]
    unresolved_count: int
    shape_errors: list[str]
    unknown_keys: list[str]
    suggestion: Optional[tuple[str, str]]
    bindings: list[dict[str, str]]
    warnings: list[Finding]

    def suggestion_text(self) -> Optional[str]:
        """``did you mean `model.` → `language_model.model.`?`` and the ``--prefix-map`` that applies it."""
        if self.suggestion is None:
            return None
        old, new = self.suggestion
        what = f"`{old}` → `{new}`" if old else f"`{new}` in front of every module path"
        return f"did you mean {what}? (rerun with --prefix-map '{old}={new}')"

    def as_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "base": self.base,
            "ok": self.ok,
            "summary": self.summary,
            "lora": {"resolved": self.lora_resolved, "total": self.lora_total},
            "full_copies": {"resolved": self.full_copies_resolved, "total": self.full_copies_total},
            "base_overrides": {"resolved": self.overrides_resolved, "total": self.overrides_total},
            "unresolved": [u.as_dict() for u in self.unresolved],
            "unresolved_count": self.unresolved_count,
            "shape_errors": list(self.shape_errors),
            "unknown_keys": list(self.unknown_keys),
            "suggestion": None if self.suggestion is None else {"old": self.suggestion[0], "new": self.suggestion[1]},
            "bindings": list(self.bindings),
            "warnings": [w.as_dict() for w in self.warnings],
        }


class InspectReport(NamedTuple):
    """One adapter described for ``adapterfmt inspect``.

    ``warnings`` holds the adapter's findings, then (with a base) the resolution's plus
    ``unresolved-module`` / ``shape-mismatch`` for what did not bind, then (with a value scan)
    the ``non-finite`` ones. ``check`` is set when a base was given.
    """

    source: str
    adapter: dict[str, Any]
    modules: list[ModuleRow]
    totals: Totals
    sub_adapters: list[str]
    unknown_keys: list[str]
    warnings: list[Finding]
    scanned: bool = False
    check: Optional[CheckReport] = None

    def as_dict(self, *, rows_as_records: bool = False) -> dict[str, Any]:
        """The JSON document. ``rows_as_records``: ``modules`` holds the :class:`ModuleRow` records
        themselves, for a writer that turns each into its dict as it writes it (a 100k-module
        report then never holds 100k row dicts at once)."""
        return {
            "source": self.source,
            "adapter": self.adapter,
            "modules": list(self.modules) if rows_as_records else [m.as_dict() for m in self.modules],
            "totals": self.totals.as_dict(),
            "sub_adapters": list(self.sub_adapters),
            "unknown_keys": list(self.unknown_keys),
            "scanned": self.scanned,
            "base": None if self.check is None else self.check.as_dict(),
            "warnings": [w.as_dict() for w in self.warnings],
        }


def _module_rows(ckpt: AdapterCheckpoint) -> list[ModuleRow]:
    rows = []
    for path, m in ckpt.lora.items():
        keys = m.keys
        rows.append(  # positional: a 100k-module adapter builds 100k of these
            ModuleRow(path, "lora", m.layer_kind, m.rank, m.config_rank, m.alpha, m.scaling, m.use_dora, m.lora_bias, m.dtype, m.params,
                      {s: _tensor_dict(keys[s], t) for s, t in m.tensors.items()})
        )
    for path, c in ckpt.full_copies.items():
        rows.append(
            ModuleRow(path, "full_copy", None, None, None, None, None, False, False, c.dtype, c.params,
                      {p: _tensor_dict(c.keys[p], t) for p, t in c.tensors.items()})
        )
    for path, d in ckpt.token_deltas.items():
        rows.append(
            ModuleRow(path, "token_delta", None, None, None, None, None, False, False, d.tensor.dtype, d.tensor.numel,
                      {"delta": {**_tensor_dict(d.key, d.tensor), "indices": d.indices}})
        )
    for base_key, info in ckpt.base_overrides.items():
        rows.append(
            ModuleRow(base_key, "base_override", None, None, None, None, None, False, False, info.dtype, info.numel,
                      {"value": _tensor_dict(ckpt.base_override_keys[base_key], info)})
        )
    return rows


def _adapter_facts(ckpt: AdapterCheckpoint) -> dict[str, Any]:
    cfg = ckpt.config
    return {
        "name": ckpt.name,
        "directory": ckpt.directory,
        "weights_file": ckpt.weights_file,
        "prefix": ckpt.prefix,
        "peft_version": cfg.peft_version,
        "task_type": cfg.task_type,
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "target_modules": cfg.target_modules,
        "modules_to_save": cfg.modules_to_save,
    }


@with_gc_paused
def inspect_report(
    ckpt: AdapterCheckpoint,
    *,
    source: str,
    check: Optional[CheckReport] = None,
    scan_findings: Optional[Sequence[Finding]] = None,
) -> InspectReport:
    """Build the inspect record of ``ckpt``.

    Args:
        ckpt: the adapter, from :func:`~adapterfmt.formats.peft.reading.read_adapter`.
        source: what the user named (path or Hub id), echoed in the report.
        check: the adapter resolved against a base (:func:`check_report`), if one was given;
            its warnings and failures are appended to the adapter's warnings.
        scan_findings: ``non-finite`` findings of a value scan; ``None`` when values were not read.

    Returns:
        An :class:`InspectReport`.
    """
    rows = _module_rows(ckpt)
    infos = ckpt.tensor_infos()
    totals = Totals(
        lora_modules=len(ckpt.lora),
        full_copies=len(ckpt.full_copies),
        token_deltas=len(ckpt.token_deltas),
        base_overrides=len(ckpt.base_overrides),
        lora_params=sum(r.params for r in rows if r.type == "lora"),  # ckpt.lora_params, without summing every tensor again
        full_copy_params=sum(r.params for r in rows if r.type == "full_copy"),
        params=sum(r.params for r in rows),
        tensors=len(infos) + len(ckpt.unknown_keys),
        nbytes=sum(max(t.nbytes, 0) for t in infos.values()),
    )
    warnings = list(ckpt.findings)
    if check is not None:
        warnings += [w for w in check.warnings if w not in warnings] + _failure_findings(check)
    warnings += list(scan_findings or ())
    return InspectReport(
        source=source,
        adapter=_adapter_facts(ckpt),
        modules=rows,
        totals=totals,
        sub_adapters=list(ckpt.sub_adapters),
        unknown_keys=list(ckpt.unknown_keys),
        warnings=warnings,
        scanned=scan_findings is not None,
        check=check,
    )


def _failure_findings(check: CheckReport) -> list[Finding]:
    """``unresolved-module`` and ``shape-mismatch`` warnings for inspect, from a check's failures."""
    out = []
    if check.unresolved_count:
        first = check.unresolved[0]
        out.append(
            unresolved_module_finding(check.base, check.unresolved_count, first.name, first.looked_for, [u.name for u in check.unresolved])
        )
    out += [shape_mismatch_finding(msg) for msg in check.shape_errors]
    return out


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
def check_report(
    res: Resolution,
    *,
    adapter: str,
    base: str,
    prefix_map: Optional[dict[str, str]] = None,
) -> CheckReport:
    """Build the check record from a :class:`~adapterfmt.base.resolution.Resolution`.

    Args:
        res: ``resolve(adapter, base, prefix_map=prefix_map)``.
        adapter: the adapter as the user named it.
        base: the base as the user named it.
        prefix_map: the rewrites ``res`` was made with (to show which base key was looked for).

    Returns:
        A :class:`CheckReport`; ``warnings`` holds the adapter's findings and the resolution's
        (``tied-full-copy``, ``full-copy-suffix``, ``full-copy-incomplete``).
    """
    ckpt = res.adapter
    bindings = [{"module": p, "type": "lora", "base_key": r.base_key, "layout": r.layout} for p, r in res.lora.items()]
    for p, bound in res.param_lora.items():  # target_parameters: every on-disk tensor (expert piece) it changes
        bindings += [{"module": p, "type": "parameter_lora", "base_key": r.base_key, "layout": "expert-rows" if r.expert else "linear"} for r in bound]
    for p, params in res.full_copies.items():
        bindings += [{"module": p, "type": "full_copy", "base_key": k, "layout": "replace"} for k in params.values()]
    bindings += [{"module": s, "type": "base_override", "base_key": k, "layout": "replace"} for k, s in res.overrides.items()]
    warnings = list(ckpt.findings) + [f for f in res.findings if f not in ckpt.findings]
    return CheckReport(
        adapter=adapter,
        base=base,
        ok=res.ok and not ckpt.unknown_keys,
        summary=res.summary(),
        lora_resolved=len(res.lora) + len(res.param_lora),
        lora_total=res.lora_total,
        full_copies_resolved=len(res.full_copies),
        full_copies_total=res.full_total,
        overrides_resolved=len(res.overrides),
        overrides_total=len(ckpt.base_overrides),
        unresolved=[Unresolved(n, _looked_for(n, ckpt, prefix_map)) for n in res.unresolved[:MAX_LISTED]],
        unresolved_count=len(res.unresolved),
        shape_errors=list(res.shape_errors),
        unknown_keys=list(ckpt.unknown_keys),
        suggestion=res.suggestion,
        bindings=bindings,
        warnings=warnings,
    )


# ---------------------------------------------------------------------------------------------
# TARGETS PREVIEW
# ---------------------------------------------------------------------------------------------


class TargetsReport(NamedTuple):
    """Which modules of a base a LoRA config would wrap (``adapterfmt targets``).

    Attributes:
        lora_targets: ``{"module", "shape", "dtype"}`` of each module that would get LoRA.
        full_copies: ``modules_to_save`` entry -> modules it selects (exact rule).
        excluded: modules the targets matched but ``exclude_modules`` removed.
        warnings: ``unused-target``, ``unused-exclude``, ``full-copy-missing`` and
            ``full-copy-suffix`` (PEFT's plain ``endswith`` would wrap other modules too).
    """

    base: str
    lora_targets: list[dict[str, Any]]
    full_copies: dict[str, list[str]]
    excluded: list[str]
    warnings: list[Finding]

    def as_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "lora_targets": list(self.lora_targets),
            "full_copies": dict(self.full_copies),
            "excluded": list(self.excluded),
            "warnings": [w.as_dict() for w in self.warnings],
        }


def preview_targets(
    base_model: BaseModel,
    *,
    base: str,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec = None,
    modules_to_save: Optional[Sequence[str]] = None,
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
    prefix_map: Optional[dict[str, str]] = None,
) -> TargetsReport:
    """Apply the matching rules of docs/FORMAT.md §5 to the modules of ``base_model``.

    With ``prefix_map`` (``{adapter prefix: base prefix}``, as ``check --prefix-map``), module names
    are shown and matched as the adapter names them: a base module ``NEW…`` is ``OLD…``.

    Module names come from the base's tensor keys, shown and matched as PEFT sees them in memory
    (the architecture's conversion rules: ViT ``vit.encoder.layer.0.attention.attention.query`` is
    ``vit.layers.0.attention.q_proj``; per-expert pieces of fused MoE tensors are no modules); a
    module can carry LoRA when it has a direct ``.weight`` (or is an output head tied to the input
    embedding).

    Raises:
        AmbiguousMatchError: a ``modules_to_save`` entry matches several modules, or a module is
            both a LoRA target and a module to save.
        InvalidConfigError: ``target_modules`` is ``"all-linear"``.
    """
    from ..tables.architectures import memory_modules
    from ..checkpoint.matching import undo_prefix_map

    names, leaves = module_names_from_keys(base_model.tensors)
    tied = [t for t in base_model.tied if t not in names]
    renamed = memory_modules(base_model.config, leaves + tied)

    def shown(n: str) -> Optional[str]:
        m = renamed.get(n, n)
        return undo_prefix_map(m, prefix_map) if m is not None and prefix_map else m

    view = {shown(n): n for n in names + tied if shown(n) is not None}
    names, leaves, tied = (
        [s for s in map(shown, names) if s is not None],
        [s for s in map(shown, leaves) if s is not None],
        [s for s in map(shown, tied) if s is not None],
    )
    sel = select_targets(
        names + tied,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        lora_capable=leaves + tied,
    )
    rows = []
    for m in sel.lora_targets:
        b = view.get(m, m)
        info = base_model.tensors.get(weight_key(b)) or base_model.tensors[weight_key(base_model.tied[b])]
        rows.append({"module": m, "shape": list(info.shape), "dtype": info.dtype, "tied_to": base_model.tied.get(b)})
    warnings = targets_findings(sel, exclude_modules)
    return TargetsReport(base=base, lora_targets=rows, full_copies=sel.full_copies, excluded=sel.excluded, warnings=warnings)
