"""The data behind ``adapterfmt inspect``: one record shape for every adapter format.

A PEFT LoRA / AdaLoRA directory (:class:`~adapterfmt.checkpoint.records.AdapterCheckpoint`) and a
kohya / LyCORIS / diffusers file or PEFT LoHa / LoKr directory
(:class:`~adapterfmt.formats.diffusion.records.ForeignCheckpoint`) both become an
:class:`InspectReport` of :class:`ModuleRow` records: the same fields, ``method`` saying which
adapter method a row is, ``type`` what it is (an adapted module, a full copy, a token delta, a
saved base tensor). The CLI renders the one record as a table or, through ``as_dict()``, as the
JSON of ``docs/schemas/inspect.schema.json`` (BEHAVIOUR §4.3). Nothing here prints, reads tensor
values or imports torch.

The records are ``typing.NamedTuple`` rather than dataclasses on purpose: on Python 3.11 a
dataclass costs about 1 ms of code generation at import per class, and this module is on the
start-up path of ``adapterfmt inspect``, whose whole run is budgeted at 0.1 s (bench/inspect.py).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence

from ..checkpoint.adalora import is_adalora
from ..checkpoint.finding import Finding
from ..checkpoint.keys import split_prefix
from ..storage.gc_pause import with_gc_paused
from ..storage.header import TensorInfo
from .check import CheckDocument

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from ..checkpoint.records import AdapterCheckpoint, FullCopyModule
    from ..formats.diffusion.records import ForeignCheckpoint

#: ``ModuleRow.type`` values.
ADAPTER, FULL_COPY, TOKEN_DELTA, BASE_OVERRIDE = "adapter", "full_copy", "token_delta", "base_override"


def tensor_dict(key: str, info: TensorInfo) -> dict[str, Any]:
    """One tensor of a row: ``{"key", "dtype", "shape"}``."""
    return {"key": key, "dtype": info.dtype, "shape": list(info.shape)}


class ModuleRow(NamedTuple):
    """One line of the inspect table, whatever the format: an adapted module, a full copy, a token
    delta or a saved base tensor.

    ``module`` is the module path in the model (``resolved``), or, for a kohya name not resolved
    against a base, the name as the file spells it (``resolved`` false). ``grammar_name``: the
    dotted path the file's grammar alone gives the name (FORMAT §10.4), not checked against a
    model (``None`` when a kohya name has no unique reading: ``grammar_note`` says why);
    ``checked``: the module was bound to a base tensor in this report (``--base``). ``method`` (``lora``,
    ``adalora``, ``loha``, ``lokr``) is set for ``type == "adapter"`` only, as are ``rank``,
    ``alpha`` and ``scaling``; ``config_rank`` is the rank the config declares (PEFT only).
    ``tensors`` maps a slot (``lora_A``, ``lora_down``, ``hada_w1_a``, ``magnitude``, a full
    copy's parameter, ...) to ``{"key", "dtype", "shape"}``.
    """

    module: str
    name_in_file: str
    resolved: bool
    grammar_name: Optional[str]
    grammar_note: Optional[str]
    checked: bool
    component: Optional[str]
    type: str
    method: Optional[str]
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
    def shown(self) -> tuple[str, str]:
        """The name a table prints and its mark: ``(module, "")`` when checked against a base or a
        real module path; ``(grammar_name, "*")`` for a name read from the file's grammar alone;
        ``(name_in_file, "?")`` for a name with no unique reading."""
        if self.checked or self.resolved:
            return self.module, ""
        if self.grammar_name is not None:
            return self.grammar_name, "*"
        return self.name_in_file, "?"

    @property
    def kind(self) -> str:
        """The table's ``kind`` column: ``lora``, ``lora+dora``, ``loha``, ``full copy``, ..."""
        if self.type != ADAPTER:
            return self.type.replace("_", " ")
        return (self.method or "?") + ("+dora" if self.use_dora else "") + ("+bias" if self.lora_bias else "")

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()

    def to_json(self) -> str:
        """``as_dict()`` as one line of JSON, as ``json`` writes it with ``", "`` / ``": "``
        separators (a NaN or infinite alpha / scaling as ``null``), without building the dict: a
        200k-tensor adapter's report is 100k of these lines (tests compare it with ``json``)."""
        s, n = _json_str, _json_num
        return (
            f'{{"module": {s(self.module)}, "name_in_file": {s(self.name_in_file)}, "resolved": {_JSON_BOOL[self.resolved]}, '
            f'"grammar_name": {s(self.grammar_name)}, "grammar_note": {s(self.grammar_note)}, "checked": {_JSON_BOOL[self.checked]}, '
            f'"component": {s(self.component)}, "type": {s(self.type)}, "method": {s(self.method)}, "layer_kind": {s(self.layer_kind)}, '
            f'"rank": {n(self.rank)}, "config_rank": {n(self.config_rank)}, "alpha": {n(self.alpha)}, "scaling": {n(self.scaling)}, '
            f'"use_dora": {_JSON_BOOL[self.use_dora]}, "lora_bias": {_JSON_BOOL[self.lora_bias]}, "dtype": {s(self.dtype)}, '
            f'"params": {n(self.params)}, "tensors": {_json_value(self.tensors)}}}'
        )


_JSON_BOOL = {True: "true", False: "false"}
_json_value = json.JSONEncoder(separators=(", ", ": ")).encode
_quote = json.encoder.encode_basestring_ascii  # what json's encoder writes a str as (ensure_ascii)


def _json_str(value: Optional[str]) -> str:
    return "null" if value is None else _quote(value)


def _json_num(value: Optional[float]) -> str:
    """An int or float as ``json`` writes it; ``None``, NaN and infinities as ``null`` (strict JSON)."""
    if value is None or value != value or value in (math.inf, -math.inf):
        return "null"
    return int.__repr__(value) if type(value) is int else float.__repr__(float(value))


class Totals(NamedTuple):
    """Counts and sizes over a whole adapter (every format)."""

    adapter_modules: int
    full_copies: int
    token_deltas: int
    base_overrides: int
    adapter_params: int
    full_copy_params: int
    params: int
    tensors: int
    nbytes: int

    def as_dict(self) -> dict[str, int]:
        return self._asdict()


class InspectReport(NamedTuple):
    """One adapter described for ``adapterfmt inspect``, whatever its format.

    ``format``: ``peft``, ``kohya``, ``diffusers`` (a wrapped state dict is one report per adapter
    it holds). ``config``: the PEFT config facts (``None`` for a file without one);
    ``metadata``: a diffusers file's per-component ``lora_adapter_metadata``. ``components``:
    component -> number of adapted modules (empty for a single model). ``warnings`` holds the
    adapter's findings, then (with a base) the check's, then (with a value scan) the
    ``non-finite`` ones. ``check`` is set when a base was given. ``serving``: per serving engine,
    whether it serves the adapter as it is (:func:`adapterfmt.export.serving.serving_report`, which
    the caller passes in: exporting is a layer above reports), ``None`` where not computed.
    """

    format: str
    source: str
    file: str
    peft_type: Optional[str]
    methods: list[str]
    components: dict[str, int]
    config: Optional[dict[str, Any]]
    metadata: Optional[dict[str, Any]]
    modules: list[ModuleRow]
    totals: Totals
    sub_adapters: list[str]
    unknown_keys: list[str]
    warnings: list[Finding]
    scanned: bool = False
    check: Optional[CheckDocument] = None
    serving: Optional[dict[str, Any]] = None

    def as_dict(self, *, rows_as_records: bool = False) -> dict[str, Any]:
        """The JSON document. ``rows_as_records``: ``modules`` holds the :class:`ModuleRow` records
        themselves, for a writer that turns each into its dict as it writes it (a 100k-module
        report then never holds 100k row dicts at once)."""
        return {
            "format": self.format,
            "source": self.source,
            "file": self.file,
            "peft_type": self.peft_type,
            "methods": list(self.methods),
            "components": dict(self.components),
            "config": self.config,
            "metadata": self.metadata,
            "modules": list(self.modules) if rows_as_records else [m.as_dict() for m in self.modules],
            "totals": self.totals.as_dict(),
            "sub_adapters": list(self.sub_adapters),
            "unknown_keys": list(self.unknown_keys),
            "scanned": self.scanned,
            "check": None if self.check is None else self.check.as_dict(),
            "serving": self.serving,
            "warnings": [w.as_dict() for w in self.warnings],
        }


def _totals(rows: Sequence[ModuleRow], tensors: int, nbytes: int) -> Totals:
    adapter_modules = adapter_params = full_copies = full_copy_params = token_deltas = base_overrides = params = 0
    for r in rows:  # one pass: a 100k-module report
        params += r.params
        if r.type == ADAPTER:
            adapter_modules += 1
            adapter_params += r.params
        elif r.type == FULL_COPY:
            full_copies += 1
            full_copy_params += r.params
        elif r.type == TOKEN_DELTA:
            token_deltas += 1
        else:
            base_overrides += 1
    return Totals(adapter_modules, full_copies, token_deltas, base_overrides, adapter_params, full_copy_params, params, tensors, nbytes)


def _warnings(findings: Sequence[Finding], check: Optional[CheckDocument], scan_findings: Optional[Sequence[Finding]]) -> list[Finding]:
    warnings = list(findings)
    if check is not None:
        warnings += [w for w in check.warnings if w not in warnings] + check.failure_findings()
    return warnings + list(scan_findings or ())


# ---------------------------------------------------------------------------------------------
# PEFT LoRA / AdaLoRA directories
# ---------------------------------------------------------------------------------------------


def _bound(check: Optional[CheckDocument]) -> frozenset[str]:
    """The modules a check bound to base tensors (``checked`` rows)."""
    return frozenset(b["module"] for c in check.components for b in c.bindings) if check is not None else frozenset()


def _peft_rows(ckpt: AdapterCheckpoint, bound: frozenset[str]) -> list[ModuleRow]:
    method = "adalora" if is_adalora(ckpt.config.raw) else "lora"
    rows = []
    for path, m in ckpt.lora.items():
        keys = m.keys
        rows.append(  # positional: a 100k-module adapter builds 100k of these
            ModuleRow(path, path, True, path, None, path in bound, None, ADAPTER, method, m.layer_kind, m.rank, m.config_rank, m.alpha,
                      m.scaling, m.use_dora, m.lora_bias, m.dtype, m.params, {s: tensor_dict(keys[s], t) for s, t in m.tensors.items()})
        )
    rows += [_full_copy_row(path, c, bound) for path, c in ckpt.full_copies.items()]
    for path, d in ckpt.token_deltas.items():
        rows.append(
            ModuleRow(path, path, True, path, None, False, None, TOKEN_DELTA, None, None, None, None, None, None, False, False, d.tensor.dtype,
                      d.tensor.numel, {"delta": {**tensor_dict(d.key, d.tensor), "indices": d.indices}})
        )
    for base_key, info in ckpt.base_overrides.items():
        rows.append(_override_row(base_key, info, ckpt.base_override_keys[base_key], bound))
    return rows


def _full_copy_row(path: str, copy: FullCopyModule, bound: frozenset[str]) -> ModuleRow:
    """A full copy (``modules_to_save``): ``tensors`` by parameter name (``weight``, ``dense.bias``)."""
    return ModuleRow(path, path, True, path, None, path in bound, None, FULL_COPY, None, None, None, None, None, None, False, False,
                     copy.dtype, copy.params, {p: tensor_dict(copy.keys[p], t) for p, t in copy.tensors.items()})


def _override_row(base_key: str, info: TensorInfo, key: str, bound: frozenset[str]) -> ModuleRow:
    """A saved base tensor (``X.base_layer.weight``, a saved bias): ``module`` is the base key it replaces."""
    return ModuleRow(base_key, split_prefix(key)[1], True, base_key, None, base_key in bound, None, BASE_OVERRIDE, None, None, None,
                     None, None, None, False, False, info.dtype, info.numel, {"value": tensor_dict(key, info)})


def peft_config_facts(ckpt: AdapterCheckpoint) -> dict[str, Any]:
    """The ``config`` block of a PEFT LoRA / AdaLoRA report: where the adapter is and what its config says."""
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
    check: Optional[CheckDocument] = None,
    scan_findings: Optional[Sequence[Finding]] = None,
    serving: Optional[dict[str, Any]] = None,
) -> InspectReport:
    """The inspect record of a PEFT LoRA / AdaLoRA adapter.

    Args:
        ckpt: the adapter, from :func:`~adapterfmt.formats.peft.reading.read_adapter`.
        source: what the user named (path or Hub id), echoed in the report.
        check: the adapter resolved against a base (:func:`~adapterfmt.reports.check.check_document`),
            if one was given; its warnings and failures are appended to the adapter's warnings.
        scan_findings: ``non-finite`` findings of a value scan; ``None`` when values were not read.
        serving: the serving engines' verdicts (:func:`adapterfmt.export.serving.serving_report`).
    """
    rows = _peft_rows(ckpt, _bound(check))
    infos = ckpt.tensor_infos()
    return InspectReport(
        format="peft",
        source=source,
        file=ckpt.weights_file,
        peft_type=str(ckpt.config.raw.get("peft_type", "LORA")).upper(),
        methods=sorted({r.method for r in rows if r.method}),
        components={},
        config=peft_config_facts(ckpt),
        metadata=None,
        modules=rows,
        totals=_totals(rows, len(infos) + len(ckpt.unknown_keys), sum(max(t.nbytes, 0) for t in infos.values())),
        sub_adapters=list(ckpt.sub_adapters),
        unknown_keys=list(ckpt.unknown_keys),
        warnings=_warnings(ckpt.findings, check, scan_findings),
        scanned=scan_findings is not None,
        check=check,
        serving=serving,
    )


