"""Wrapped checkpoints: a whole ``PeftModel.state_dict()`` saved as it sits in memory.

Trainer, FSDP, DeepSpeed and Lightning saves, ``torch.save(peft_model.state_dict())`` and
``save_file(peft_model.state_dict())`` keep PEFT's in-memory names
(``…q_proj.base_layer.weight``, ``…q_proj.lora_A.default.weight``,
``lm_head.original_module.weight``, ``lm_head.modules_to_save.default.weight``), with or without
the ``base_model.model.`` prefix, in one safetensors file, in shards with an index, or in a
pickle. :func:`read_wrapped` describes such a file with the records of an adapter
(:class:`~adapterfmt.checkpoint.records.AdapterCheckpoint`, one per adapter name; sorted by
:func:`~adapterfmt.formats.peft.reading.describe_tensors`, the config rebuilt by :mod:`adapterfmt.checkpoint.config_rebuild`,
its files found by :mod:`adapterfmt.formats.wrapped.files`) plus the base weights it
carries, and says for every full copy whether the trained copy differs from the frozen original.

A state dict does not store ``lora_alpha``: without ``alpha=`` or ``config=`` the description
leaves ``lora_alpha`` / ``alpha`` / ``scaling`` as ``None`` (unknown) rather than guessing a scale.
Nothing here imports torch, except to read a pickle the caller allowed. See docs/FORMAT.md §9.1
(reading) and §9.2 (the rebuilt config).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Union

from ...base.reading import read_base
from ...checkpoint.config import LoraConfig, parse_config, read_config
from ...checkpoint.config_rebuild import exact_pattern, rebuild_config  # noqa: F401  (public here since 0.1)
from ...checkpoint.finding import Finding
from ...checkpoint.findings import full_copy_suffix_finding, full_copy_unchanged_finding, mixed_prefix_finding, unknown_keys_finding
from ...checkpoint.keys import LORA_ROLES, KeyParts, Role, parse_wrapped, render_base, render_saved, weight_key
from ...checkpoint.matching import module_names_from_keys, peft_full_copy_matches
from ...checkpoint.records import AdapterCheckpoint
from ...constants import ADAPTER_CONFIG_FILE, DEFAULT_ADAPTER_NAME, PEFT_PREFIX
from ...errors import CheckpointNotFoundError, InconsistentAdapterError, UnknownKeyError, UnsafeFileError
from ...storage.header import SafetensorsHeader, TensorInfo
from ..peft.reading import describe_tensors
from .files import (  # noqa: F401  (PICKLE_*, is_wrapped_checkpoint: public here since 0.1)
    ADAPTER_ROLES,
    PICKLE_SUFFIXES,
    PICKLE_WEIGHTS_FILE,
    is_wrapped_checkpoint,
    locate_wrapped,
)

#: ``layout`` of every :class:`WrappedCheckpoint` (an adapter directory is PEFT's saved layout).
WRAPPED_LAYOUT = "wrapped"

AlphaSpec = Union[float, Mapping[str, float], None]
ConfigSpec = Union[LoraConfig, str, "os.PathLike[str]", Mapping[str, Union[LoraConfig, str, "os.PathLike[str]"]], None]


@dataclass
class WrappedCheckpoint:
    """A whole wrapped model's state dict, described.

    Attributes:
        path: what the caller named (file or directory).
        directory: the directory holding the weights (its ``config.json``, if any, is ``model_config``).
        weight_files: the weight files, in index order.
        storage: ``safetensors``, ``safetensors-sharded`` or ``pickle``.
        prefix: ``base_model.model.`` or ``""``.
        adapters: adapter name -> its tensors as an adapter (saved names in ``keys``; each
            :class:`TensorInfo` keeps the wrapped key and the file it lives in).
        base: base key -> the tensor of the plain model (``base_layer``, ``original_module``, untouched).
        base_keys: base key -> wrapped key.
        originals: full-copy module -> parameter -> its frozen ``original_module`` tensor.
        copy_changed: adapter -> full-copy module -> whether the trained copy differs from the
            original byte for byte (empty when copies were not compared).
        alpha_known: adapter -> whether ``lora_alpha`` came from the caller (else it is ``None``).
        findings: file-level warnings; each adapter's own are in ``adapters[name].findings``.
        tensors_in_memory: only for pickles: wrapped key -> tensor.
    """

    path: str
    directory: str
    weight_files: list[str]
    storage: str
    prefix: str
    adapters: dict[str, AdapterCheckpoint] = field(default_factory=dict)
    base: dict[str, TensorInfo] = field(default_factory=dict)
    base_keys: dict[str, str] = field(default_factory=dict)
    originals: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)
    copy_changed: dict[str, dict[str, bool]] = field(default_factory=dict)
    alpha_known: dict[str, bool] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    tensors_in_memory: Optional[dict[str, Any]] = None
    layout: str = WRAPPED_LAYOUT

    @property
    def base_nbytes(self) -> int:
        return sum(max(t.nbytes, 0) for t in self.base.values())

    def all_findings(self) -> list[Finding]:
        """File-level findings, then each adapter's."""
        return list(self.findings) + [f for a in self.adapters.values() for f in a.findings]

    def summary(self) -> str:
        """The layout line, then one line per full copy saying which adapters trained it::

            layout: wrapped PeftModel.state_dict() (safetensors-sharded, 3 files, prefix 'base_model.model.')
            adapters: default, other (lora_alpha unknown: pass --alpha or --config to convert)
            base: 21 tensors, 17,600 bytes
            full copy 'lm_head': default trained, other UNCHANGED
        """
        files = f", {len(self.weight_files)} files" if len(self.weight_files) > 1 else ""
        unknown = [n for n, known in self.alpha_known.items() if not known]
        lines = [
            f"layout: {self.layout} PeftModel.state_dict() ({self.storage}{files}, prefix {self.prefix!r})",
            f"adapters: {', '.join(self.adapters)}"
            + (f" (lora_alpha unknown for {', '.join(unknown)}: pass --alpha or --config to convert)" if unknown else ""),
            f"base: {len(self.base)} tensors, {self.base_nbytes:,} bytes",
        ]
        modules = sorted({m for status in self.copy_changed.values() for m in status})
        for m in modules:
            states = [f"{n} {'trained' if s[m] else 'UNCHANGED'}" for n, s in self.copy_changed.items() if m in s]
            lines.append(f"full copy {m!r}: {', '.join(states)}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The facts inspect prints for the file (per-adapter modules come from ``adapters``)."""
        return {
            "layout": self.layout,
            "storage": self.storage,
            "weight_files": list(self.weight_files),
            "prefix": self.prefix,
            "adapters": list(self.adapters),
            "alpha_known": dict(self.alpha_known),
            "base_tensors": len(self.base),
            "base_bytes": self.base_nbytes,
            "full_copies": {
                name: {m: ("trained" if changed else "unchanged") for m, changed in mods.items()}
                for name, mods in self.copy_changed.items()
            },
            "unknown_keys": list(self.unknown_keys),
        }


# ---------------------------------------------------------------------------------------------
# READING
# ---------------------------------------------------------------------------------------------


def read_wrapped(
    path: "str | os.PathLike[str]",
    *,
    alpha: AlphaSpec = None,
    config: ConfigSpec = None,
    allow_pickle: bool = False,
    compare_copies: bool = True,
) -> WrappedCheckpoint:
    """Describe a wrapped state dict: one :class:`AdapterCheckpoint` per adapter name plus the base.

    Args:
        path: a ``.safetensors`` file, ``model.safetensors.index.json``, a directory holding one
            of those (or one ``.safetensors`` file), or a pickle ``.bin``/``.pt``/``.pth``.
        alpha: ``lora_alpha`` of every adapter, or a mapping adapter name -> alpha.
        config: a known ``adapter_config.json`` (path, directory or :class:`LoraConfig`) for every
            adapter, or a mapping adapter name -> one.
        allow_pickle: permit a pickle (read with ``torch.load(weights_only=True)``).
        compare_copies: compare each full copy with its original byte for byte
            (``full-copy-unchanged``); reads both tensors, stopping at the first difference.

    Returns:
        A :class:`WrappedCheckpoint`.

    Raises:
        CheckpointNotFoundError: no weights there, or ``path`` is an adapter directory.
        UnsafeFileError: a pickle without ``allow_pickle``.
        HeaderError / ShardIndexError: damaged files or index.
        InvalidConfigError: both alpha and config for one adapter, or a config that is not valid.
        UnknownKeyError: no key carries an adapter name (not a wrapped state dict).
        InconsistentAdapterError: two wrapped keys name the same base tensor.
    """
    spec = os.fspath(path)
    loc = locate_wrapped(spec)
    in_memory = None
    model_config: dict[str, Any] = {}
    if loc.storage == "pickle":
        if not allow_pickle:
            raise UnsafeFileError(
                "is a pickle file, which can run code when loaded",
                path=loc.files[0],
                hint="pass --allow-pickle / allow_pickle=True to read it with torch.load(weights_only=True), or convert it to safetensors",
            )
        from ...storage.torch_io import read_pickle_weights

        header, in_memory = read_pickle_weights(loc.files[0])
        tensors, files = dict(header.tensors), list(loc.files)
    else:
        base_model = read_base(loc.directory if loc.index else loc.files[0])
        tensors, model_config = dict(base_model.tensors), base_model.config
        files = [os.path.join(base_model.directory, s) for s in base_model.shards]
    wrapped = WrappedCheckpoint(
        path=spec,
        directory=loc.directory,
        weight_files=files,
        storage=loc.storage,
        prefix="",
        model_config=model_config,
        tensors_in_memory=in_memory,
    )
    groups = _sort_keys(wrapped, tensors)
    if not groups:
        raise UnknownKeyError(
            "no tensor carries an adapter name (….lora_A.<name>.weight, ….modules_to_save.<name>.…)",
            path=spec,
            hint="this is not a wrapped PeftModel.state_dict(); for a plain model or an adapter directory use the other commands",
        )
    base_modules, _ = module_names_from_keys(wrapped.base)
    for name, entries in groups.items():
        given_alpha, given_config = _pick(alpha, name), _pick_config(config, name)
        wrapped.adapters[name] = _describe_adapter(wrapped, name, entries, base_modules, given_alpha, given_config)
        wrapped.alpha_known[name] = given_alpha is not None or given_config is not None
    _file_findings(wrapped, base_modules)
    if compare_copies:
        compare_full_copies(wrapped)
    return wrapped


def _pick(spec: Any, name: str) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name)
    return spec


