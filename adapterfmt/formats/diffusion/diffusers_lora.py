"""The diffusers LoRA file grammar (``pytorch_lora_weights.safetensors``, docs/FORMAT.md §10.2).

``<component>.<PEFT saved key without base_model.model.>``: ``unet.``, ``transformer.``,
``text_encoder.`` or ``text_encoder_2.`` followed by ``X.lora_A.weight`` / ``X.lora_B.weight``
(PEFT's grammar, parsed by :func:`adapterfmt.checkpoint.keys.parse_saved`), optionally ``X.alpha`` scalars
(``network_alphas``) and, in the header's ``__metadata__["lora_adapter_metadata"]``, a JSON
object of LoraConfig fields prefixed per component (``transformer.r``, ``transformer.lora_alpha``).

The older spellings of diffusers' pre-PEFT training scripts (``unet.<attn>.processor.to_q_lora.down.weight``,
``unet.<module>.lora.down.weight``, ``text_encoder.<attn>.q_proj.lora_linear_layer.down.weight``, and
UNet keys with no prefix at all) are read here too, renamed to PEFT's names as diffusers renames
them (:mod:`.diffusers_old`); each tensor keeps its own key in the file.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from ...checkpoint.config import LoraConfig, parse_config
from ...checkpoint.keys import Role, parse_saved
from ...errors import InconsistentAdapterError, InvalidConfigError, UnknownKeyError
from ...storage.header import SafetensorsHeader
from ...storage.scalars import ScalarReader, read_scalar
from ...tables.diffusers_names import FAMILIES, candidate_renames, component_chain, rename
from .kohya import foreign_findings
from .records import COMPONENTS, LORA, ForeignCheckpoint, ForeignModule

#: diffusers' default file name (``LORA_WEIGHT_NAME_SAFE``) and metadata key (``LORA_ADAPTER_METADATA_KEY``).
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

#: PEFT role -> slot of the :class:`ForeignModule` (kohya's names for A and B).
_SLOTS = {
    (Role.LORA_A, "weight"): "lora_down",
    (Role.LORA_B, "weight"): "lora_up",
    (Role.LORA_B, "bias"): "lora_up.bias",
    (Role.DORA_MAGNITUDE, None): "magnitude",
}


def split_diffusers_key(key: str) -> Optional[tuple[str, str]]:
    """``(component, rest)`` when ``key`` starts with a component name, else ``None``."""
    component, dot, rest = key.partition(".")
    return (component, rest) if dot and rest and component in COMPONENTS else None


def _slot(rest: str) -> Optional[tuple[str, str]]:
    """``(module, slot)`` for a key in PEFT's saved grammar (no component prefix), else ``None``."""
    try:
        kp = parse_saved(rest)
    except UnknownKeyError:
        return None
    slot = _SLOTS.get((kp.role, kp.param))
    return (kp.module, slot) if slot is not None else None


def _older_spelling(component: str, rest: str) -> bool:
    """Whether ``rest`` is not PEFT's spelling but one of diffusers' renames makes it a LoRA tensor of ``component``."""
    family = FAMILIES.get(component)
    return family is not None and _slot(rest) is None and any(_slot(k) is not None for k in candidate_renames(family, rest))


def is_diffusers_lora_key(key: str) -> bool:
    """A key of the diffusers grammar: ``<component>.`` and a LoRA tensor in PEFT's or an older
    diffusers spelling, an ``.alpha`` scalar, or (no prefix) an older UNet spelling."""
    parts = split_diffusers_key(key)
    if parts is None:
        return _older_spelling("unet", key)
    component, rest = parts
    if rest.endswith(".alpha") or any(f".{s}" in f".{rest}" for s in ("lora_A.", "lora_B.", "lora_magnitude_vector")):
        return True
    return _older_spelling(component, rest)


