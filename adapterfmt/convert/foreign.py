"""Convert between PEFT adapter directories and kohya / diffusers LoRA files (docs/FORMAT.md §10.5, BEHAVIOUR §7.4).

* ``to_peft``: one component of a kohya / diffusers file -> a PEFT adapter directory for that
  component: names resolved against the base (:mod:`.names`), bytes copied unchanged
  (``lora_down`` -> ``lora_A``, ``lora_up`` -> ``lora_B``), config rebuilt (:mod:`.peft_view`).
* ``from_peft``: a PEFT LoRA adapter of one component -> a kohya file (``lora_<component>_<flattened
  path>.lora_down/lora_up/alpha``) or a diffusers file (``<component>.<path>.lora_A/lora_B``
  plus the LoraConfig in ``lora_adapter_metadata``). A kohya file gets ONE alpha for every
  module — diffusers 0.42 drops an attention layer's ``.alpha`` that differs from the file's
  most common one — and each module's own scale is folded into ``lora_up``
  (``up · s·r/α``, in float32, rounded once to ``lora_up``'s dtype); a module whose scale is
  already ``α/r`` keeps its bytes.
Outputs are written beside their final path and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from ..base.reading import BaseModel
from ..checkpoint.finding import Finding
from ..checkpoint.keys import KeyParts, Role, render_saved
from ..constants import ADAPTER_CONFIG_FILE, ADAPTER_SAFETENSORS_FILE, PEFT_PREFIX
from ..errors import InvalidConfigError, UnresolvedModulesError, UnsupportedFeatureError
from ..formats.detect import detect_format, read_foreign
from ..formats.diffusion.components import component_bases, is_pipeline, read_component
from ..formats.diffusion.diffusers_lora import METADATA_KEY
from ..formats.diffusion.kohya import WRITE_PREFIX
from ..formats.diffusion.names import base_module_paths, flatten, resolve_names
from ..formats.diffusion.peft_view import component_adapter, peft_config_document, refuse_unusable
from ..formats.diffusion.records import COMPONENTS, LOHA, LOKR, LORA, ForeignModule
from ..formats.peft.reading import AdapterCheckpoint, read_adapter
from ..storage.safetensors_stream import ShardWriter, TensorSpec
from ..storage.staging import StagedDirectory, StagedFile, check_output_file, check_output_path, clean_stale
from .wrapped import write_safetensors

KOHYA, DIFFUSERS = "kohya", "diffusers"


@dataclass
class ForeignConvertResult:
    """What a conversion wrote."""

    source: str
    output: str
    to: str
    component: str
    modules: int
    tensors: int
    folded: list[str] = field(default_factory=list)  #: modules whose scale went into lora_up
    findings: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "output": self.output, "to": self.to, "component": self.component, "modules": self.modules,
            "tensors": self.tensors, "folded": self.folded, "warnings": [f.as_dict() for f in self.findings],
        }


def _one_base(ckpt_components: list[str], bases: dict[str, BaseModel], source: str) -> tuple[str, BaseModel]:
    if len(bases) != 1:
        raise InvalidConfigError(
            f"adapts {', '.join(ckpt_components)}; a PEFT adapter holds one component", path=source, hint="pass --component NAME"
        )
    return next(iter(bases.items()))


def to_peft(
    source: "str | os.PathLike[str]", output: "str | os.PathLike[str]", *, base: str, component: Optional[str] = None, overwrite: bool = False
) -> ForeignConvertResult:
    """Write one component of a kohya / diffusers LoRA file as a PEFT adapter directory.

    Raises:
        InvalidConfigError: a pipeline base, several components and no ``component``.
        AmbiguousMatchError, UnresolvedModulesError, UnknownKeyError, UnsupportedFeatureError
        (LoHa, LoKr, LoCon Tucker cores, DoRA), InconsistentAdapterError: nothing is written.
    """
    src = os.fspath(source)
    ckpt = read_foreign(src)
    bases = component_bases(ckpt, base, component)
    from ..single_file.checkpoint import SingleFileBase

    if any(isinstance(b, SingleFileBase) for b in bases.values()):
        raise UnsupportedFeatureError(
            "is a single-file checkpoint: convert --base takes a diffusers component or pipeline folder (a PEFT adapter names that model's modules)",
            path=os.fspath(base), hint="merge, check and inspect take the single file (docs/BEHAVIOUR.md §7.6)",
        )
    name, model = _one_base(ckpt.components, bases, src)
    from ..formats.diffusion.components import check_component

    check_component(ckpt, name, model)
    modules = ckpt.component_modules(name)
    if {m.kind for m in modules} == {LOHA}:
        doc, items = _loha_adapter(ckpt, modules, model)
    elif {m.kind for m in modules} == {LOKR}:
        from .lokr_peft import lokr_config

        refuse_unusable(ckpt, modules, lora_only=False)
        targets = peft_config_document(modules, base_modules=base_module_paths(model.tensors))["target_modules"]
        doc = lokr_config(modules, model, targets, ckpt.file)
        items = sorted((f"{PEFT_PREFIX}{m.path}.{slot}", info) for m in modules for slot, info in m.tensors.items())
    else:
        adapter = component_adapter(ckpt, name, base_modules=base_module_paths(model.tensors))
        doc = dict(adapter.config.raw)
        items = sorted(
            (f"{PEFT_PREFIX}{path}.{slot}.weight", m.tensors[slot]) for path, m in adapter.lora.items() for slot in ("lora_A", "lora_B")
        )
        # LyCORIS' output-axis dora_scale (out, 1): PEFT's lora_magnitude_vector (out,), the same bytes (use_dora in the config)
        items = sorted(items + [(render_saved(KeyParts(path, Role.DORA_MAGNITUDE), prefix=PEFT_PREFIX), m.tensors["magnitude"])
                                for path, m in adapter.lora.items() if m.use_dora])
    out = check_output_path(output, [src, model.directory], overwrite=overwrite)
    clean_stale(out)
    with StagedDirectory(out, overwrite=overwrite) as staged:
        write_safetensors(os.path.join(staged.path, ADAPTER_SAFETENSORS_FILE), items)
        with open(os.path.join(staged.path, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
        staged.commit()
    return ForeignConvertResult(src, out, "peft", name, len(modules), len(items), findings=list(ckpt.findings))


#: PEFT's LoHaConfig fields that a kohya / LyCORIS file does not carry (PEFT's defaults; no dropout).
_LOHA_DEFAULTS: dict[str, Any] = {
    "peft_type": "LOHA", "task_type": None, "base_model_name_or_path": None, "revision": None, "inference_mode": True,
    "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, "exclude_modules": None, "layers_to_transform": None,
    "layers_pattern": None, "modules_to_save": None,
}


def _loha_adapter(ckpt: Any, modules: list[ForeignModule], model: BaseModel) -> tuple[dict[str, Any], list]:
    """PEFT LOHA config and tensors: the same factor names and shapes as LyCORIS (``hada_*``).

    PEFT decides Tucker cores per layer from one flag (``use_effective_conv2d``, on every conv
    with a kernel larger than 1x1), so a file that uses cores on some such convs only is refused."""
    refuse_unusable(ckpt, modules, lora_only=False)
    cored = {m.path for m in modules if "hada_t1" in m.tensors}
    big_convs = {m.path for m in modules if len(model.tensors[f"{m.path}.weight"].shape) > 2 and any(k != 1 for k in model.tensors[f"{m.path}.weight"].shape[2:])}
    if cored and cored != big_convs:
        raise UnsupportedFeatureError(
            "LoHa Tucker cores on some convolutions only; PEFT's use_effective_conv2d applies to all of them", path=ckpt.file,
            key=sorted(big_convs ^ cored)[0],
        )
    doc = peft_config_document(modules, base_modules=base_module_paths(model.tensors), peft_type="LOHA")
    lycoris = {**_LOHA_DEFAULTS, "r": doc["r"], "alpha": doc["lora_alpha"], "rank_pattern": doc["rank_pattern"],
               "alpha_pattern": doc["alpha_pattern"], "target_modules": doc["target_modules"], "use_effective_conv2d": bool(cored)}
    items = sorted((f"{PEFT_PREFIX}{m.path}.{slot}", info) for m in modules for slot, info in m.tensors.items())
    return lycoris, items


# ---------------------------------------------------------------------------------------------
# PEFT -> kohya / diffusers
# ---------------------------------------------------------------------------------------------


def _refuse_for_export(adapter: AdapterCheckpoint, source: str) -> None:
    """Only plain LoRA on Linear / Conv layers has a kohya and a diffusers form."""
    cfg = adapter.config
    reasons = []
    if adapter.full_copies or adapter.token_deltas or adapter.base_overrides:
        reasons.append("full copies, trainable tokens and saved base tensors have no kohya/diffusers form")
    if adapter.unknown_keys:
        reasons.append(f"unknown tensor {adapter.unknown_keys[0]!r}")
    if cfg.unsupported:
        reasons.append(f"config field {next(iter(cfg.unsupported))!r}")
    for path, m in adapter.lora.items():
        if m.use_dora or m.lora_bias or m.layer_kind == "embedding" or "lora_A" not in m.tensors or "lora_B" not in m.tensors:
            reasons.append(f"module {path!r} ({'DoRA' if m.use_dora else 'lora_B bias' if m.lora_bias else m.layer_kind})")
            break
    if cfg.fan_in_fan_out:
        reasons.append("fan_in_fan_out (transformers Conv1D) layers")
    if reasons:
        raise UnsupportedFeatureError(f"cannot be written as a kohya/diffusers file: {reasons[0]}", path=source, hint="only LoRA on Linear and Conv layers converts")


def from_peft(
    source: "str | os.PathLike[str]",
    output: "str | os.PathLike[str]",
    *,
    to: str,
    base: str,
    component: str,
    overwrite: bool = False,
) -> ForeignConvertResult:
    """Write a PEFT LoRA adapter of one component as a kohya or diffusers ``.safetensors`` file; with
    ``to="diffusers"`` ``source`` may also be a kohya / ComfyUI / XLabs / diffusers LoRA file
    (:func:`_foreign_component`: fused Flux names split as diffusers' converters split them).

    Args:
        to: ``kohya`` or ``diffusers``.
        base: the component directory (or the pipeline directory holding ``component``).
        component: ``unet``, ``transformer``, ``text_encoder`` or ``text_encoder_2``.

    Raises:
        UnsupportedFeatureError: DoRA, ``lora_bias``, embeddings, full copies, Conv1D layers.
        UnresolvedModulesError: adapter modules with no weight in the base.
        AmbiguousMatchError: a kohya name that would fit two modules of the base.
    """
    if to not in (KOHYA, DIFFUSERS):
        raise InvalidConfigError(f"unknown target format {to!r}", key="to", hint="use kohya or diffusers")
    if component not in COMPONENTS:
        raise InvalidConfigError(f"unknown component {component!r}", key="component", hint=f"use one of {', '.join(COMPONENTS)}")
    src = os.fspath(source)
    from ..formats.peft.lycoris import peft_lycoris_type

    if os.path.isdir(src) and peft_lycoris_type(src):
        return _factors_to_kohya(src, os.fspath(output), to=to, base=base, component=component, overwrite=overwrite)
    if os.path.isfile(src) and detect_format(src) not in ("peft", "wrapped"):  # a kohya / ComfyUI / XLabs / diffusers file: its PEFT records
        adapter, model = _foreign_component(src, to=to, base=base, component=component)
    else:
        adapter = read_adapter(src)
        model = read_component(os.path.join(base, component) if is_pipeline(base) else base)
    _refuse_for_export(adapter, src)
    from ..base.resolution import resolve

    res = resolve(adapter, model)
    if res.unresolved or res.shape_errors:
        raise UnresolvedModulesError(
            f"{len(res.unresolved)} module(s) match no weight of the base, {len(res.shape_errors)} do not fit it",
            path=src, key=(res.unresolved or res.shape_errors)[0], hint="is this the component the adapter was trained on?",
        )
    out = check_output_file(output, [src, model.directory], overwrite=overwrite)
    modules = sorted(adapter.lora.items())
    if to == KOHYA:
        entries, folded = _kohya_entries(modules, component, model, src)
        metadata = {"format": "pt"}
    else:
        entries = [(f"{component}.{p}.lora_{s}.weight", m.tensors[f"lora_{s}"], None) for p, m in modules for s in ("A", "B")]
        folded = []
        doc = {f"{component}.{k}": v for k, v in dict(adapter.config.raw).items()}
        metadata = {"format": "pt", METADATA_KEY: json.dumps(doc, sort_keys=True)}
    write_safetensors_file(out, entries, metadata, overwrite=overwrite)
    return ForeignConvertResult(src, out, to, component, len(modules), len(entries), folded, list(adapter.findings))


def _foreign_component(src: str, *, to: str, base: str, component: str) -> tuple[AdapterCheckpoint, BaseModel]:
    """A foreign LoRA file as the PEFT LoRA records of one component, names resolved against the
    diffusers component directory ``base`` (fused single-file names split by rows as diffusers' own
    converters split them: kohya / ComfyUI Flux, XLabs), for ``--to diffusers``.

    Raises:
        UnsupportedFeatureError: ``--to kohya`` (a file's kohya form is the file, or a renaming this
            does not write), a single-file base, LoHa / LoKr / Tucker cores / ``dora_scale`` / full deltas.
    """
    if to == KOHYA:
        raise UnsupportedFeatureError(
            "is a kohya / ComfyUI / XLabs / diffusers LoRA file; convert --to kohya takes a PEFT LoRA adapter (it names the kohya modules "
            "after the PEFT paths)", path=src, hint="convert it --to peft first, then that directory --to kohya",
        )
    ckpt = read_foreign(src)
    bases = component_bases(ckpt, base, None if len(ckpt.components) == 1 else component)
    from ..single_file.checkpoint import SingleFileBase

    if any(isinstance(b, SingleFileBase) for b in bases.values()):
        raise UnsupportedFeatureError("is a single-file checkpoint: convert --base takes a diffusers component or pipeline folder",
                                      path=base, hint="merge, check and inspect take the single file (docs/BEHAVIOUR.md §7.6)")
    name, model = _one_base(ckpt.components, bases, src)
    from ..formats.diffusion.components import check_component

    check_component(ckpt, name, model)
    return component_adapter(ckpt, name, base_modules=base_module_paths(model.tensors)), model


def _check_round_trip(paths: list[str], component: str, model: BaseModel, src: str) -> None:
    """Every flattened name must resolve back to its own module, or a reader would bind it elsewhere."""
    probes = [ForeignModule(name=flatten(p), component=component, kind=LORA) for p in paths]
    back = resolve_names(probes, base_module_paths(model.tensors), component=component, file=src)
    wrong = [p for p, probe in zip(paths, probes) if probe.path != p]
    if wrong or not back.ok:
        raise UnresolvedModulesError("a kohya name would not resolve back to its module", path=src, key=(wrong or back.unresolved)[0])


def _most_common(values: list[float], default: float) -> float:
    counts = Counter(values)
    return min(counts, key=lambda a: (-counts[a], a)) if counts else default


def _kohya_entries(modules: list, component: str, model: BaseModel, src: str) -> tuple[list, list[str]]:
    """(key, source tensor, replacement value or None) for every tensor of the kohya file."""
    prefix = WRITE_PREFIX[component]
    alpha = _most_common([m.scaling * m.rank for _, m in modules], 1.0)
    _check_round_trip([p for p, _ in modules], component, model, src)
    entries: list = []
    folded = []
    for p, m in modules:
        name = prefix + flatten(p)
        factor = m.scaling * m.rank / alpha
        entries.append((f"{name}.alpha", None, ("scalar", alpha)))
        entries.append((f"{name}.lora_down.weight", m.tensors["lora_A"], None))
        if factor == 1.0:
            entries.append((f"{name}.lora_up.weight", m.tensors["lora_B"], None))
        else:
            entries.append((f"{name}.lora_up.weight", m.tensors["lora_B"], ("scale", factor)))
            folded.append(p)
    return entries, folded


#: The factor a LoHa / LoKr module's scale is folded into (its product is linear in it).
_FOLD_SLOT = {LOHA: ("hada_w1_a",), LOKR: ("lokr_w1", "lokr_w1_a")}


def _factors_to_kohya(src: str, output: str, *, to: str, base: str, component: str, overwrite: bool) -> ForeignConvertResult:
    """A PEFT LOHA / LOKR adapter as a kohya / LyCORIS file: the factors under their own names,
    one alpha for every module, each module's PEFT scale folded into its first factor where the
    LyCORIS scale (``alpha / r``; 1 for a LoKr module with no factored half) differs."""
    from ..formats.peft.lycoris import read_peft_lycoris

    if to != KOHYA:
        raise UnsupportedFeatureError(
            "a PEFT LoHa/LoKr adapter converts to a kohya / LyCORIS file only: diffusers' LoRA format has no LoHa/LoKr form "
            "(load_lora_weights refuses them)", path=src, hint="use --to kohya",
        )
    ckpt = read_peft_lycoris(src)
    refuse_unusable(ckpt, ckpt.modules, lora_only=False)
    from .lokr_peft import refuse_3d_kron

    refuse_3d_kron(ckpt.modules, src)
    kept = [k for c in ckpt.full_copies.values() for k in c.keys.values()] + list(ckpt.base_override_keys.values())
    if kept:
        raise UnsupportedFeatureError(
            "cannot be written as a kohya/diffusers file: full copies (modules_to_save) and saved base tensors have no kohya/diffusers form",
            path=src, key=kept[0], hint="merge the adapter (adapterfmt merge) or load it (adapterfmt.load) instead",
        )
    model = read_component(os.path.join(base, component) if is_pipeline(base) else base)
    for m in ckpt.modules:
        weight = model.tensors.get(f"{m.path}.weight")
        if weight is None or not m.fits(tuple(weight.shape)):
            raise UnresolvedModulesError("matches no weight of the base, or does not fit it", path=src, key=m.path, hint="is this the component the adapter was trained on?")
    modules = sorted(ckpt.modules, key=lambda m: m.path or "")
    _check_round_trip([m.path for m in modules], component, model, src)
    alpha = _most_common([m.scaling * m.rank for m in modules if m.rank], 1.0)
    prefix, entries, folded = WRITE_PREFIX[component], [], []
    for m in modules:
        name = prefix + flatten(m.path)
        factor = m.scaling / (alpha / m.rank if m.rank else 1.0)
        fold = next(s for s in _FOLD_SLOT[m.kind] if s in m.tensors)
        entries.append((f"{name}.alpha", None, ("scalar", alpha)))
        for slot, info in m.tensors.items():
            entries.append((f"{name}.{slot}", info, ("scale", factor) if slot == fold and factor != 1.0 else None))
        if factor != 1.0:
            folded.append(m.path)
    out = check_output_file(output, [src, model.directory], overwrite=overwrite)
    write_safetensors_file(out, entries, {"format": "pt"}, overwrite=overwrite)
    return ForeignConvertResult(src, out, to, component, len(modules), len(entries), folded, list(ckpt.findings))


def write_safetensors_file(out: str, entries: list, metadata: dict[str, str], *, overwrite: bool) -> None:
    """One safetensors file, all or nothing (:class:`~adapterfmt.storage.staging.StagedFile`):
    tensors copied byte for byte, or computed (alpha scalars, folded ups, resized factors).

    ``entries`` are ``(key, source info, change)``; change ``None`` copies, ``("scalar", v)`` writes
    a float32 0-d tensor, ``("scale", f)`` the source times ``f``, ``("tensor", t)`` the tensor ``t``.
    Keys are written in sorted order, as ``safetensors`` writes them.
    """
    import torch

    from ..storage.tensor_source import TensorReader
    from ..storage.torch_io import SAFETENSORS_DTYPES, TORCH_DTYPES, tensor_bytes

    values: dict[str, Any] = {}
    with TensorReader() as reader:
        for key, info, change in entries:
            if change is None:
                continue
            if change[0] == "scalar":
                values[key] = torch.tensor(float(change[1]), dtype=torch.float32)
            elif change[0] == "tensor":  # computed elsewhere (adapterfmt.algebra: resized factors)
                values[key] = change[1].contiguous()
            else:
                t = reader.get(info)
                values[key] = (t.float() * change[1]).to(TORCH_DTYPES[info.dtype]).contiguous()
    ordered = sorted(entries, key=lambda e: e[0])
    specs = [
        TensorSpec(k, SAFETENSORS_DTYPES[values[k].dtype], tuple(values[k].shape)) if k in values else TensorSpec(k, i.dtype, tuple(i.shape))
        for k, i, _ in ordered
    ]
    fds: dict[str, int] = {}
    with StagedFile(out, overwrite=overwrite) as staging:
        writer = ShardWriter(staging.staged, specs, metadata=metadata)
        try:
            for key, info, _ in ordered:
                if key in values:
                    writer.write(key, tensor_bytes(values[key]))
                else:
                    if info.file not in fds:
                        fds[info.file] = os.open(info.file, os.O_RDONLY)
                    writer.copy([key], fds[info.file], info.start)
            writer.close()  # fsyncs the file
        except BaseException:
            writer.abort()
            raise
        finally:
            for fd in fds.values():
                os.close(fd)
        staging.commit()
