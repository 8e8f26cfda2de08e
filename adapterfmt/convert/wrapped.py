"""Wrapped state dict <-> PEFT's saved layout.

* :func:`convert_wrapped` writes what ``PeftModel.save_pretrained`` would have written for a
  wrapped checkpoint (:mod:`adapterfmt.formats.wrapped.reading`): ``adapter_config.json`` rebuilt from the
  tensors plus the caller's alpha or config, and ``adapter_model.safetensors`` with saved names
  (adapter name and wrapper infixes removed, full copies under the module's own key). With
  ``base_out`` it also writes the plain base model the file carries.
* :func:`merge_wrapped` produces the merged plain model from such a checkpoint, through the merge
  engine (:func:`adapterfmt.merging.engine.merge_to_directory`).
* :func:`wrapped_names` (:mod:`adapterfmt.formats.wrapped.mapping`, re-exported here) is the reverse
  mapping: adapter(s) + base keys -> the exact names of the wrapped model's ``state_dict()``.

Outputs are staged beside the target and renamed into place when complete, with the merge
engine's :mod:`adapterfmt.storage.staging` (``StagedDirectory``, ``check_output_path``); an existing
non-empty output is refused. Tensor bytes are copied unchanged by its ``ShardWriter``, file to file,
so converting a safetensors checkpoint needs no torch and little memory. See docs/FORMAT.md
§9.3 and §9.4.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from ..base.reading import BaseModel
from ..base.reading import _tied_modules as tied_modules  # the tie facts read_base finds, for a base built here
from ..checkpoint.findings import Finding
from ..checkpoint.keys import Role, parse_wrapped, render_saved
from ..constants import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_SAFETENSORS_FILE,
    DEFAULT_ADAPTER_NAME,
    DTYPE_BITS,
    PEFT_PREFIX,
    SAFETENSORS_INDEX_FILE,
    SAFETENSORS_WEIGHTS_FILE_PATTERN,
)
from ..errors import (
    CheckpointNotFoundError,
    InconsistentAdapterError,
    InvalidConfigError,
    UnknownKeyError,
    UnsupportedFeatureError,
)
from ..formats.peft.reading import AdapterCheckpoint
from ..formats.wrapped.mapping import WrappedSource, wrapped_names  # noqa: F401  (re-exported: adapterfmt.convert.wrapped.wrapped_names)
from ..formats.wrapped.reading import AlphaSpec, ConfigSpec, WrappedCheckpoint, read_wrapped
from ..sources.paths import safe_join
from ..storage.header import TensorInfo
from ..storage.pause import pause_point
from ..storage.safetensors_stream import ShardWriter, TensorSpec
from ..storage.staging import StagedDirectory, check_output_path, clean_stale, copy_file, write_text
from ..storage.tensor_source import TensorSource

_METADATA = {"format": "pt"}
#: huggingface_hub's default shard size (``split_state_dict_into_shards_factory``).
DEFAULT_MAX_SHARD_SIZE = "5GB"
#: Small model files copied from the checkpoint's directory into ``base_out`` when present.
MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
    "preprocessor_config.json",
)


@dataclass
class ConvertResult:
    """What :func:`convert_wrapped` wrote.

    Attributes:
        output: the adapter directory.
        adapters: adapter name -> its directory (``output`` itself, or ``output/<name>``).
        base_out: the plain base model directory, if one was written.
        tensors: tensors written (adapters and base).
        nbytes: tensor bytes written.
        findings: the checkpoint's warnings (``full-copy-unchanged``, ...).
    """

    source: str
    output: str
    adapters: dict[str, str]
    base_out: Optional[str] = None
    tensors: int = 0
    nbytes: int = 0
    findings: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "output": self.output,
            "adapters": dict(self.adapters),
            "base_out": self.base_out,
            "tensors": self.tensors,
            "bytes": self.nbytes,
            "warnings": [f.as_dict() for f in self.findings],
        }


# ---------------------------------------------------------------------------------------------
# WRITING
# ---------------------------------------------------------------------------------------------


def saved_key(info: TensorInfo) -> str:
    """The key PEFT's ``save_pretrained`` gives the tensor stored under the wrapped key ``info.key``."""
    return render_saved(parse_wrapped(info.key), prefix=PEFT_PREFIX)


