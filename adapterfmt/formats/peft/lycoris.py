"""PEFT's own LoHa and LoKr adapters (``peft_type`` ``LOHA`` / ``LOKR``), read into foreign records.

A PEFT LoHa / LoKr directory is ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<path>.<factor>``, the factors named and shaped as LyCORIS names them
(``hada_w1_a`` …, ``lokr_w1`` …; docs/FORMAT.md §10.1), so the records and the delta math
(§10.3) are shared. The scale differs in one place: PEFT's is ``alpha / r`` with ``r`` the
configured rank (``r`` / ``rank_pattern``) for every module, a LoKr module with no factored half
included, where LyCORIS uses 1. The other keys are sorted by the PEFT LoRA reader's rules: full
copies of ``modules_to_save`` (:func:`adapterfmt.checkpoint.copy_keys.full_copies_of`, FORMAT §3.6), saved
base tensors ``X.base_layer.*`` (§3.5), and anything else an unknown key (refused by merge, load
and convert).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from ...checkpoint.config import modules_to_save_entries
from ...checkpoint.config_types import LYCORIS_FIELD_TYPES, check_field_types
from ...checkpoint.copy_keys import full_copies_of
from ...checkpoint.findings import full_copy_entry_findings
from ...checkpoint.keys import KeyParts, Role, parse_saved, render_base
from ...checkpoint.matching import PatternKeyIndex
from ...checkpoint.methods import check_method_tensors
from ...constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, PEFT_PREFIX
from ...errors import CheckpointNotFoundError, InvalidConfigError, UnknownKeyError
from ...storage.header import SafetensorsHeader, read_header
from ..diffusion.kohya import foreign_findings
from ..diffusion.peft_view import component_adapter
from ..diffusion.records import LOHA, LOHA_SLOTS, LOKR, LOKR_SLOTS, ForeignCheckpoint, ForeignModule
from .weights_file import missing_weights_hint

PEFT_LYCORIS_TYPES = {"LOHA": LOHA, "LOKR": LOKR}


def peft_lycoris_type(directory: str) -> Optional[str]:
    """``loha`` / ``lokr`` when ``directory`` holds a PEFT LoHa / LoKr adapter, else ``None``."""
    path = os.path.join(directory, ADAPTER_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return PEFT_LYCORIS_TYPES.get(str(doc.get("peft_type", "")).upper()) if isinstance(doc, dict) else None


def _number(doc: dict[str, Any], name: str, default: float, path: str) -> float:
    v = doc.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise InvalidConfigError(f"must be a finite number >= 0, got {v!r}", path=path, key=name)
    return float(v)


def read_peft_lycoris(directory: "str | os.PathLike[str]") -> ForeignCheckpoint:
    """Read a PEFT LoHa / LoKr adapter directory from its config and header.

    Raises:
        CheckpointNotFoundError: no config or no ``adapter_model.safetensors``.
        InvalidConfigError: not a LOHA / LOKR config, or bad ``r`` / ``alpha`` / patterns /
            ``modules_to_save``.
    """
    d = os.fspath(directory)
    config_path = os.path.join(d, ADAPTER_CONFIG_FILE)
    if peft_lycoris_type(d) is None:
        raise InvalidConfigError("is not a PEFT LOHA or LOKR config", path=config_path, key="peft_type")
    with open(config_path, encoding="utf-8") as f:
        doc = json.load(f)
    weights = os.path.join(d, ADAPTER_SAFETENSORS_FILE)
    if not os.path.isfile(weights):
        raise CheckpointNotFoundError(f"has no {ADAPTER_SAFETENSORS_FILE}", path=d, hint=missing_weights_hint(d))
    return describe_peft_lycoris(doc, read_header(weights), config_path=config_path)


def describe_peft_lycoris(doc: Any, header: SafetensorsHeader, *, config_path: str) -> ForeignCheckpoint:
    """A PEFT LoHa / LoKr config and the header of its weights (a file's, or an in-memory state
    dict described like one) as foreign records.

    Raises:
        InvalidConfigError: not a LOHA / LOKR config, or bad ``r`` / ``alpha`` / patterns /
            ``modules_to_save``.
    """
    if not isinstance(doc, dict):
        raise InvalidConfigError("is not a JSON object", path=config_path)
    kind = PEFT_LYCORIS_TYPES.get(str(doc.get("peft_type", "")).upper())
    if kind is None:
        raise InvalidConfigError("is not a PEFT LOHA or LOKR config", path=config_path, key="peft_type")
    check_field_types(doc, path=config_path, fields=LYCORIS_FIELD_TYPES)
    check_method_tensors(str(doc["peft_type"]), header.tensors, path=header.path, config_path=config_path)
    r, alpha = _number(doc, "r", 8, config_path), _number(doc, "alpha", 8, config_path)
    ranks, alphas = doc.get("rank_pattern") or {}, doc.get("alpha_pattern") or {}
    for key, value in [("r", r)] + [(f"rank_pattern.{k}", v) for k, v in ranks.items()]:
        if value <= 0:  # PEFT's update_layer: "`r` should be a positive integer"
            raise InvalidConfigError(f"must be a positive integer, got {value:g}", path=config_path, key=key, hint="PEFT refuses r <= 0")
    entries = modules_to_save_entries(doc, config_path) or []
    ckpt = ForeignCheckpoint(
        format="peft", file=header.path, metadata=dict(header.metadata), configs={"": doc}, file_tensors=dict(header.tensors)
    )
    slots = set(LOHA_SLOTS if kind == LOHA else LOKR_SLOTS)
    modules: dict[str, ForeignModule] = {}
    plain: list[tuple[str, KeyParts]] = []
    for key, info in header.tensors.items():
        rest = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        path, _, slot = rest.rpartition(".")
        if path and slot in slots:
            m = modules.setdefault(path, ForeignModule(name=path, component=None, kind=kind, path=path, grammar_name=path))
            m.tensors[slot], m.keys[slot] = info, key
            continue
        parts = _parsed(key)
        if parts is not None and parts.role is Role.PLAIN:
            plain.append((key, parts))
        elif parts is not None and parts.role is Role.BASE_LAYER:  # a targeted lm_head / embedding saved in full (§3.5)
            ckpt.base_overrides[render_base(parts)] = info
            ckpt.base_override_keys[render_base(parts)] = key
        else:
            ckpt.unknown_keys.append(key)
    ckpt.full_copies, leftover = full_copies_of(plain, entries, header.tensors)
    unknown = set(ckpt.unknown_keys) | {k for k, _ in leftover}
    ckpt.unknown_keys = [k for k in header.tensors if k in unknown]  # in the file's order
    try:
        rank_keys, alpha_keys = PatternKeyIndex(list(ranks)), PatternKeyIndex(list(alphas))  # each pattern compiled once
    except InvalidConfigError as e:  # a bad regex: name the file too
        raise InvalidConfigError(e.message, path=config_path, key=e.key, hint=e.hint) from None
    for path, m in modules.items():
        rk, ak = rank_keys.first(path) if ranks else None, alpha_keys.first(path) if alphas else None
        module_r = float(ranks[rk]) if rk is not None else r
        m.alpha = float(alphas[ak]) if ak is not None else alpha
        m.config_scaling = m.alpha / module_r
    ckpt.modules = list(modules.values())
    ckpt.findings.extend(foreign_findings(ckpt))
    ckpt.findings.extend(full_copy_entry_findings(entries, doc.get("task_type"), list(ckpt.full_copies), list(modules)))
    return ckpt


def _parsed(key: str) -> Optional[KeyParts]:
    """The saved key parsed by the one key grammar (:mod:`adapterfmt.checkpoint.keys`); ``None`` when it is not a dotted name."""
    try:
        return parse_saved(key)
    except UnknownKeyError:
        return None


def peft_lycoris_checkpoint(directory: "str | os.PathLike[str]", name: str = "default") -> Any:
    """A PEFT LOHA / LOKR adapter directory as an :class:`~adapterfmt.checkpoint.records.AdapterCheckpoint`
    of factor modules, full copies and saved base tensors (FORMAT §10.6) for the merge engine and
    the loader; ``source_config`` keeps the directory's own config."""
    adapter = lycoris_adapter(read_peft_lycoris(directory), name)
    adapter.directory = os.path.abspath(os.fspath(directory))
    return adapter


def lycoris_adapter(ckpt: ForeignCheckpoint, name: str) -> Any:
    """PEFT LoHa / LoKr records as the checkpoint model's :class:`~adapterfmt.checkpoint.records.AdapterCheckpoint`
    (factor modules, full copies), with the adapter's own config as ``source_config``."""
    adapter = component_adapter(ckpt, None, factors=True, name=name)
    adapter.source_config = dict(ckpt.configs[""])
    return adapter
