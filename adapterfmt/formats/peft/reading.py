"""Reading the checkpoint model: an adapter directory read from its headers into typed records.

``read_adapter(path)`` -> :class:`~adapterfmt.checkpoint.records.AdapterCheckpoint` (the records live in
:mod:`adapterfmt.checkpoint.records` and are re-exported here); :func:`describe_tensors` sorts any header's
saved keys into those records (the wrapped-state-dict reader uses it too). Warnings come from the
rules in :mod:`adapterfmt.checkpoint.findings`. Nothing here reads tensor bytes or imports torch (except for a
``.bin`` file, which needs ``allow_pickle=True`` and is then read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ...checkpoint.adalora import SLOTS as ADALORA_SLOTS
from ...checkpoint.adalora import is_adalora
from ...checkpoint.adalora import scaling as adalora_scaling
from ...checkpoint.config import LoraConfig, read_config
from ...checkpoint.copy_keys import full_copies_of
from ...checkpoint.findings import adapter_findings, mixed_prefix_finding, wrapper_leftover_finding
from ...checkpoint.keys import KeyParts, Role, bias_key, param_key, parse_saved
from ...checkpoint.matching import matches_entry
from ...checkpoint.methods import check_method_tensors
from ...checkpoint.records import AdapterCheckpoint, FullCopyModule, LoraModule, TokenDelta
from ...constants import (
    ADAPTER_BIN_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_SAFETENSORS_FILE,
    DEFAULT_ADAPTER_NAME,
    PEFT_PREFIX,
)
from ...errors import CheckpointNotFoundError, InconsistentAdapterError, UnknownKeyError, UnsafeFileError
from ...sources.paths import ADAPTER_PATTERNS, resolve_dir, safe_join
from ...storage.gc_pause import with_gc_paused
from ...storage.header import SafetensorsHeader, TensorInfo, read_header
from .weights_file import missing_weights_hint

__all__ = ["AdapterCheckpoint", "FullCopyModule", "LoraModule", "TokenDelta", "describe_tensors", "read_adapter"]

_LAYER_KINDS = {2: "linear", 3: "conv1d", 4: "conv2d", 5: "conv3d"}  #: a LoRA factor's ndim -> layer kind
#: LoRA roles -> the tensor name used in :attr:`LoraModule.tensors`.
_LORA_SLOT = {
    (Role.LORA_A, "weight"): "lora_A",
    (Role.LORA_B, "weight"): "lora_B",
    (Role.LORA_B, "bias"): "lora_B.bias",
    (Role.LORA_EMBEDDING_A, None): "lora_A",
    (Role.LORA_EMBEDDING_B, None): "lora_B",
    (Role.DORA_MAGNITUDE, None): "magnitude",
}


def peft_type_of(config_path: str) -> Optional[str]:
    """The config's ``peft_type`` in upper case, ``None`` when unreadable (:func:`read_config` then reports why)."""
    try:
        with open(config_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return str(doc.get("peft_type", "")).upper() if isinstance(doc, dict) else None


@with_gc_paused
def read_adapter(
    path: "str | os.PathLike[str]",
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    allow_pickle: bool = False,
) -> AdapterCheckpoint:
    """Read an adapter directory (or Hub id) into an :class:`AdapterCheckpoint`, headers only.

    Args:
        path: adapter directory, a sub-adapter directory ``<dir>/<name>``, or a Hub repo id.
        subfolder: a sub-adapter inside ``path`` (``"second"`` for ``<dir>/second/``).
        revision: Hub revision.
        allow_pickle: permit ``adapter_model.bin`` (read with ``torch.load(weights_only=True)``).

    Raises:
        CheckpointNotFoundError: no adapter there.
        InvalidConfigError: the config is not valid.
        HeaderError: the safetensors file is damaged.
        UnsafeFileError: only a pickle ``.bin`` file exists and ``allow_pickle`` is false.
    """
    directory = resolve_dir(path, patterns=ADAPTER_PATTERNS, subfolder=subfolder, revision=revision)
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, ADAPTER_BIN_FILE):
        safe_join(directory, name, what="adapter file")  # a symlink may not lead out of the directory
    config_path = os.path.join(directory, ADAPTER_CONFIG_FILE)
    if not os.path.isfile(config_path):
        subs = _sub_adapters(directory)
        hint = f"it has sub-adapters {subs}; point at one of them" if subs else "is this an adapter directory?"
        raise CheckpointNotFoundError(f"has no {ADAPTER_CONFIG_FILE}", path=directory, hint=hint)
    if peft_type_of(config_path) in ("LOHA", "LOKR"):  # PEFT's LoHa / LoKr: factor modules (FORMAT §10.6)
        from .lycoris import peft_lycoris_checkpoint

        name = subfolder or (os.path.basename(os.path.normpath(directory)) if _is_sub_adapter(directory) else DEFAULT_ADAPTER_NAME)
        lycoris = peft_lycoris_checkpoint(directory, name=name)
        lycoris.sub_adapters = _sub_adapters(directory)
        return lycoris
    config = read_config(config_path)
    st_path = os.path.join(directory, ADAPTER_SAFETENSORS_FILE)
    bin_path = os.path.join(directory, ADAPTER_BIN_FILE)
    in_memory = None
    if os.path.isfile(st_path):
        weights_file = st_path
        header = read_header(st_path)
    elif os.path.isfile(bin_path):
        if not allow_pickle:
            raise UnsafeFileError(
                "is a pickle file, which can run code when loaded",
                path=bin_path,
                hint="pass --allow-pickle / allow_pickle=True to read it with torch.load(weights_only=True), or convert it to safetensors",
            )
        weights_file = bin_path
        header, in_memory = _read_bin(bin_path)
    else:
        raise CheckpointNotFoundError(f"has no {ADAPTER_SAFETENSORS_FILE} or {ADAPTER_BIN_FILE}", path=directory, hint=missing_weights_hint(directory))
    name = subfolder or (os.path.basename(os.path.normpath(directory)) if _is_sub_adapter(directory) else DEFAULT_ADAPTER_NAME)
    ckpt = AdapterCheckpoint(
        name=name,
        directory=directory,
        config=config,
        weights_file=weights_file,
        prefix="",
        sub_adapters=_sub_adapters(directory),
        metadata=dict(header.metadata),
        tensors_in_memory=in_memory,
    )
    describe_tensors(ckpt, header)
    return ckpt


