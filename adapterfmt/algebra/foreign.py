"""``resize`` of kohya / LyCORIS and diffusers LoRA files, written back in their own format.

The file keeps every key: each module's ``lora_down`` / ``lora_up`` (diffusers: ``lora_A`` /
``lora_B``) is replaced by the resized factors, which carry the module's whole delta, so its
scale becomes 1: a kohya module's ``alpha`` becomes its new rank (a module without one already
had scale 1), and a diffusers file's ``lora_adapter_metadata`` gets each component's ``r`` /
``lora_alpha`` / patterns as in a PEFT config. ``dora_scale`` and every other tensor is copied
unchanged. Written by :mod:`adapterfmt.convert.foreign`'s one-file writer (temporary file
beside the output, fsync, rename). LoHa / LoKr modules and LoCon Tucker cores are refused.
"""

from __future__ import annotations

import json
from typing import Any

from ..convert.foreign import write_safetensors_file
from ..deltas.rank_rules import RankRule, kept_rank
from ..errors import InvalidConfigError, UnsupportedFeatureError
from ..formats.diffusion.diffusers_lora import METADATA_KEY
from ..formats.diffusion.records import LORA
from ..formats.locate import ForeignSource
from ..storage.staging import check_output_file
from ..storage.tensor_source import TensorReader
from ..storage.torch_io import SAFETENSORS_DTYPES
from .modules import check_factors, exact_svd
from .output import DEFAULT_DTYPE, check_dtype, check_scales, output_dtype, scale_one_config
from .parallel import map_modules
from .report import AlgebraReport, ModuleRow
from .svd import flatten_factors, thread_workspace, unflatten_factors