def component_configs(metadata: dict[str, str], path: str) -> dict[str, LoraConfig]:
    """component -> the LoraConfig stored in ``lora_adapter_metadata`` (missing: ``{}``)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        raise InvalidConfigError("is not valid JSON", path=path, key=METADATA_KEY, hint="the file's metadata is damaged") from None
    if not isinstance(doc, dict):
        raise InvalidConfigError("is not a JSON object", path=path, key=METADATA_KEY)
    per: dict[str, dict[str, Any]] = {}
    for k, v in doc.items():
        component, dot, field_name = str(k).partition(".")
        if dot and component in COMPONENTS:
            per.setdefault(component, {})[field_name] = v
    return {c: parse_config({**fields, "peft_type": "LORA"}, path=f"{path}[{METADATA_KEY}][{c}]") for c, fields in per.items()}


def _by_component(header: SafetensorsHeader, ckpt: ForeignCheckpoint) -> dict[str, list[tuple[str, str]]]:
    """component -> its ``(key, key without the component prefix)``, in file order. Keys with no
    prefix in an older UNet spelling are the UNet's (the format before diffusers PR 2918, which
    ``UNet2DConditionModel.load_lora_adapter(..., prefix=None)`` loads); other keys are unknown.

    Raises:
        InconsistentAdapterError: the file has both keys with no prefix and prefixed ones.
    """
    grouped: dict[str, list[tuple[str, str]]] = {}
    bare: list[str] = []
    for key in header.tensors:
        parts = split_diffusers_key(key)
        if parts is not None:
            grouped.setdefault(parts[0], []).append((key, parts[1]))
        elif _older_spelling("unet", key):
            bare.append(key)
        else:
            ckpt.unknown_keys.append(key)
    if bare and grouped:
        prefixed = next(k for entries in grouped.values() for k, _ in entries)
        raise InconsistentAdapterError(
            f"mixes keys with no component prefix ({bare[0]!r}, the UNet's in the format before diffusers' unet./text_encoder. prefixes) "
            f"and prefixed ones ({prefixed!r})", path=header.path, key=bare[0], hint="split the file, or prefix the UNet's keys with 'unet.'",
        )
    if bare:
        grouped["unet"] = [(k, k) for k in bare]
    return grouped


def _component_names(
    path: str, component: str, entries: list[tuple[str, str]], ckpt: ForeignCheckpoint
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """``(key, module, slot)`` for every LoRA tensor of one component, in PEFT's names: as written,
    or renamed from the older diffusers spelling as diffusers renames them (:mod:`.diffusers_old`);
    and ``(key, module)`` for every ``.alpha`` scalar. Unknown keys go to ``ckpt.unknown_keys``,
    with the ``.alpha`` keys of an older spelling (diffusers reads none for it).

    Raises:
        InconsistentAdapterError: the component mixes PEFT's and an older spelling (diffusers
            renames such a component according to its first key), or two keys name one tensor.
    """
    current = [(k, r) for k, r in entries if _slot(r) is not None]
    older = [(k, r) for k, r in entries if _older_spelling(component, r)]
    if current and older:
        raise InconsistentAdapterError(
            f"component {component} mixes PEFT's key spelling ({current[0][0]!r}) and an older diffusers spelling ({older[0][0]!r})",
            path=path, key=older[0][0], hint="diffusers renames such a component according to its first key; re-save it in one spelling",
        )
    chain = component_chain(FAMILIES[component], [r for _, r in entries]) if older else None
    out: list[tuple[str, str, str]] = []
    alphas: list[tuple[str, str]] = []
    seen: dict[tuple[str, str], str] = {}
    for key, rest in entries:
        if rest.endswith(".alpha") and not older:
            alphas.append((key, rest[: -len(".alpha")]))
            continue
        found = _slot(rename(rest, chain) if chain is not None else rest)
        if found is None:
            ckpt.unknown_keys.append(key)  # older spellings: diffusers reads no .alpha, and none without a marker
            continue
        if found in seen:
            raise InconsistentAdapterError(
                f"{seen[found]!r} and {key!r} are the same tensor ({found[0]}.{found[1]}) once diffusers renames them",
                path=path, key=key, hint="the file is damaged; keep one of them",
            )
        seen[found] = key
        out.append((key, found[0], found[1]))
    return out, alphas


def describe_diffusers(header: SafetensorsHeader, scalar: ScalarReader = read_scalar) -> ForeignCheckpoint:
    """Sort every tensor of a diffusers LoRA file into :class:`ForeignModule` records, each tensor
    keeping its own key in the file.

    Raises:
        InconsistentAdapterError: see :func:`_by_component` and :func:`_component_names`.
    """
    ckpt = ForeignCheckpoint(format="diffusers", file=header.path, metadata=dict(header.metadata), file_tensors=dict(header.tensors))
    configs = component_configs(ckpt.metadata, header.path)
    ckpt.configs = {c: dict(cfg.raw) for c, cfg in configs.items()}
    modules: dict[tuple[str, str], ForeignModule] = {}
    alphas: dict[tuple[str, str], str] = {}
    for component, entries in _by_component(header, ckpt).items():
        names, component_alphas = _component_names(header.path, component, entries, ckpt)
        for key, module, slot in names:
            m = modules.get((component, module))
            if m is None:
                m = modules[(component, module)] = ForeignModule(name=module, component=component, kind=LORA, path=module, grammar_name=module)
            m.tensors[slot] = header.tensors[key]
            m.keys[slot] = key
        for key, module in component_alphas:
            alphas[(component, module)] = key
    for ident, key in alphas.items():
        m = modules.get(ident)
        if m is None:
            ckpt.unknown_keys.append(key)
        else:
            m.alpha, m.alpha_key = scalar(header.tensors[key]), key
    for m in modules.values():
        cfg = configs.get(m.component)
        if cfg is not None and m.alpha is None:
            m.alpha = cfg.alpha_for(m.name)
            m.config_scaling = cfg.scaling_for(m.name, m.rank)
    ckpt.modules = list(modules.values())
    ckpt.findings.extend(foreign_findings(ckpt))
    unsupported = [m.name for m in ckpt.modules if "magnitude" in m.tensors or "lora_up.bias" in m.tensors]
    if unsupported:
        from ...checkpoint.findings import foreign_unsupported_finding

        ckpt.findings.append(foreign_unsupported_finding(header.path, "a DoRA magnitude or lora_B bias in a diffusers file", unsupported))
    return ckpt