def _is_sub_adapter(directory: str) -> bool:
    parent = os.path.dirname(os.path.normpath(directory))
    return os.path.isfile(os.path.join(parent, ADAPTER_CONFIG_FILE))


def _sub_adapters(directory: str) -> list[str]:
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    return [e for e in entries if os.path.isfile(os.path.join(directory, e, ADAPTER_CONFIG_FILE))]


def _read_bin(path: str) -> tuple[SafetensorsHeader, dict[str, Any]]:
    from ...storage.torch_io import read_pickle_weights

    return read_pickle_weights(path)


def describe_tensors(ckpt: AdapterCheckpoint, header: SafetensorsHeader) -> None:
    """Sort every tensor of ``header`` (saved key names) into ``ckpt``'s module records, and add
    the adapter's findings (:func:`~adapterfmt.checkpoint.findings.adapter_findings`) to ``ckpt.findings``.

    ``ckpt`` comes with its name, directory, config and weights file set; the records are filled
    in here. Raises :class:`~adapterfmt.errors.InconsistentAdapterError` for an empty header and
    :class:`~adapterfmt.errors.UnknownKeyError` for a key no grammar rule parses.
    """
    cfg = ckpt.config
    keys = list(header.tensors)
    if not keys:
        raise InconsistentAdapterError("holds no tensors", path=header.path, hint="the adapter is empty; re-export it")
    config_file = os.path.join(ckpt.directory, ADAPTER_CONFIG_FILE) if ckpt.directory else ""
    check_method_tensors(str(cfg.raw.get("peft_type", "LORA")), keys, path=header.path, config_path=config_file if os.path.isfile(config_file) else None)
    prefixes = {PEFT_PREFIX if k.startswith(PEFT_PREFIX) else "" for k in keys}
    ckpt.prefix = PEFT_PREFIX if PEFT_PREFIX in prefixes else ""
    if len(prefixes) > 1:
        ckpt.findings.append(mixed_prefix_finding(header.path, [k for k in keys if not k.startswith(PEFT_PREFIX)]))

    adalora = is_adalora(cfg.raw)
    plain: list[tuple[str, KeyParts]] = []
    lora_parts: dict[str, tuple[dict[str, TensorInfo], dict[str, str]]] = {}  # module -> (slot -> info, slot -> key)
    embedding_modules: set[str] = set()
    for key, info in header.tensors.items():
        try:
            parts = parse_saved(key)
        except UnknownKeyError as e:
            raise UnknownKeyError(e.message, path=header.path, key=key, hint="the file is damaged; re-export the adapter") from None
        slot = _LORA_SLOT.get((parts.role, parts.param))
        if slot is not None:
            _add_slot(lora_parts, parts.module, slot, key, info)
            if parts.role in (Role.LORA_EMBEDDING_A, Role.LORA_EMBEDDING_B):
                embedding_modules.add(parts.module)
        elif parts.role is Role.TOKENS_DELTA:
            idx = _token_indices(cfg, parts.module)
            ckpt.token_deltas[parts.module] = TokenDelta(parts.module, idx, info, key)
        elif parts.role is Role.BASE_LAYER:
            base_key = param_key(parts.module, parts.param or "")
            ckpt.base_overrides[base_key] = info
            ckpt.base_override_keys[base_key] = key
        elif parts.role in (Role.ORIGINAL, Role.FULL_COPY):
            ckpt.findings.append(wrapper_leftover_finding(key))
        elif parts.role in (Role.LORA_A, Role.LORA_B):
            ckpt.unknown_keys.append(key)  # e.g. lora_A.bias: no such tensor in LoRA
        elif adalora and parts.role is Role.PLAIN and parts.param in ADALORA_SLOTS:
            _add_slot(lora_parts, parts.module, ADALORA_SLOTS[parts.param], key, info)  # X.lora_A, X.lora_E (AdaLoRA)
        else:
            plain.append((key, parts))

    # Plain keys: full copies (config.modules_to_save), saved base biases, or unknown.
    lora_modules = set(lora_parts)
    copies, rest = full_copies_of(plain, cfg.modules_to_save or [], header.tensors)
    ckpt.full_copies.update(copies)
    for key, parts in rest:
        if parts.param == "bias" and cfg.bias in ("all", "lora_only") and (cfg.bias == "all" or parts.module in lora_modules):
            base_key = bias_key(parts.module)
            ckpt.base_overrides[base_key] = header.tensors[key]
            ckpt.base_override_keys[base_key] = key
        else:
            ckpt.unknown_keys.append(key)

    for module, (tensors, saved_keys) in sorted(lora_parts.items()):
        ckpt.lora[module] = _lora_module(ckpt, module, tensors, saved_keys, embedding=module in embedding_modules, adalora=adalora)

    from ...checkpoint.weight_tying import adopt_tied_copies

    adopt_tied_copies(ckpt, header)  # ensure_weight_tying saves the tied head's copy too
    ckpt.findings.extend(adapter_findings(ckpt))