def resize_foreign(found: ForeignSource, output: str, *, rule: RankRule, overwrite: bool, shown: str, dtype: str = DEFAULT_DTYPE) -> AlgebraReport:
    """Resize every LoRA module of a kohya / diffusers file; the output is one ``.safetensors`` file
    whose new factors (and scaled ``lora_up`` biases) are in ``dtype`` (see :func:`.resize.resize`)."""
    check_dtype(dtype)
    ckpt = found.read()
    if ckpt.unknown_keys:
        raise UnsupportedFeatureError("holds a tensor adapterfmt does not understand", path=ckpt.file, key=ckpt.unknown_keys[0])
    for m in ckpt.modules:
        if m.kind != LORA or "lora_mid" in m.tensors or not m.complete:
            what = "a LoCon Tucker core (lora_mid)" if m.kind == LORA and m.complete else f"a {m.kind} module" if m.kind != LORA else m.problem
            raise UnsupportedFeatureError(f"module is {what}; resize takes LoRA / LoCon factors", path=ckpt.file, key=m.keys[next(iter(m.keys))])
    if not ckpt.modules:
        raise InvalidConfigError("holds no LoRA module to resize", path=ckpt.file)
    top = max(m.rank or 0 for m in ckpt.modules)
    if rule.kind == "rank" and rule.value > top:
        raise InvalidConfigError(f"--rank {int(rule.value)} is above the file's largest rank {top}", path=ckpt.file, key="rank",
                                 hint="resize only lowers ranks; pick a rank up to that")
    out = check_output_file(output, [found.path], overwrite=overwrite)  # before the work, not after
    report = AlgebraReport("resize", "", ckpt.format, [{"path": shown, "weight": 1.0}], {**rule.as_dict(), "dtype": dtype})
    changes: dict[str, Any] = {}
    ranks: dict[str, dict[str, int]] = {}  # component -> module name -> rank (diffusers metadata)
    with TensorReader() as reader:

        def one(m: Any) -> tuple[Any, int, dict[str, Any], ModuleRow]:
            ws = thread_workspace()
            i_down, i_up = m.tensors["lora_down"], m.tensors["lora_up"]
            down = reader.read(i_down, into=ws.raw("read.A", i_down.nbytes) if i_down.start >= 0 else None)
            up = reader.read(i_up, into=ws.raw("read.B", i_up.nbytes) if i_up.start >= 0 else None)
            check_factors(up, down, i_down.file, m.keys["lora_down"], m.keys["lora_up"])
            b2, a2 = flatten_factors(up, down)
            label = f"{m.component}.{m.name}" if m.component else m.name
            out_dtype = output_dtype(dtype, (b2.dtype, a2.dtype), path=i_down.file, key=m.keys["lora_down"])
            f = exact_svd(b2, a2, m.scaling, i_down.file, m.keys["lora_down"], m.keys["lora_up"], ws)
            k = kept_rank(f.singular_values, rule)
            nb, na, err = f.truncate(k, out_dtype, ws)
            out_up, out_down = unflatten_factors(nb, na, tuple(up.shape), tuple(down.shape))
            row = ModuleRow(label, m.layer_kind or "linear", int(m.rank or a2.shape[0]), k, f.retained_energy(k), err, f.energy**0.5,
                            dora=m.dora_scale is not None or "magnitude" in m.tensors, dtype=SAFETENSORS_DTYPES[out_dtype])
            new = {m.keys["lora_up"]: ("tensor", out_up), m.keys["lora_down"]: ("tensor", out_down)}
            if "lora_up.bias" in m.tensors:  # scaled with the factors; the new scale is 1
                bias = reader.get(m.tensors["lora_up.bias"])
                new[m.keys["lora_up.bias"]] = ("tensor", (bias.double() * m.scaling).to(out_dtype))
            return m, k, new, row

        for m, k, new, row in map_modules(one, ckpt.modules):
            changes.update(new)
            if m.alpha_key is not None:
                changes[m.alpha_key] = ("scalar", float(k))
            ranks.setdefault(m.component or "", {})[m.name] = k
            report.rows.append(row)
    metadata = dict(ckpt.metadata) or {"format": "pt"}
    if ckpt.format == "diffusers" and metadata.get(METADATA_KEY):
        metadata[METADATA_KEY] = _diffusers_metadata(metadata[METADATA_KEY], ranks, ckpt.file)
    entries = [(key, info, changes.get(key)) for key, info in ckpt.file_tensors.items()]
    replaced = set(changes)
    report.carried = sorted(k for k in ckpt.file_tensors if k not in replaced and not _module_key(ckpt, k))
    report.params_before = sum(i.numel for i in ckpt.file_tensors.values())
    report.params_after = sum(int(c[1].numel()) if c and c[0] == "tensor" else i.numel for _, i, c in entries)
    if any(r.dora for r in report.rows):
        report.notes.append("DoRA (dora_scale) modules: the LoRA part is resized and dora_scale kept; the error is that of the LoRA part")
    report.notes.append("every module's scale is folded into its factors: alpha = new rank (scale 1)")
    write_safetensors_file(out, entries, metadata, overwrite=overwrite)
    report.output = out
    return report


def _module_key(ckpt: Any, key: str) -> bool:
    """Whether ``key`` is a module's ``dora_scale`` / ``magnitude`` (kept as part of its module, not a carried extra)."""
    return any((m.dora_scale is not None and m.dora_scale.key == key) or m.keys.get("magnitude") == key for m in ckpt.modules)


def _diffusers_metadata(raw: str, ranks: dict[str, dict[str, int]], path: str) -> str:
    """``lora_adapter_metadata`` with each component's config set for the new ranks and scale 1."""
    doc = json.loads(raw)
    out: dict[str, Any] = {k: v for k, v in doc.items() if str(k).partition(".")[0] not in ranks}
    for component, modules in ranks.items():
        fields = {str(k).partition(".")[2]: v for k, v in doc.items() if str(k).partition(".")[0] == component}
        if not fields:
            continue  # no config for this component: its scale was 1 and stays 1
        new = scale_one_config(fields, modules)
        check_scales({**new, "peft_type": "LORA"}, modules, path)
        out.update({f"{component}.{k}": v for k, v in new.items()})
    return json.dumps(out, sort_keys=True)
