"""``resize``: every module's delta truncated by the exact SVD of its factors (BEHAVIOUR §9.1).

Per module: the SVD of ``s·B·A`` from the factors (:mod:`.svd`), the rank a rule keeps
(:func:`adapterfmt.deltas.rank_rules.kept_rank`), factors ``U_k·√S_k`` and ``√S_k·V_kᵀ`` in the
output dtype (``--dtype``: float32 unless asked otherwise), and the error of what is written,
exactly, from the factors. Full copies, trainable tokens and saved
base tensors are carried unchanged; a DoRA module's LoRA part is resized and its magnitude kept.
PEFT directories are written in PEFT's layout (:mod:`.output`), kohya / LyCORIS files as kohya
files (:mod:`.foreign`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..deltas.rank_rules import RankRule, kept_rank
from ..errors import InvalidConfigError
from ..formats.locate import locate_foreign
from ..formats.peft.reading import read_adapter
from ..storage.staging import check_output_path
from ..storage.tensor_source import TensorReader
from ..storage.torch_io import SAFETENSORS_DTYPES
from .modules import exact_svd, read_factors, refuse_unsupported
from .output import DEFAULT_DTYPE, check_dtype, check_scales, numel, output_dtype, scale_one_config, write_peft_directory
from .parallel import map_modules
from .report import AlgebraReport, ModuleRow
from .svd import thread_workspace, unflatten_factors


def resize(
    source: "str | os.PathLike[str]",
    output: "str | os.PathLike[str]",
    *,
    rule: RankRule,
    overwrite: bool = False,
    revision: Optional[str] = None,
    weight_name: Optional[str] = None,
    dtype: str = DEFAULT_DTYPE,
) -> AlgebraReport:
    """Resize an adapter (PEFT directory, Hub id, or kohya / LyCORIS / diffusers LoRA file) to ``rule``.

    ``dtype``: ``fp32`` (default), ``bf16``, ``fp16`` or ``source`` (each module's factors' own
    dtype), the dtype of the new factors; errors are measured as stored.

    Raises:
        InvalidConfigError: ``--rank`` above every module's rank; an unknown ``dtype``; ``source``
            for a module whose ``lora_A`` and ``lora_B`` dtypes differ.
        UnsupportedFeatureError: AdaLoRA, LoHa / LoKr, ``target_parameters``, unknown tensors.
        OutputPathError: the output is an input, or exists and ``overwrite`` is false.
        Nothing is written when anything is refused.
    """
    src = os.fspath(source)
    check_dtype(dtype)
    found = locate_foreign(src, weight_name=weight_name, revision=revision, download=True)
    if found is not None and found.format != "peft":
        from .foreign import resize_foreign  # a kohya / diffusers file: its writer is imported only then

        return resize_foreign(found, os.fspath(output), rule=rule, overwrite=overwrite, shown=src, dtype=dtype)
    ckpt = read_adapter(src, revision=revision)
    refuse_unsupported(ckpt, src)
    if not ckpt.lora:
        raise InvalidConfigError("holds no LoRA module to resize", path=src)
    top = max(m.rank or 0 for m in ckpt.lora.values())
    if rule.kind == "rank" and rule.value > top:
        raise InvalidConfigError(
            f"--rank {int(rule.value)} is above the adapter's largest rank {top}", path=src, key="rank",
            hint="resize only lowers ranks; pick a rank up to that",
        )
    check_output_path(os.fspath(output), [ckpt.directory], overwrite=overwrite)  # before the work, not after
    report = AlgebraReport("resize", "", "peft", [{"path": src, "weight": 1.0}], {**rule.as_dict(), "dtype": dtype})
    tensors: dict[str, Any] = dict(ckpt.tensor_infos())
    ranks: dict[str, int] = {}
    with TensorReader(ckpt.tensors_in_memory) as reader:

        def one(item: tuple[str, Any]) -> tuple[str, Any, dict[str, Any], ModuleRow]:
            path, m = item
            ws = thread_workspace()
            b2, a2, b_shape, a_shape = read_factors(reader, m, ws)
            out_dtype = output_dtype(dtype, (b2.dtype, a2.dtype), path=m.tensors["lora_A"].file, key=path)
            f = exact_svd(b2, a2, m.scaling, m.tensors["lora_A"].file, m.keys["lora_A"], m.keys["lora_B"], ws)
            k = kept_rank(f.singular_values, rule)
            nb, na, err = f.truncate(k, out_dtype, ws)
            out_b, out_a = unflatten_factors(nb, na, b_shape, a_shape)
            new = {m.keys["lora_B"]: out_b, m.keys["lora_A"]: out_a}
            if m.lora_bias:  # the bias is scaled with the factors; the new scale is 1
                bias = reader.get(m.tensors["lora_B.bias"])
                new[m.keys["lora_B.bias"]] = (bias.to(torch.float64) * m.scaling).to(out_dtype)
            row = ModuleRow(path, m.layer_kind, int(m.rank or a2.shape[0]), k, f.retained_energy(k), err, f.energy**0.5, dora=m.use_dora,
                            dtype=SAFETENSORS_DTYPES[out_dtype])
            return path, k, new, row

        for path, k, new, row in map_modules(one, sorted(ckpt.lora.items())):
            tensors.update(new)
            ranks[path] = k
            report.rows.append(row)
    replaced = {m.keys[s] for m in ckpt.lora.values() for s in ("lora_A", "lora_B", "lora_B.bias") if s in m.keys}
    report.carried = sorted(k for k in tensors if k not in replaced and not _is_magnitude(ckpt, k))
    report.params_before = sum(i.numel for i in ckpt.tensor_infos().values())
    report.params_after = sum(numel(t) for t in tensors.values())
    doc = scale_one_config(ckpt.config.raw, ranks)
    check_scales(doc, ranks, src)
    if any(r.dora for r in report.rows):
        report.notes.append("DoRA modules: the LoRA part is resized and the magnitude vector kept; the error is that of the LoRA part")
    if ckpt.sub_adapters:
        report.notes.append(f"sub-adapters {ckpt.sub_adapters} are not part of the output; resize each on its own")
    report.notes.append("every module's scale is folded into its factors: lora_alpha = r per module, use_rslora false")
    report.output = write_peft_directory(
        os.fspath(output), inputs=[ckpt.directory], overwrite=overwrite, config=doc, tensors=tensors, in_memory=ckpt.tensors_in_memory,
    )
    return report


def _is_magnitude(ckpt: Any, key: str) -> bool:
    return any(m.keys.get("magnitude") == key for m in ckpt.lora.values())