# ---------------------------------------------------------------------------------------------
# kohya / LyCORIS / diffusers files and PEFT LoHa / LoKr directories
# ---------------------------------------------------------------------------------------------


def _foreign_rows(ckpt: ForeignCheckpoint, bound: frozenset[str]) -> list[ModuleRow]:
    rows = []
    for m in ckpt.modules:
        rows.append(
            ModuleRow(m.path if m.path is not None else m.name, m.name, m.path is not None, m.grammar_name, m.grammar_note, m.checked,
                      m.component, ADAPTER, m.kind, m.layer_kind,
                      m.rank, None, m.alpha, m.scaling, m.dora_scale is not None, False, m.dtype, m.params,
                      {s: tensor_dict(m.keys[s], i) for s, i in m.tensors.items()})
        )
    rows += [_full_copy_row(path, c, bound) for path, c in ckpt.full_copies.items()]
    for base_key, info in ckpt.base_overrides.items():
        rows.append(_override_row(base_key, info, ckpt.base_override_keys[base_key], bound))
    return rows


@with_gc_paused
def foreign_inspect_report(
    ckpt: ForeignCheckpoint,
    *,
    source: str,
    check: Optional[CheckDocument] = None,
    scan_findings: Optional[Sequence[Finding]] = None,
) -> InspectReport:
    """The inspect record of a kohya / LyCORIS / diffusers file or a PEFT LoHa / LoKr directory
    (arguments as :func:`inspect_report`)."""
    rows = _foreign_rows(ckpt, _bound(check))
    peft = ckpt.format == "peft"
    return InspectReport(
        format=ckpt.format,
        source=source,
        file=ckpt.file,
        peft_type=ckpt.configs[""].get("peft_type") if peft else None,
        methods=ckpt.kinds,
        components={c: len(ckpt.component_modules(c)) for c in ckpt.components},
        config=dict(ckpt.configs[""]) if peft else None,
        metadata=(ckpt.configs or None) if not peft else None,
        modules=rows,
        totals=_totals(rows, len(ckpt.file_tensors), sum(max(t.nbytes, 0) for t in ckpt.file_tensors.values())),
        sub_adapters=[],
        unknown_keys=list(ckpt.unknown_keys),
        warnings=_warnings(ckpt.findings, check, scan_findings),
        scanned=scan_findings is not None,
        check=check,
    )
