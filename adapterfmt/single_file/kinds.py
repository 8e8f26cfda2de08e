"""Which single-file checkpoint a safetensors header is, from its keys alone.

A kind is recognised by keys only its checkpoints have (Flux and SD3 after ComfyUI's
``model.diffusion_model.`` prefix, when the file has it; SD 1.x, SD 2.x and SDXL files name their
parts with fixed prefixes, :data:`COMPONENT_PREFIXES`; Wan after that prefix too). Kinds adapterfmt
recognises but cannot yet place LoRAs on (the SDXL refiner, a UNet without text encoders) are
refused by name rather than read as a plain weights file.
"""

from __future__ import annotations

from typing import Iterable, Optional

from ..errors import AmbiguousMatchError, UnsupportedFeatureError

#: ComfyUI saves the diffusion model under this prefix (BFL's own files have none).
COMFY_PREFIX = "model.diffusion_model."

#: kind -> keys (unprefixed) that every checkpoint of the kind has; the kinds the tables cover.
COVERED = {
    "flux": ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight"),
    "sdxl": ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "model.diffusion_model.label_emb.0.0.weight",
             "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
    "sd1": ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
    "sd2": ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
    "wan": ("blocks.0.self_attn.q.weight", "blocks.0.cross_attn.q.weight", "blocks.0.ffn.0.weight", "head.modulation"),
    "sd3": ("joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight", "final_layer.adaLN_modulation.1.weight"),
}

#: Kinds whose diffusion model may sit behind ComfyUI's prefix (their keys above are unprefixed).
PREFIXED_KINDS = ("flux", "sd3", "wan")

#: Where each component's tensors are in the file (after the file's own prefix), for the
#: component's own (LDM / SGM) module names.
COMPONENT_PREFIXES = {
    ("flux", "transformer"): "",
    ("sd1", "unet"): "model.diffusion_model.", ("sd1", "text_encoder"): "cond_stage_model.transformer.",
    ("sd2", "unet"): "model.diffusion_model.", ("sd2", "text_encoder"): "cond_stage_model.model.",
    ("sdxl", "unet"): "model.diffusion_model.", ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
    ("sd3", "transformer"): "", ("wan", "transformer"): "", ("sd3", "text_encoder"): "text_encoders.clip_l.transformer.",
    ("sd3", "text_encoder_2"): "text_encoders.clip_g.transformer.",
}

#: Kinds recognised by name only (no placement table yet): kind -> (description, a key it has, as stored).
RECOGNISED = {
    "sdxl-refiner": ("Stable Diffusion XL refiner (SGM names)", "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"),
    "sd-unet": ("Stable Diffusion UNet without its text encoders (LDM / SGM names)", "model.diffusion_model.input_blocks.0.0.weight"),
}

#: Human names of the covered kinds.
DESCRIPTIONS = {"flux": "Flux.1 (BFL names)", "sdxl": "Stable Diffusion XL (SGM names)", "sd1": "Stable Diffusion 1.x (LDM names)",
                "sd2": "Stable Diffusion 2.x (LDM names, OpenCLIP ViT-H)", "sd3": "Stable Diffusion 3 / 3.5 (MMDiT joint_blocks)",
                "wan": "Wan 2.1 / 2.2 video (blocks.N.self_attn)"}


def detect_kind(keys: Iterable[str], *, path: Optional[str] = None, kind: Optional[str] = None) -> Optional[tuple[str, str]]:
    """``(kind, prefix)`` of a single-file checkpoint with these keys; ``None`` for any other file.

    Args:
        kind: the user's override (``--single-file-kind``): checked against the keys, never assumed.

    Raises:
        UnsupportedFeatureError: a recognised kind adapterfmt cannot place LoRAs on yet (named),
            an unknown override, or an override the keys contradict.
        AmbiguousMatchError: the keys fit two covered kinds (pass the override).
    """
    names = set(keys)
    found = []
    for k, required in COVERED.items():
        for prefix in ("", COMFY_PREFIX) if k in PREFIXED_KINDS else ("",):
            if all(prefix + r in names for r in required):
                found.append((k, prefix))
    if kind is not None:
        if kind not in COVERED:
            raise UnsupportedFeatureError(f"single-file kind {kind!r} is not one adapterfmt places LoRAs on", path=path, key=kind,
                                          hint=f"covered: {', '.join(sorted(COVERED))}")
        chosen = [f for f in found if f[0] == kind]
        if not chosen:
            raise UnsupportedFeatureError(f"does not hold the tensors of a {DESCRIPTIONS[kind]} checkpoint (no {COVERED[kind][0]})", path=path,
                                          key=COVERED[kind][0], hint="is this the right file?")
        return chosen[0]
    if len({f[0] for f in found}) > 1:
        raise AmbiguousMatchError(f"fits the single-file kinds {found[0][0]} and {found[1][0]}", path=path,
                                  hint="pass --single-file-kind KIND")
    if found:
        return found[0]
    for k, (description, key) in RECOGNISED.items():
        if key in names or COMFY_PREFIX + key in names:
            raise UnsupportedFeatureError(
                f"is a {description} single-file checkpoint, which adapterfmt cannot merge into yet", path=path, key=key,
                hint=f"covered single-file kinds: {', '.join(DESCRIPTIONS[c] for c in sorted(COVERED))}; "
                "or give the diffusers folder of the model as --base",
            )
    return None


__all__ = ["COMFY_PREFIX", "COMPONENT_PREFIXES", "COVERED", "DESCRIPTIONS", "PREFIXED_KINDS", "RECOGNISED", "detect_kind"]