def _pick_config(spec: ConfigSpec, name: str) -> Optional[LoraConfig]:
    value = _pick(spec, name)
    if value is None or isinstance(value, LoraConfig):
        return value
    value = os.fspath(value)
    return read_config(os.path.join(value, ADAPTER_CONFIG_FILE) if os.path.isdir(value) else value)


def _sort_keys(wrapped: WrappedCheckpoint, tensors: Mapping[str, TensorInfo]) -> dict[str, list[tuple[KeyParts, TensorInfo]]]:
    """Fill ``base``/``originals``/``unknown_keys``; return adapter name -> its parsed tensors."""
    groups: dict[str, list[tuple[KeyParts, TensorInfo]]] = {}
    prefixes: set[str] = set()
    for key, info in tensors.items():
        try:
            parts = parse_wrapped(key)
        except UnknownKeyError:
            wrapped.unknown_keys.append(key)
            continue
        prefixes.add(parts.prefix)
        if parts.role in ADAPTER_ROLES and parts.adapter:
            groups.setdefault(parts.adapter, []).append((parts, info))
            continue
        base_key = render_base(parts)
        if base_key in wrapped.base_keys:
            raise InconsistentAdapterError(
                f"names the same base tensor '{base_key}' as '{wrapped.base_keys[base_key]}'",
                path=info.file,
                key=key,
                hint="the state dict mixes wrapped and plain names for one module; re-export it",
            )
        wrapped.base[base_key] = info
        wrapped.base_keys[base_key] = key
        if parts.role is Role.ORIGINAL:
            wrapped.originals.setdefault(parts.module, {})[parts.param or ""] = info
    wrapped.prefix = PEFT_PREFIX if PEFT_PREFIX in prefixes else ""
    if len(prefixes) > 1:
        wrapped.findings.append(mixed_prefix_finding(wrapped.path, [k for k in tensors if not k.startswith(PEFT_PREFIX)]))
    # adapters in the order PEFT created them: ``default`` first, then as found
    return dict(sorted(groups.items(), key=lambda kv: kv[0] != DEFAULT_ADAPTER_NAME))


