"""The Flux / video LoRA grammars of ComfyUI and XLabs (docs/BEHAVIOUR.md §7.6), headers only.

* **ComfyUI** (``comfyui``): ``diffusion_model.<module>.<suffix>``, the module under the original
  model's own dotted names (Flux ``double_blocks.0.img_attn.qkv``, Wan ``blocks.0.self_attn.q``),
  suffix ``lora_A.weight`` / ``lora_B.weight`` or ``lora_down.weight`` / ``lora_up.weight`` (the
  same two factors), ``lora_mid.weight``, the scalar ``alpha``, and full deltas ``diff`` (a whole
  weight: a module of kind ``diff``) and ``diff_b`` (a bias, beside a LoRA's factors or a ``diff``),
  both added as they are (ComfyUI's ``comfy/lora.py``: weight multiplier 1, no alpha).
  ComfyUI's own ``comfy/lora.py`` reads the same keys; diffusers' Wan and Flux converters too.
* **XLabs** (``xlabs``): ``[diffusion_model.]{double,single}_blocks.N.processor.<name>.{down,up}.weight``
  as diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` reads them: ``proj_lora1`` / ``proj_lora2``
  are ``transformer_blocks.N.attn.to_out.0`` / ``.to_add_out``, ``qkv_lora1`` / ``qkv_lora2`` are split
  onto ``to_q`` / ``to_k`` / ``to_v`` / ``add_{q,k,v}_proj`` (``up`` in equal thirds by rows,
  ``down`` shared), single blocks' ``proj_lora`` is ``proj_out`` and ``qkv_lora`` ``to_q`` / ``to_k`` /
  ``to_v``; no alpha (scale 1). Modules are named with diffusers' names; a split one carries its
  parts in :attr:`~.records.ForeignModule.split`.

Both adapt one component, the ``transformer``.
"""

from __future__ import annotations

import re
from typing import Optional

from ...storage.header import SafetensorsHeader
from ...storage.scalars import ScalarReader, read_scalar
from .kohya import foreign_findings
from .records import DIFF, LORA, ForeignCheckpoint, ForeignModule

COMFY_PREFIX = "diffusion_model."
TRANSFORMER = "transformer"

#: ComfyUI suffix -> slot (``alpha`` apart).
_COMFY_SLOTS = {"lora_A.weight": "lora_down", "lora_B.weight": "lora_up", "lora_down.weight": "lora_down", "lora_up.weight": "lora_up",
                "lora_mid.weight": "lora_mid", "diff": "diff", "diff_b": "diff_b"}

_XLABS = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv_lora[12]?|proj_lora[12]?)\.(down|up)\.weight$")
_XLABS_NAMES = {
    ("double_blocks", "proj_lora1"): ["attn.to_out.0"], ("double_blocks", "proj_lora2"): ["attn.to_add_out"],
    ("double_blocks", "qkv_lora1"): ["attn.to_q", "attn.to_k", "attn.to_v"],
    ("double_blocks", "qkv_lora2"): ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    ("single_blocks", "proj_lora"): ["proj_out"], ("single_blocks", "qkv_lora"): ["attn.to_q", "attn.to_k", "attn.to_v"],
}  # fmt: skip
_BLOCKS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}


def split_comfy_key(key: str) -> Optional[tuple[str, str]]:
    """``(module, suffix)`` of a ComfyUI ``diffusion_model.`` key, ``None`` if it is not one."""
    if not key.startswith(COMFY_PREFIX):
        return None
    rest = key[len(COMFY_PREFIX):]
    for suffix in sorted((*_COMFY_SLOTS, "alpha", "dora_scale"), key=len, reverse=True):
        if rest.endswith("." + suffix) and len(rest) > len(suffix) + 1:
            return rest[: -len(suffix) - 1], suffix
    return None


def is_xlabs_key(key: str) -> bool:
    m = _XLABS.match(key)
    return m is not None and (m.group(1), m.group(3)) in _XLABS_NAMES


def is_comfy_key(key: str) -> bool:
    return split_comfy_key(key) is not None


def describe_comfy(header: SafetensorsHeader, scalar: ScalarReader = read_scalar) -> ForeignCheckpoint:
    """Sort a ComfyUI ``diffusion_model.`` file's tensors into :class:`ForeignModule` records (dotted names)."""
    ckpt = ForeignCheckpoint(format="comfyui", file=header.path, metadata=dict(header.metadata), file_tensors=dict(header.tensors))
    modules: dict[str, ForeignModule] = {}
    alphas: dict[str, str] = {}
    doras: dict[str, str] = {}
    for key, info in header.tensors.items():
        parts = split_comfy_key(key)
        if parts is None:
            ckpt.unknown_keys.append(key)
            continue
        name, suffix = parts
        if suffix == "alpha":
            alphas[name] = key
            continue
        if suffix == "dora_scale":
            doras[name] = key
            continue
        m = modules.setdefault(name, ForeignModule(name=name, component=TRANSFORMER, kind=LORA))
        slot = _COMFY_SLOTS[suffix]
        if slot in m.tensors:  # lora_A and lora_down in one module: two spellings of one factor
            ckpt.unknown_keys.append(key)
            continue
        m.tensors[slot], m.keys[slot] = info, key
    for name, key in alphas.items():
        if name in modules:
            modules[name].alpha, modules[name].alpha_key = scalar(header.tensors[key]), key
        else:
            ckpt.unknown_keys.append(key)
    for name, key in doras.items():
        if name in modules:
            modules[name].dora_scale = header.tensors[key]
        else:
            ckpt.unknown_keys.append(key)
    for m in modules.values():
        if not set(m.tensors) - {"diff", "diff_b"}:
            m.kind = DIFF
    ckpt.modules = list(modules.values())
    ckpt.findings.extend(foreign_findings(ckpt))
    return ckpt


def describe_xlabs(header: SafetensorsHeader, scalar: ScalarReader = read_scalar) -> ForeignCheckpoint:
    """Sort an XLabs Flux file's tensors into :class:`ForeignModule` records under diffusers' names,
    a fused ``qkv_lora`` split as diffusers splits it (``up`` in equal thirds)."""
    ckpt = ForeignCheckpoint(format="xlabs", file=header.path, metadata=dict(header.metadata), file_tensors=dict(header.tensors))
    modules: dict[str, ForeignModule] = {}
    for key, info in header.tensors.items():
        m = _XLABS.match(key)
        if m is None or (m.group(1), m.group(3)) not in _XLABS_NAMES:
            ckpt.unknown_keys.append(key)
            continue
        blocks, number, lora, side = m.groups()
        name = f"{blocks}.{number}.processor.{lora}"
        module = modules.setdefault(name, ForeignModule(name=name, component=TRANSFORMER, kind=LORA))
        slot = "lora_down" if side == "down" else "lora_up"
        module.tensors[slot], module.keys[slot] = info, key
    for name, module in modules.items():
        blocks, number, _p, lora = name.split(".")
        targets = [f"{_BLOCKS[blocks]}.{number}.{t}" for t in _XLABS_NAMES[(blocks, lora)]]
        if len(targets) == 1:
            module.name = targets[0]
            continue
        up = module.tensors.get("lora_up")
        if up is not None and up.shape and up.shape[0] % len(targets) == 0:
            step = up.shape[0] // len(targets)
            module.split = tuple((t, i * step, (i + 1) * step) for i, t in enumerate(targets))
    ckpt.modules = list(modules.values())
    ckpt.findings.extend(foreign_findings(ckpt))
    return ckpt


__all__ = ["describe_comfy", "describe_xlabs", "is_comfy_key", "is_xlabs_key", "split_comfy_key"]