def _add_slot(lora_parts: dict, module: str, slot: str, key: str, info: TensorInfo) -> None:
    """File one LoRA tensor under its module: ``lora_parts[module] = (slot -> info, slot -> key)``."""
    record = lora_parts.get(module)
    if record is None:
        record = lora_parts[module] = ({}, {})
    record[0][slot] = info
    record[1][slot] = key


def _token_indices(cfg: LoraConfig, module: str) -> Optional[list[int]]:
    spec = cfg.trainable_token_indices
    if isinstance(spec, list):
        return list(spec)
    if isinstance(spec, dict):
        for name, idx in spec.items():
            if matches_entry(module, name):
                return list(idx)
    return None


def _lora_module(
    ckpt: AdapterCheckpoint, module: str, tensors: dict[str, TensorInfo], keys: dict[str, str], *, embedding: bool, adalora: bool
) -> LoraModule:
    cfg = ckpt.config
    a = tensors.get("lora_A")
    b = tensors.get("lora_B")
    rank = None
    if a is not None:
        rank = a.shape[0] if a.shape else None
    elif b is not None and len(b.shape) >= 2:
        rank = b.shape[1]
    ndim = len(a.shape) if a else (len(b.shape) if b else 2)
    kind = "embedding" if embedding else _LAYER_KINDS.get(ndim, "unknown")
    config_rank = cfg.rank_for(module)
    if adalora:  # the tensors hold the (possibly budget-pruned) rank; scaling α/(r + 1e-5)
        return LoraModule(
            path=module,
            layer_kind=kind,
            rank=rank,
            config_rank=rank or config_rank,
            alpha=cfg.lora_alpha,
            scaling=adalora_scaling(cfg.lora_alpha, rank or config_rank),
            use_dora=False,
            lora_bias="lora_B.bias" in tensors,
            tensors=tensors,
            keys=keys,
        )
    if cfg.target_parameters:
        from ...checkpoint.param_targets import param_target, rank_and_scaling  # only for target_parameters: its tables load on import

        ptarget = param_target(cfg, module)
        found = {rank_and_scaling(cfg, f"{ptarget.owner}.{p}") for p in ptarget.candidates} if ptarget is not None else set()
        if ptarget is not None and len(found) == 1:
            # target_parameters: r and alpha are looked up on the parameter key; a fused-expert LoRA
            # holds r·E rows (FORMAT.md §3.9), so the tensor rank is r when it divides evenly.
            config_rank, scaling = next(iter(found))
            if rank and rank % config_rank == 0:
                rank = config_rank
            return LoraModule(
                path=module,
                layer_kind=kind,
                rank=rank,
                config_rank=config_rank,
                alpha=cfg.alpha_for(f"{ptarget.owner}.{ptarget.candidates[0]}"),
                scaling=scaling,
                use_dora="magnitude" in tensors,
                lora_bias="lora_B.bias" in tensors,
                tensors=tensors,
                keys=keys,
            )
    return LoraModule(
        path=module,
        layer_kind=kind,
        rank=rank,
        config_rank=config_rank,
        alpha=cfg.alpha_for(module),
        scaling=cfg.scaling_for(module, rank or config_rank),
        use_dora="magnitude" in tensors,
        lora_bias="lora_B.bias" in tensors,
        tensors=tensors,
        keys=keys,
    )