def check_convertible(adapter: AdapterCheckpoint, *, path: str) -> None:
    """Refuse an adapter whose saved form would not load as it trained.

    Raises:
        InvalidConfigError: ``lora_alpha`` is unknown (a state dict does not store it).
        InconsistentAdapterError: a LoRA module lacks lora_A or lora_B, or DoRA / ``lora_bias``
            is on some modules only (a config cannot express that).
        UnknownKeyError: adapter tensors that fit no LoRA rule (e.g. ``lora_A.<name>.bias``).
        UnsupportedFeatureError: trainable-token rows without their indices, or LoRA nested in
            another wrapper (``nn.MultiheadAttention``).
    """
    name = adapter.name
    if adapter.config.lora_alpha is None:
        raise InvalidConfigError(
            f"adapter '{name}': a PeftModel.state_dict() does not store lora_alpha, and the scale of every LoRA "
            "delta depends on it",
            path=path,
            key="lora_alpha",
            hint="pass --alpha A (the lora_alpha used in training) or --config adapter_config.json of that run",
        )
    for module, m in adapter.lora.items():
        missing = [s for s in ("lora_A", "lora_B") if s not in m.tensors]
        if missing:
            raise InconsistentAdapterError(
                f"adapter '{name}': module has no {missing[0]}", path=path, key=module, hint="the state dict is incomplete"
            )
        for flag, have in (("use_dora", m.use_dora), ("lora_bias", m.lora_bias)):
            if have != getattr(adapter.config, flag):
                raise InconsistentAdapterError(
                    f"adapter '{name}': {flag} holds for some LoRA modules only (this one: {have}); "
                    "one adapter_config.json cannot express that",
                    path=path,
                    key=module,
                    hint="split the modules into two adapters",
                )
    nested = [m for m in adapter.lora if parse_wrapped(f"{m}.weight").role is not Role.PLAIN]
    if nested:
        raise UnsupportedFeatureError(
            f"adapter '{name}': LoRA inside another wrapper (nn.MultiheadAttention's out_proj) has no plain base name",
            path=path,
            key=nested[0],
            hint="convert it with PEFT instead",
        )
    if adapter.unknown_keys:
        raise UnknownKeyError(
            f"adapter '{name}': tensor fits no LoRA rule", path=path, key=adapter.unknown_keys[0], hint="it cannot be saved in PEFT's layout"
        )
    for module, d in adapter.token_deltas.items():
        if d.indices is None:
            raise UnsupportedFeatureError(
                f"adapter '{name}': trainable-token rows without their indices (the state dict does not store them)",
                path=path,
                key=module,
                hint="pass --config with the training run's trainable_token_indices",
            )


def _nbytes(info: TensorInfo) -> int:
    """Size from dtype and shape (a pickle's tensors have no byte range)."""
    return info.numel * DTYPE_BITS[info.dtype] // 8


def write_safetensors(path: str, items: Sequence[tuple[str, TensorInfo]], in_memory: Optional[Mapping[str, Any]] = None) -> int:
    """One safetensors file holding ``items`` (output key, source tensor), in order, bytes unchanged.

    Uses the merge engine's :class:`~adapterfmt.storage.safetensors_stream.ShardWriter`: tensors of a safetensors
    source are copied file to file by the kernel, never decoded (no torch); tensors of a pickle
    come from ``in_memory`` (wrapped key -> tensor). Returns the tensor bytes written.
    """
    writer = ShardWriter(path, [TensorSpec(key, info.dtype, tuple(info.shape)) for key, info in items], metadata=_METADATA)
    try:
        with TensorSource() as source:
            for key, info in items:
                if info.start >= 0:
                    writer.copy([key], source.fd(info.file), info.start)
                else:
                    from ..storage.torch_io import tensor_bytes  # only pickles reach here, and reading them imported torch already

                    writer.write(key, tensor_bytes((in_memory or {})[info.key]))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return sum(_nbytes(info) for _, info in items)


