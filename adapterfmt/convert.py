"""Wrapped state dict <-> PEFT's saved layout.

* :func:`convert_wrapped` writes what ``PeftModel.save_pretrained`` would have written for a
  wrapped checkpoint (:mod:`adapterfmt.wrapped`): ``adapter_config.json`` rebuilt from the
  tensors plus the caller's alpha or config, and ``adapter_model.safetensors`` with saved names
  (adapter name and wrapper infixes removed, full copies under the module's own key). With
  ``base_out`` it also writes the plain base model the file carries.
* :func:`merge_wrapped` produces the merged plain model from such a checkpoint, through the merge
  engine (:func:`adapterfmt.merging.merge_to_directory`).
* :func:`wrapped_names` is the reverse mapping: adapter(s) + base keys -> the exact names of the
  wrapped model's ``state_dict()`` in memory.

Outputs are built in a temporary directory beside the target and renamed into place when
complete; an existing non-empty output is refused. Tensor bytes are copied unchanged (same dtype).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

from .constants import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_SAFETENSORS_FILE,
    DEFAULT_ADAPTER_NAME,
    DTYPE_BITS,
    PEFT_PREFIX,
    SAFETENSORS_INDEX_FILE,
    SAFETENSORS_WEIGHTS_FILE_PATTERN,
)
from .describe import AdapterCheckpoint
from .errors import (
    CheckpointNotFoundError,
    InconsistentAdapterError,
    InvalidConfigError,
    OutputPathError,
    UnknownKeyError,
    UnsupportedFeatureError,
)
from .findings import Finding
from .header import TensorInfo
from .keys import KeyParts, Role, parse_saved, parse_wrapped, render_saved, render_wrapped
from .wrapped import AlphaSpec, ConfigSpec, WrappedCheckpoint, read_wrapped

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
# OUTPUT DIRECTORIES
# ---------------------------------------------------------------------------------------------


def check_output(output: "str | os.PathLike[str]", *, inputs: Sequence[str] = ()) -> str:
    """Refuse an output directory that is not empty, or that is or lies inside an input.

    Paths are compared resolved (``realpath``), so relative and symlinked spellings are caught.

    Raises:
        OutputPathError: the output exists and is a non-empty directory or a file, or is inside
            (or equal to) an input directory or file.
    """
    out = os.fspath(output)
    real = os.path.realpath(out)
    for src in inputs:
        src_real = os.path.realpath(src)
        if real == src_real or (os.path.isdir(src_real) and os.path.commonpath([real, src_real]) == src_real):
            raise OutputPathError("is inside the input checkpoint", path=out, key=None, hint=f"choose a directory outside {src}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise OutputPathError(
            "already exists and is not an empty directory", path=out, hint="choose a new directory or empty this one"
        )
    return out


@contextlib.contextmanager
def staged_directory(output: str) -> Iterator[str]:
    """A temporary directory beside ``output``, renamed to ``output`` when the block succeeds.

    Whatever is left of it (an exception, a crash before the rename) is removed, so ``output``
    either holds the complete result or does not exist.
    """
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(output):
            os.rmdir(output)  # empty (check_output): replace it
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        UnsupportedFeatureError: trainable-token rows without their indices.
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


def write_adapter(adapter: AdapterCheckpoint, directory: str, reader: Any) -> tuple[int, int]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of one adapter into ``directory``.

    Args:
        adapter: an adapter of a :class:`WrappedCheckpoint` (its config is the rebuilt document).
        reader: a :class:`~adapterfmt.torch_io.TensorReader` over the checkpoint.

    Returns:
        ``(tensors, bytes)`` written.
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {saved_key(info): reader.get(info).contiguous().clone() for info in adapter.tensor_infos().values()}
    save_file(tensors, os.path.join(directory, ADAPTER_SAFETENSORS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(adapter.config.raw), f, indent=2, sort_keys=True)
        f.write("\n")
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def write_base(
    wrapped: WrappedCheckpoint, directory: str, reader: Any, *, max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE
) -> tuple[int, int]:
    """Write the plain base model the checkpoint carries (base names, bytes unchanged) into ``directory``.

    Shards are planned with huggingface_hub's ``split_state_dict_into_shards_factory`` from the
    header sizes, then written one shard at a time with ``safetensors.torch.save_file``; an index
    is written when there is more than one. The model files found beside the checkpoint's weights
    (:data:`MODEL_FILE_PATTERNS`: ``config.json``, tokenizer files, ...) are copied.

    Returns:
        ``(tensors, bytes)`` written.
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    split = split_state_dict_into_shards_factory(
        dict(wrapped.base),
        get_storage_size=_nbytes,
        filename_pattern=SAFETENSORS_WEIGHTS_FILE_PATTERN,
        max_shard_size=max_shard_size,
    )
    for filename, keys in split.filename_to_tensors.items():
        # clone: a pickle may hold tied tensors sharing storage, which save_file refuses
        shard = {k: reader.get(wrapped.base[k]).contiguous().clone() for k in keys}
        save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
        del shard
    nbytes = sum(_nbytes(i) for i in wrapped.base.values())
    if split.is_sharded:
        index = {"metadata": {"total_size": nbytes}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        with open(os.path.join(directory, SAFETENSORS_INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    for name in sorted(os.listdir(wrapped.directory)):
        src = os.path.join(wrapped.directory, name)
        if os.path.isfile(src) and any(fnmatch.fnmatch(name, p) for p in MODEL_FILE_PATTERNS):
            shutil.copyfile(src, os.path.join(directory, name))
    return len(wrapped.base), nbytes


def _nbytes(info: TensorInfo) -> int:
    """Size from dtype and shape (a pickle's tensors have no byte range)."""
    return info.numel * DTYPE_BITS[info.dtype] // 8


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
) -> ConvertResult:
    """Write a wrapped checkpoint in PEFT's saved adapter layout (and optionally its base model).

    Args:
        path: the wrapped checkpoint (see :func:`~adapterfmt.wrapped.read_wrapped`).
        output: the adapter directory to create (must not exist, or be empty).
        adapter_name: the one adapter to write, at the top of ``output``. ``None`` writes every
            adapter as ``save_pretrained`` does: ``default`` at the top, any other ``X`` in ``output/X``.
        alpha: ``lora_alpha`` (one value, or adapter name -> value).
        config: a known ``adapter_config.json`` (one, or adapter name -> one); its alpha,
            alpha_pattern, rsLoRA, task type and token indices are used, the rest comes from the tensors.
        base_out: also write the plain base model here.
        allow_pickle: permit a pickle checkpoint (``torch.load(weights_only=True)``).
        max_shard_size: shard size of ``base_out``.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        InvalidConfigError: no alpha and no config for an adapter written (nothing is guessed).
        OutputPathError: an output is not empty, or lies inside the checkpoint.
        CheckpointNotFoundError: no such checkpoint or adapter name.
        InconsistentAdapterError / UnknownKeyError / UnsupportedFeatureError: see :func:`check_convertible`.
    """
    from .torch_io import TensorReader

    src = os.fspath(path)
    out = check_output(output, inputs=[src])
    base_dir = None if base_out is None else check_output(base_out, inputs=[src])
    if base_dir is not None and os.path.realpath(base_dir) == os.path.realpath(out):
        raise OutputPathError("is also the adapter output", path=base_dir, hint="give --base-out its own directory")
    wrapped = read_wrapped(src, alpha=alpha, config=config, allow_pickle=allow_pickle)
    chosen = _select(wrapped, adapter_name)
    for adapter in chosen.values():
        check_convertible(adapter, path=src)
    layout = {
        name: "" if adapter_name is not None or name == DEFAULT_ADAPTER_NAME else name for name in chosen
    }
    result = ConvertResult(src, out, {n: os.path.join(out, sub) if sub else out for n, sub in layout.items()}, base_dir)
    result.findings = wrapped.findings + [f for a in chosen.values() for f in a.findings]
    with TensorReader(wrapped.tensors_in_memory) as reader, contextlib.ExitStack() as stack:
        tmp = stack.enter_context(staged_directory(out))
        base_tmp = stack.enter_context(staged_directory(base_dir)) if base_dir is not None else None
        for name, sub in layout.items():
            n, b = write_adapter(chosen[name], os.path.join(tmp, sub) if sub else tmp, reader)
            result.tensors, result.nbytes = result.tensors + n, result.nbytes + b
        if base_tmp is not None:
            n, b = write_base(wrapped, base_tmp, reader, max_shard_size=max_shard_size)
            result.tensors, result.nbytes = result.tensors + n, result.nbytes + b
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

    The base and the adapter are first written to a temporary directory beside ``output``
    (exactly as :func:`convert_wrapped` with ``base_out``), then merged by
    :func:`adapterfmt.merging.merge_to_directory`, which keeps its guarantees (exact math,
    atomic output).

    Args:
        adapter_name: the adapter to merge (``None``: ``default``, or the only adapter).
        merge_options: passed to ``merge_to_directory`` (``dtype``, ``max_shard_size``, ...).

    Returns:
        What ``merge_to_directory`` returns.

    Raises:
        InvalidConfigError: no alpha and no config.
        OutputPathError: ``output`` is not empty or lies inside the checkpoint.
    """
    from .merging import merge_to_directory

    src = os.fspath(path)
    out = check_output(output, inputs=[src])
    if adapter_name is None:
        from .wrapped import read_wrapped as _read

        names = list(_read(src, allow_pickle=allow_pickle, compare_copies=False).adapters)
        adapter_name = DEFAULT_ADAPTER_NAME if DEFAULT_ADAPTER_NAME in names or len(names) != 1 else names[0]
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapterfmt-wrapped-", dir=parent) as tmp:
        adapter_dir, base_dir = os.path.join(tmp, "adapter"), os.path.join(tmp, "base")
        convert_wrapped(
            src, adapter_dir, adapter_name=adapter_name, alpha=alpha, config=config, base_out=base_dir, allow_pickle=allow_pickle
        )
        return merge_to_directory(base_dir, adapter_dir, out, **merge_options)


# ---------------------------------------------------------------------------------------------
# THE REVERSE MAPPING
# ---------------------------------------------------------------------------------------------


class WrappedSource(NamedTuple):
    """Where the value of one in-memory tensor comes from: ``kind`` ``base`` (a base key) or
    ``adapter`` (a saved key of adapter ``adapter``)."""

    kind: str
    key: str
    adapter: Optional[str] = None


def wrapped_names(
    adapter: "AdapterCheckpoint | Mapping[str, AdapterCheckpoint]",
    base_keys: Sequence[str],
    *,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    prefix: str = PEFT_PREFIX,
) -> dict[str, WrappedSource]:
    """The exact ``state_dict()`` names of the wrapped model PEFT builds from a base and adapter(s).

    A LoRA target's own tensors move under ``base_layer``; a full copy's under
    ``original_module`` plus one ``modules_to_save.<name>`` copy per adapter that saves it; a
    trainable-token embedding's under ``token_adapter.base_layer``; every other base key stays.
    The adapter tensors follow, with their adapter name.

    Args:
        adapter: one adapter (named ``adapter_name``), or adapter name -> adapter.
        base_keys: the base model's ``state_dict()`` keys (no prefix).
        prefix: ``base_model.model.`` (a ``PeftModel``) or ``""`` (``inject_adapter_in_model``).

    Returns:
        wrapped name -> :class:`WrappedSource`, base-derived names in ``base_keys`` order first.
        A full copy's parameter missing from the adapter file comes from the base (PEFT copies
        the original module); a base tensor the adapter saves (``base_layer`` of a full
        embedding, ``bias="all"``) comes from the adapter.
    """
    adapters = dict(adapter) if isinstance(adapter, Mapping) else {adapter_name: adapter}
    lora = {m for a in adapters.values() for m in a.lora}
    copies = {m for a in adapters.values() for m in a.full_copies}
    tokens = {m for a in adapters.values() for m in a.token_deltas}
    owners = sorted(lora | copies | tokens, key=len, reverse=True)
    overrides = {k: (n, a.base_override_keys[k]) for n, a in adapters.items() for k in a.base_overrides}

    out: dict[str, WrappedSource] = {}

    def base_source(key: str) -> WrappedSource:
        if key in overrides:
            name, saved = overrides[key]
            return WrappedSource("adapter", saved, name)
        return WrappedSource("base", key)

    for key in base_keys:
        owner = next((m for m in owners if key.startswith(m + ".")), None)
        if owner is None:
            out[prefix + key] = base_source(key)
            continue
        param = key[len(owner) + 1 :]
        if owner in copies:
            out[render_wrapped(KeyParts(owner, Role.ORIGINAL, param), prefix=prefix)] = base_source(key)
            for name, a in adapters.items():
                copy = a.full_copies.get(owner)
                if copy is not None:
                    src = WrappedSource("adapter", copy.keys[param], name) if param in copy.keys else WrappedSource("base", key)
                    out[render_wrapped(KeyParts(owner, Role.FULL_COPY, param), adapter=name, prefix=prefix)] = src
        else:
            role = Role.BASE_LAYER if owner in lora else Role.TOKENS_BASE
            out[render_wrapped(KeyParts(owner, role, param), prefix=prefix)] = base_source(key)
    for name, a in adapters.items():
        saved = [k for m in a.lora.values() for k in m.keys.values()] + [d.key for d in a.token_deltas.values()]
        for key in saved:
            out[render_wrapped(parse_saved(key), adapter=name, prefix=prefix)] = WrappedSource("adapter", key, name)
    return out