def _describe_adapter(
    wrapped: WrappedCheckpoint,
    name: str,
    entries: "list[tuple[KeyParts, TensorInfo]]",
    base_modules: "list[str]",
    alpha: Optional[float],
    config: Optional[LoraConfig],
) -> AdapterCheckpoint:
    """One adapter of the file, described by :mod:`adapterfmt.formats.peft.reading` from its saved names."""
    saved: dict[str, TensorInfo] = {}
    ranks: dict[str, int] = {}
    b_ranks: dict[str, int] = {}
    dora: dict[str, bool] = {}
    bias: dict[str, bool] = {}
    copies: set[str] = set()
    for parts, info in entries:
        saved[render_saved(parts)] = info
        if parts.role in LORA_ROLES:
            dora.setdefault(parts.module, False)
            bias.setdefault(parts.module, False)
        if parts.role in (Role.LORA_A, Role.LORA_EMBEDDING_A) and parts.param in (None, "weight") and info.shape:
            ranks[parts.module] = info.shape[0]
        elif parts.role in (Role.LORA_B, Role.LORA_EMBEDDING_B) and parts.param in (None, "weight") and len(info.shape) >= 2:
            b_ranks[parts.module] = info.shape[1]
        elif parts.role is Role.DORA_MAGNITUDE:
            dora[parts.module] = True
        elif parts.role is Role.LORA_B and parts.param == "bias":
            bias[parts.module] = True
        elif parts.role is Role.FULL_COPY:
            copies.add(parts.module)
    ranks = {**b_ranks, **ranks}
    doc = rebuild_config(
        ranks,
        full_copies=sorted(copies),
        use_dora=bool(dora) and all(dora.values()),
        lora_bias=bool(bias) and all(bias.values()),
        fan_in_fan_out=_transposed(wrapped, entries),
        base_modules=base_modules,
        alpha=alpha,
        config=config,
    )
    known = doc.get("lora_alpha") is not None
    cfg = parse_config({**doc, "lora_alpha": doc["lora_alpha"] if known else 1.0})
    first = wrapped.weight_files[0] if len(wrapped.weight_files) == 1 else wrapped.path
    ckpt = AdapterCheckpoint(
        name=name,
        directory=wrapped.directory,
        config=cfg,
        weights_file=first,
        prefix=wrapped.prefix,
        tensors_in_memory=wrapped.tensors_in_memory,
    )
    describe_tensors(ckpt, SafetensorsHeader(path=first, tensors=saved))
    if not known:
        ckpt.config = replace(cfg, lora_alpha=None, raw=doc)  # type: ignore[arg-type]
        for m in ckpt.lora.values():
            m.alpha = m.scaling = None  # type: ignore[assignment]
    return ckpt


