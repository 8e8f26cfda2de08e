"""The kohya / LyCORIS single-file grammar (docs/FORMAT.md §10.1).

``<prefix><flattened module name>.<suffix>``: the prefix names the component (``lora_unet_``,
``lora_te_``, ``lora_te1_``, ``lora_te2_``, ``lora_transformer_``), the module name is the
module path with every ``.`` replaced by ``_`` (lossy: resolved against the base, see
:mod:`adapterfmt.formats.diffusion.names`; read without one from the grammar alone, see
:mod:`adapterfmt.formats.diffusion.grammar_names`), and the suffix names the tensor: LoRA / LoCon
``lora_down.weight``, ``lora_up.weight`` (``lora_mid.weight`` with a Tucker core), LoHa
``hada_w{1,2}_{a,b}`` (``hada_t{1,2}``), LoKr ``lokr_w1`` or ``lokr_w1_{a,b}``, ``lokr_w2`` or
``lokr_w2_{a,b}`` (``lokr_t2``), and the scalar ``alpha``.
"""

from __future__ import annotations

from typing import Optional

from ...checkpoint.finding import Finding
from ...errors import InconsistentAdapterError
from ...storage.header import SafetensorsHeader
from ...storage.scalars import ScalarReader, read_scalar
from .grammar_names import read_kohya_name
from .records import LOHA, LOHA_SLOTS, LOKR, LOKR_SLOTS, LORA, ForeignCheckpoint, ForeignModule

#: File prefix -> component. Longer prefixes first (``lora_te1_`` before ``lora_te_``).
KOHYA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),
)

#: Component -> the prefix adapterfmt writes (SD-style single text encoder: ``lora_te_``).
WRITE_PREFIX = {"unet": "lora_unet_", "transformer": "lora_transformer_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}

#: Tensor suffix -> (kind, slot). ``alpha`` and ``dora_scale`` are handled apart.
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_down.weight": (LORA, "lora_down"),
    "lora_up.weight": (LORA, "lora_up"),
    "lora_mid.weight": (LORA, "lora_mid"),
    **{s: (LOHA, s) for s in LOHA_SLOTS},
    **{s: (LOKR, s) for s in LOKR_SLOTS},
}


def split_kohya_key(key: str) -> Optional[tuple[str, str, str]]:
    """``(component, flattened name, suffix)`` for a kohya key, ``None`` if it is not one."""
    for prefix, component in KOHYA_PREFIXES:
        if key.startswith(prefix):
            name, dot, suffix = key[len(prefix) :].partition(".")
            if dot and name:
                return component, name, suffix
            return None
    return None


def is_kohya_key(key: str) -> bool:
    return split_kohya_key(key) is not None


def describe_kohya(header: SafetensorsHeader, scalar: ScalarReader = read_scalar) -> ForeignCheckpoint:
    """Sort every tensor of a kohya / LyCORIS file into :class:`ForeignModule` records.

    Raises:
        InconsistentAdapterError: one module mixes the tensors of two kinds (LoRA and LoHa).
    """
    ckpt = ForeignCheckpoint(format="kohya", file=header.path, metadata=dict(header.metadata), file_tensors=dict(header.tensors))
    modules: dict[tuple[str, str], ForeignModule] = {}
    alphas: dict[tuple[str, str], str] = {}
    doras: dict[tuple[str, str], str] = {}
    for key, info in header.tensors.items():
        parts = split_kohya_key(key)
        if parts is None:
            ckpt.unknown_keys.append(key)
            continue
        component, name, suffix = parts
        ident = (component, name)
        if suffix == "alpha":
            alphas[ident] = key
            continue
        if suffix == "dora_scale":
            doras[ident] = key
            continue
        kind_slot = SUFFIXES.get(suffix)
        if kind_slot is None:
            ckpt.unknown_keys.append(key)
            continue
        kind, slot = kind_slot
        m = modules.get(ident)
        if m is None:
            reading = read_kohya_name(component, name)
            m = modules[ident] = ForeignModule(name=name, component=component, kind=kind, grammar_name=reading.dotted, grammar_note=reading.note)
        elif m.kind != kind:
            raise InconsistentAdapterError(
                f"module {name!r} holds both {m.kind} and {kind} tensors", path=header.path, key=key, hint="the file is damaged; re-export it"
            )
        m.tensors[slot] = info
        m.keys[slot] = key
    for ident, key in alphas.items():
        m = modules.get(ident)
        if m is None:
            ckpt.unknown_keys.append(key)  # an alpha with no module
            continue
        m.alpha, m.alpha_key = scalar(header.tensors[key]), key
    for ident, key in doras.items():
        m = modules.get(ident)
        if m is None:
            ckpt.unknown_keys.append(key)
        else:
            m.dora_scale = header.tensors[key]
    ckpt.modules = list(modules.values())
    ckpt.findings.extend(foreign_findings(ckpt))
    return ckpt


def foreign_findings(ckpt: ForeignCheckpoint) -> list[Finding]:
    """Incomplete modules, unknown keys and LyCORIS weight decomposition, as warnings (built in :mod:`adapterfmt.checkpoint.findings`)."""
    from ...checkpoint.findings import foreign_dora_finding, foreign_unsupported_finding, incomplete_factors_finding, unknown_keys_finding

    out = []
    incomplete = [m.name for m in ckpt.modules if not m.complete]
    if incomplete:
        out.append(incomplete_factors_finding(ckpt.file, incomplete))
    if ckpt.unknown_keys:
        out.append(unknown_keys_finding(ckpt.file, ckpt.unknown_keys, f"the {ckpt.format} grammar (FORMAT §10)"))
    dora = [m for m in ckpt.modules if m.dora_scale is not None]
    old_form = [m.name for m in dora if len(m.dora_scale.shape) >= 2 and m.dora_scale.shape[0] == 1 and any(d != 1 for d in m.dora_scale.shape[1:])]
    if old_form:
        out.append(foreign_unsupported_finding(ckpt.file, "LyCORIS weight decomposition in the old input-axis form (dora_scale (1, in))", old_form))
    if len(old_form) < len(dora):
        out.append(foreign_dora_finding(ckpt.file, [m.name for m in dora if m.name not in old_form]))
    return out
