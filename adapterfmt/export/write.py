"""The exported tensors, and the PEFT directory an engine reads.

:func:`exported_tensors` yields each kept module's factors as the engine must read them: the
scale folded into ``lora_B`` (a power of two in the stored dtype, bit-exact; any other factor in
float32, stored as float32), lower ranks zero-padded where the engine wants one rank (exact).
:func:`write_peft_dir` writes ``adapter_config.json`` and ``adapter_model.safetensors`` through a
staging directory (all or nothing). Keys are PEFT's saved keys, rendered by ``checkpoint/keys.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import torch

from ..checkpoint.keys import parse_saved, render_saved
from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, PEFT_PREFIX
from ..storage.staging import StagedDirectory, check_output_path, clean_stale, write_text
from ..storage.tensor_source import TensorReader
from .plan import FOLD, ExportPlan, ModuleExport


def _fold(t: torch.Tensor, e: ModuleExport) -> torch.Tensor:
    if e.action != FOLD:
        return t
    if e.exact:  # a power of two: exact in the stored dtype (only the exponent moves)
        return (t.float() * e.factor).to(t.dtype)
    return t.float() * e.factor


def _pad(t: torch.Tensor, e: ModuleExport, slot: str) -> torch.Tensor:
    if e.pad_to is None or e.pad_to == e.rank:
        return t
    extra = e.pad_to - e.rank
    if slot == "lora_A":  # (r, in...) -> (R, in...)
        return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))], dim=0)
    return torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)  # lora_B (out, r, ...)


def exported_tensors(plan: ExportPlan, reader: TensorReader) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(module, slot, tensor)`` for every kept module's ``lora_A`` and ``lora_B``, as the engine
    must read them (folded, padded), in module order."""
    adapter = plan.adapter
    for e in sorted(plan.kept, key=lambda e: e.path):
        m = adapter.lora[e.path]
        for slot in ("lora_A", "lora_B"):
            t = reader.get(m.tensors[slot])
            if slot == "lora_B":
                t = _fold(t, e)
            yield e.path, slot, _pad(t, e, slot).contiguous()


def saved_key(key: str) -> str:
    """The saved key with PEFT's ``base_model.model.`` prefix (every engine reads that spelling)."""
    return render_saved(parse_saved(key), prefix=PEFT_PREFIX)


def peft_state_dict(plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The exported adapter's tensors by saved key (kept LoRA factors and served full copies)."""
    adapter = plan.adapter
    out: dict[str, torch.Tensor] = {}
    with TensorReader(adapter.tensors_in_memory) as reader:
        for path, slot, t in exported_tensors(plan, reader):
            out[saved_key(adapter.lora[path].keys[slot])] = t
        for path, copy in adapter.full_copies.items():
            if path not in plan.baked_full_copies:
                for param, info in copy.tensors.items():
                    out[saved_key(copy.keys[param])] = reader.get(info).contiguous()
    return out


def write_peft_dir(plan: ExportPlan, out: str, *, overwrite: bool = False) -> list[str]:
    """Write the exported adapter as a PEFT directory at ``out`` (staged, renamed into place).

    Returns the files written (names inside ``out``).
    """
    from safetensors.torch import save_file

    clean_stale(out)
    target = check_output_path(out, [plan.adapter.directory], overwrite=overwrite)
    tensors = peft_state_dict(plan)
    with StagedDirectory(target, overwrite=overwrite) as staging:
        save_file(tensors, os.path.join(staging.path, ADAPTER_SAFETENSORS_FILE), metadata={"format": "pt"})
        write_text(os.path.join(staging.path, ADAPTER_CONFIG_FILE), json.dumps(_jsonable(plan.config), indent=2, sort_keys=True) + "\n")
        staging.commit()
    return [ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE]


def _jsonable(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _jsonable(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_jsonable(v) for v in doc]
    return doc