def _transposed(wrapped: WrappedCheckpoint, entries: "list[tuple[KeyParts, TensorInfo]]") -> bool:
    """Whether the adapter's linear layers store ``(in, out)`` weights (transformers ``Conv1D``),
    voted over the non-square base weights the file carries."""
    a = {p.module: i.shape for p, i in entries if p.role is Role.LORA_A and p.param == "weight" and len(i.shape) == 2}
    b = {p.module: i.shape for p, i in entries if p.role is Role.LORA_B and p.param == "weight" and len(i.shape) == 2}
    votes = []
    for module in a.keys() & b.keys():
        base = wrapped.base.get(weight_key(module))
        out_in = (b[module][0], a[module][1])
        if base is not None and len(base.shape) == 2 and out_in[0] != out_in[1]:
            if tuple(base.shape) in (out_in, out_in[::-1]):
                votes.append(tuple(base.shape) == out_in[::-1])
    return sum(votes) > len(votes) / 2


def _file_findings(wrapped: WrappedCheckpoint, base_modules: "list[str]") -> None:
    if wrapped.unknown_keys:
        wrapped.findings.append(unknown_keys_finding(wrapped.path, wrapped.unknown_keys, "PEFT's in-memory names"))
    for name, ckpt in wrapped.adapters.items():
        for module in ckpt.full_copies:
            peft_binds = peft_full_copy_matches(base_modules, module)
            loose = [n for n in peft_binds if n not in ckpt.full_copies]
            if loose:
                ckpt.findings.append(full_copy_suffix_finding(module, peft_binds, [module], loose, adapter=name))


# ---------------------------------------------------------------------------------------------
# TRAINED COPY VS ORIGINAL
# ---------------------------------------------------------------------------------------------


def compare_full_copies(wrapped: WrappedCheckpoint) -> None:
    """Fill ``copy_changed`` and add a ``full-copy-unchanged`` finding per adapter whose trained
    copy of a module equals its ``original_module`` byte for byte (a copy that never trained,
    e.g. PEFT #2494: ``modules_to_save`` frozen under ``inject_adapter_in_model`` in peft <= 0.15).

    Safetensors are compared as raw byte ranges of the files (no torch); pickles as the bytes of
    the tensors in memory.
    """
    for name, ckpt in wrapped.adapters.items():
        status = wrapped.copy_changed.setdefault(name, {})
        for module, copy in ckpt.full_copies.items():
            originals = wrapped.originals.get(module, {})
            if not originals:
                continue
            status[module] = any(
                originals.get(param) is None or not _same_bytes(originals[param], info, wrapped.tensors_in_memory)
                for param, info in copy.tensors.items()
            )
        same = sorted(m for m, changed in status.items() if not changed)
        if same:
            ckpt.findings.append(full_copy_unchanged_finding(name, same))


def _same_bytes(a: TensorInfo, b: TensorInfo, in_memory: Optional[Mapping[str, Any]]) -> bool:
    from ...storage.tensor_source import TensorSource

    with TensorSource({a.file: in_memory or {}, b.file: in_memory or {}}) as source:
        return source.same_bytes(a, b)
