"""Writing a resized or combined adapter: PEFT's directory layout, through the one staging rule.

Every output module carries its whole delta in its factors, so its PEFT scale is 1: ``lora_alpha
= r`` for the most common rank, and ``rank_pattern`` / ``alpha_pattern`` entries (``^``-anchored,
escaped full module paths, which PEFT's ``get_pattern_key`` matches exactly and nothing else)
for the modules whose rank differs; ``use_rslora`` is false. The written config is read back with
the library's own pattern rules and every module's rank and scale checked before the rename.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..checkpoint.config import parse_config
from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE
from ..errors import InconsistentAdapterError, InvalidConfigError
from ..storage.header import TensorInfo
from ..storage.safetensors_stream import ShardWriter, TensorSpec
from ..storage.staging import StagedDirectory, check_output_path, clean_stale
from ..storage.tensor_source import TensorReader
from ..storage.torch_io import SAFETENSORS_DTYPES, tensor_bytes

#: An output tensor: computed, or copied unchanged from a source (its :class:`TensorInfo`).
Item = Union[torch.Tensor, TensorInfo]

#: ``--dtype``: the dtype of every tensor resize / combine compute (factors, a scaled ``lora_B``
#: bias); ``source`` keeps the dtype of the module's source factors. Copied tensors keep theirs.
OUTPUT_DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "source": None}

#: The default: float32, as PEFT's ``add_weighted_adapter`` and kohya's ``resize_lora.py`` write.
DEFAULT_DTYPE = "fp32"


def check_dtype(option: str) -> None:
    """Refuse an unknown ``--dtype`` before anything is read.

    Raises:
        InvalidConfigError: not one of :data:`OUTPUT_DTYPES`.
    """
    if option not in OUTPUT_DTYPES:
        raise InvalidConfigError(f"unknown --dtype {option!r}", key="dtype", hint=f"use one of {', '.join(OUTPUT_DTYPES)}")


def output_dtype(option: str, sources: Iterable[torch.dtype], *, path: str, key: str) -> torch.dtype:
    """The dtype a module's computed tensors are written in: ``option``'s, or for ``source`` the
    one dtype of the module's source factors (``sources``).

    Raises:
        InvalidConfigError: ``source`` with factors of more than one dtype (no dtype to keep).
    """
    chosen = OUTPUT_DTYPES[option]
    if chosen is not None:
        return chosen
    found = set(sources)
    if len(found) != 1:
        names = ", ".join(sorted(SAFETENSORS_DTYPES[d] for d in found))
        raise InvalidConfigError(f"--dtype source is ambiguous: the module's source factors are {names}", path=path, key=key,
                                 hint="pass --dtype fp32, bf16 or fp16")
    return found.pop()


def numel(t: Item) -> int:
    """Elements of a computed or copied output tensor."""
    return t.numel if isinstance(t, TensorInfo) else int(t.numel())


def pattern_key(module: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that matches exactly ``module`` under PEFT's
    ``re.match(rf"(.*\\.)?({key})$", name)``."""
    return "^" + re.escape(module)


def scale_one_config(doc: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, Any]:
    """``doc`` with ``r`` / ``lora_alpha`` / patterns set so every module has rank ``ranks[m]`` and scale 1."""
    counts = Counter(ranks.values())
    r = min(counts, key=lambda k: (-counts[k], k)) if counts else int(doc.get("r", 8))
    out = dict(doc)
    out["r"] = r
    out["lora_alpha"] = r
    out["use_rslora"] = False
    out["rank_pattern"] = {pattern_key(m): k for m, k in sorted(ranks.items()) if k != r}
    out["alpha_pattern"] = {pattern_key(m): k for m, k in sorted(ranks.items()) if k != r}
    return out


def check_scales(doc: Mapping[str, Any], ranks: Mapping[str, int], path: str) -> None:
    """Read ``doc`` back as PEFT would and refuse it unless every module gets its rank and scale 1."""
    cfg = parse_config(json.loads(json.dumps(doc, sort_keys=True)), path=path)  # sort_keys: the order PEFT reads back
    for module, k in ranks.items():
        if cfg.rank_for(module) != k or abs(cfg.scaling_for(module, k) - 1.0) > 1e-12:
            raise InconsistentAdapterError(
                f"the written config would give module rank {cfg.rank_for(module)} / scale {cfg.scaling_for(module, k)}, not {k} / 1",
                path=path, key=module, hint="this is a bug in adapterfmt; please report it",
            )


def write_peft_directory(
    output: str,
    *,
    inputs: Sequence[str],
    overwrite: bool,
    config: Mapping[str, Any],
    tensors: Mapping[str, Item],
    in_memory: Optional[Mapping[str, Any]] = None,
) -> str:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (keys sorted) to ``output``,
    all or nothing. Copied tensors go file to file unchanged; ``in_memory`` holds a ``.bin``
    source's tensors by key. Returns the absolute output path."""
    out = check_output_path(output, list(inputs), overwrite=overwrite)
    clean_stale(out)
    keys = sorted(tensors)
    specs = []
    for key in keys:
        t = tensors[key]
        if isinstance(t, TensorInfo):
            specs.append(TensorSpec(key, t.dtype, tuple(t.shape)))
        else:
            specs.append(TensorSpec(key, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)))
    with StagedDirectory(out, overwrite=overwrite) as staged, TensorReader(in_memory) as reader:
        writer = ShardWriter(os.path.join(staged.path, ADAPTER_SAFETENSORS_FILE), specs, metadata={"format": "pt"})
        try:
            for key in keys:
                t = tensors[key]
                if isinstance(t, TensorInfo):
                    if t.start >= 0:
                        writer.copy([key], reader.fd(t.file), t.start)
                    else:
                        writer.write(key, tensor_bytes(reader.get(t).contiguous()))
                else:
                    writer.write(key, tensor_bytes(t.contiguous()))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        with open(os.path.join(staged.path, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(dict(config), f, indent=2, sort_keys=True)
        staged.commit()
    return out
