"""The diffusers LoRA file grammar (``pytorch_lora_weights.safetensors``, docs/FORMAT.md §10.2).

``<component>.<PEFT saved key without base_model.model.>``: ``unet.``, ``transformer.``,
``text_encoder.`` or ``text_encoder_2.`` followed by ``X.lora_A.weight`` / ``X.lora_B.weight``
(PEFT's grammar, parsed by :func:`adapterfmt.keys.parse_saved`), optionally ``X.alpha`` scalars
(``network_alphas``) and, in the header's ``__metadata__["lora_adapter_metadata"]``, a JSON
object of LoraConfig fields prefixed per component (``transformer.r``, ``transformer.lora_alpha``).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from ..config import LoraConfig, parse_config
from ..errors import InvalidConfigError, UnknownKeyError
from ..header import SafetensorsHeader
from ..keys import Role, parse_saved
from .kohya import foreign_findings
from .records import COMPONENTS, LORA, ForeignCheckpoint, ForeignModule
from .scalars import read_scalar

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


def is_diffusers_lora_key(key: str) -> bool:
    parts = split_diffusers_key(key)
    if parts is None:
        return False
    rest = parts[1]
    return rest.endswith(".alpha") or any(f".{s}" in f".{rest}" for s in ("lora_A.", "lora_B.", "lora_magnitude_vector"))


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


def describe_diffusers(header: SafetensorsHeader) -> ForeignCheckpoint:
    """Sort every tensor of a diffusers LoRA file into :class:`ForeignModule` records."""
    ckpt = ForeignCheckpoint(format="diffusers", file=header.path, metadata=dict(header.metadata), file_tensors=dict(header.tensors))
    configs = component_configs(ckpt.metadata, header.path)
    ckpt.configs = {c: dict(cfg.raw) for c, cfg in configs.items()}
    modules: dict[tuple[str, str], ForeignModule] = {}
    alphas: dict[tuple[str, str], str] = {}
    for key, info in header.tensors.items():
        parts = split_diffusers_key(key)
        if parts is None:
            ckpt.unknown_keys.append(key)
            continue
        component, rest = parts
        if rest.endswith(".alpha"):
            alphas[(component, rest[: -len(".alpha")])] = key
            continue
        try:
            kp = parse_saved(rest)
        except UnknownKeyError:
            ckpt.unknown_keys.append(key)
            continue
        slot = _SLOTS.get((kp.role, kp.param))
        if slot is None:
            ckpt.unknown_keys.append(key)
            continue
        ident = (component, kp.module)
        m = modules.get(ident)
        if m is None:
            m = modules[ident] = ForeignModule(name=kp.module, component=component, kind=LORA, path=kp.module)
        m.tensors[slot] = info
        m.keys[slot] = key
    for ident, key in alphas.items():
        m = modules.get(ident)
        if m is None:
            ckpt.unknown_keys.append(key)
        else:
            m.alpha, m.alpha_key = read_scalar(header.tensors[key]), key
    for m in modules.values():
        cfg = configs.get(m.component)
        if cfg is not None and m.alpha is None:
            m.alpha = cfg.alpha_for(m.name)
            m.config_scaling = cfg.scaling_for(m.name, m.rank)
    ckpt.modules = list(modules.values())
    ckpt.findings.extend(foreign_findings(ckpt))
    unsupported = [m.name for m in ckpt.modules if "magnitude" in m.tensors or "lora_up.bias" in m.tensors]
    if unsupported:
        from ..findings import foreign_unsupported_finding

        ckpt.findings.append(foreign_unsupported_finding(header.path, "a DoRA magnitude or lora_B bias in a diffusers file", unsupported))
    return ckpt