def write_adapter(adapter: AdapterCheckpoint, directory: str) -> tuple[int, int]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of one adapter into ``directory``.

    Args:
        adapter: an adapter of a :class:`WrappedCheckpoint` (its config is the rebuilt document).

    Returns:
        ``(tensors, bytes)`` written.
    """
    os.makedirs(directory, exist_ok=True)
    items = sorted((saved_key(info), info) for info in adapter.tensor_infos().values())
    nbytes = write_safetensors(os.path.join(directory, ADAPTER_SAFETENSORS_FILE), items, adapter.tensors_in_memory)
    _write_json(os.path.join(directory, ADAPTER_CONFIG_FILE), dict(adapter.config.raw), sort_keys=True)
    return len(items), nbytes


def write_base(
    wrapped: WrappedCheckpoint, directory: str, *, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE
) -> tuple[int, int]:
    """Write the plain base model the checkpoint carries (base names, bytes unchanged) into ``directory``.

    Shards are planned from the header sizes with huggingface_hub's
    ``split_state_dict_into_shards_factory`` (``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` plus the index) and written by
    :func:`write_safetensors`, so memory stays small whatever the model's size. The model files
    found beside the checkpoint's weights (:data:`MODEL_FILE_PATTERNS`: ``config.json``,
    tokenizer files, ...) are copied.

    Returns:
        ``(tensors, bytes)`` written.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    os.makedirs(directory, exist_ok=True)
    split = split_state_dict_into_shards_factory(
        dict(wrapped.base),
        get_storage_size=_nbytes,
        filename_pattern=SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=max_shard_size,
    )
    nbytes = 0
    for filename, keys in split.filename_to_tensors.items():
        items = [(k, wrapped.base[k]) for k in keys]
        nbytes += write_safetensors(os.path.join(directory, filename), items, wrapped.tensors_in_memory)
    if split.is_sharded:
        index = {"metadata": {"total_size": nbytes}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        _write_json(os.path.join(directory, SAFETENSORS_INDEX_FILE), index)
    for name in _model_files(wrapped.directory):
        copy_file(os.path.join(wrapped.directory, name), os.path.join(directory, name))
    return len(wrapped.base), nbytes


def _write_json(path: str, doc: Any, *, sort_keys: bool = False) -> None:
    write_text(path, json.dumps(doc, indent=2, sort_keys=sort_keys) + "\n")


def _select(wrapped: WrappedCheckpoint, adapter_name: Optional[str]) -> dict[str, AdapterCheckpoint]:
    if adapter_name is None:
        return dict(wrapped.adapters)
    if adapter_name not in wrapped.adapters:
        raise CheckpointNotFoundError(
            f"has no adapter named {adapter_name!r}",
            path=wrapped.path,
            key=adapter_name,
            hint=f"it has {', '.join(repr(a) for a in wrapped.adapters)}",
        )
    return {adapter_name: wrapped.adapters[adapter_name]}


def convert_wrapped(
    path: "str | os.PathLike[str]",
    output: "str | os.PathLike[str]",
    *,
    adapter_name: Optional[str] = None,
    alpha: AlphaSpec = None,
    config: ConfigSpec = None,
    base_out: "str | os.PathLike[str] | None" = None,
    allow_pickle: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> ConvertResult:
    """Write a wrapped checkpoint in PEFT's saved adapter layout (and optionally its base model).

    Args:
        path: the wrapped checkpoint (see :func:`~adapterfmt.formats.wrapped.reading.read_wrapped`).
        output: the adapter directory to create (must not exist, or be empty).
        adapter_name: the one adapter to write, at the top of ``output``. ``None`` writes every
            adapter as ``save_pretrained`` does: ``default`` at the top, any other ``X`` in ``output/X``.
        alpha: ``lora_alpha`` (one value, or adapter name -> value).
        config: a known ``adapter_config.json`` (one, or adapter name -> one); its alpha,
            alpha_pattern, rsLoRA, task type and token indices are used, the rest comes from the tensors.
        base_out: also write the plain base model here.
        allow_pickle: permit a pickle checkpoint (``torch.load(weights_only=True)``).
        max_shard_size: shard size of ``base_out``.
        overwrite: replace non-empty outputs (the old ones are removed only once the new ones are complete).

    Returns:
        A :class:`ConvertResult`.

    Raises:
        InvalidConfigError: no alpha and no config for an adapter written (nothing is guessed).
        OutputPathError: an output is not empty, or lies inside the checkpoint.
        CheckpointNotFoundError: no such checkpoint or adapter name.
        InconsistentAdapterError / UnknownKeyError / UnsupportedFeatureError: see :func:`check_convertible`.
    """
    src = os.fspath(path)
    out = check_output_path(output, [src], overwrite=overwrite)
    base_dir = None if base_out is None else check_output_path(base_out, [src, out], overwrite=overwrite)
    wrapped = read_wrapped(src, alpha=alpha, config=config, allow_pickle=allow_pickle)
    chosen = _select(wrapped, adapter_name)
    for adapter in chosen.values():
        check_convertible(adapter, path=src)
    # save_pretrained's layout: ``default`` at the top, any other adapter in a sub-directory
    subdirs = {name: "" if adapter_name is not None or name == DEFAULT_ADAPTER_NAME else name for name in chosen}
    result = ConvertResult(src, out, {n: os.path.join(out, sub) if sub else out for n, sub in subdirs.items()}, base_dir)
    result.findings = wrapped.findings + [f for a in chosen.values() for f in a.findings]
    for target in (out, base_dir):
        if target is not None:
            clean_stale(target)
    with StagedDirectory(out, overwrite=overwrite) as staged, (
        StagedDirectory(base_dir, overwrite=overwrite) if base_dir else contextlib.nullcontext()
    ) as staged_base:
        for name, sub in subdirs.items():
            # an adapter name comes from the file's keys: it must not lead outside the output
            n, b = write_adapter(chosen[name], safe_join(staged.path, sub, what="adapter name") if sub else staged.path)
            result.tensors, result.nbytes = result.tensors + n, result.nbytes + b
        if staged_base is not None:
            n, b = write_base(wrapped, staged_base.path, max_shard_size=max_shard_size)
            result.tensors, result.nbytes = result.tensors + n, result.nbytes + b
        pause_point("files")
        if staged_base is not None:
            staged_base.commit()
        staged.commit()
    return result


def merge_wrapped(
    path: "str | os.PathLike[str]",
    output: "str | os.PathLike[str]",
    *,
    adapter_name: Optional[str] = None,
    alpha: AlphaSpec = None,
    config: ConfigSpec = None,
    allow_pickle: bool = False,
    **merge_options: Any,
) -> Any:
    """Merge one adapter of a wrapped checkpoint into the base it carries; write the plain model.

    A safetensors checkpoint is read in place: the base tensors and the adapter's are read at
    their offsets in the wrapped file(s) under their base and saved names, so the base is written
    once, by :func:`adapterfmt.merging.engine.merge_to_directory`, with its guarantees (PEFT's math, an
    output that appears only when complete). The output is sharded as :func:`write_base` shards
    (``max_shard_size``, default 5GB) and gets the model files found beside the checkpoint
    (:data:`MODEL_FILE_PATTERNS`). A pickle checkpoint's base and adapter are first written to a
    scratch directory beside ``output`` (removed afterwards, and by the next run if this one is
    killed) and merged from there.

    Args:
        path: the wrapped checkpoint.
        output: the merged model directory.
        adapter_name: the adapter to merge (``None``: ``default``, or the only adapter).
        alpha: ``lora_alpha`` of that adapter (or adapter name -> alpha).
        config: a known ``adapter_config.json`` of it (or adapter name -> one).
        allow_pickle: permit a pickle checkpoint.
        merge_options: passed to ``merge_to_directory`` (``dtype``, ``max_shard_size``,
            ``overwrite``, ``verify``, ``progress`` ...).

    Returns:
        The :class:`~adapterfmt.merging.engine.MergeSummary`, its ``adapters`` naming the checkpoint and
        its ``findings`` led by the checkpoint's (``full-copy-unchanged`` ...).

    Raises:
        InvalidConfigError: no alpha and no config (nothing is guessed).
        OutputPathError: ``output`` is not empty or lies inside the checkpoint.
        CheckpointNotFoundError: no such checkpoint or adapter name.
        whatever ``merge_to_directory`` raises.
    """
    from ..merging.engine import merge_to_directory

    src = os.fspath(path)
    out = check_output_path(output, [src], overwrite=bool(merge_options.get("overwrite")))
    wrapped = read_wrapped(src, alpha=alpha, config=config, allow_pickle=allow_pickle)
    if adapter_name is None:
        names = list(wrapped.adapters)
        adapter_name = names[0] if len(names) == 1 else DEFAULT_ADAPTER_NAME
    adapter = _select(wrapped, adapter_name)[adapter_name]
    check_convertible(adapter, path=src)
    if wrapped.tensors_in_memory is None:
        merge_options["max_shard_size"] = merge_options.get("max_shard_size") or DEFAULT_MAX_SHARD_SIZE
        summary = merge_to_directory(_base_in_place(wrapped), adapter, out, side_files=_model_files(wrapped.directory), **merge_options)
        summary.adapters = [f"{src} [{adapter_name}]"]
        summary.findings = wrapped.findings + adapter.findings + list(summary.findings)
        return summary
    scratch = f"{out}-wrapped-inputs"
    clean_stale(scratch)
    with StagedDirectory(scratch) as staged:  # never committed: removed on the way out
        adapter_dir, base_dir = os.path.join(staged.path, "adapter"), os.path.join(staged.path, "base")
        write_adapter(adapter, adapter_dir)
        write_base(wrapped, base_dir)
        summary = merge_to_directory(base_dir, adapter_dir, out, **merge_options)
    summary.adapters = [f"{src} [{adapter_name}]"]
    summary.findings = wrapped.findings + adapter.findings + list(summary.findings)
    return summary


def _model_files(directory: str) -> list[str]:
    """The files beside a wrapped checkpoint that belong to the plain model (:data:`MODEL_FILE_PATTERNS`)."""
    return [n for n in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, n)) and any(fnmatch.fnmatch(n, p) for p in MODEL_FILE_PATTERNS)]


def _base_in_place(wrapped: WrappedCheckpoint) -> BaseModel:
    """The plain base model a safetensors wrapped checkpoint carries, read where it lies: base key
    -> the tensor in the wrapped file, one "shard" per weight file."""
    shard_keys: dict[str, list[str]] = {}
    for key, info in wrapped.base.items():
        shard_keys.setdefault(info.file, []).append(key)
    base = BaseModel(wrapped.directory, dict(wrapped.model_config), dict(wrapped.base), list(shard_keys), shard_keys)
    base.tied = tied_modules(base)
    return base

