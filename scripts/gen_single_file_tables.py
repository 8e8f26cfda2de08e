"""Generate ``adapterfmt/tables/single_file_tables.json`` from the pinned diffusers: where every tensor
of a diffusers model lives in the single-file checkpoint people download (BFL / ComfyUI names).

diffusers loads a single file (``from_single_file``) with conversion functions in
``diffusers/loaders/single_file_utils.py`` that rename keys and cut fused tensors apart
(Flux: ``double_blocks.N.img_attn.qkv`` chunked into ``to_q`` / ``to_k`` / ``to_v``,
``single_blocks.N.linear1`` split 3072 / 3072 / 3072 / 12288 into ``to_q`` / ``to_k`` / ``to_v`` /
``proj_mlp``, ``final_layer.adaLN_modulation.1``'s two halves swapped). Rather than re-reading that
code, this script RUNS it: it builds a synthetic checkpoint of the standard configuration in
which every row of every tensor carries its own identity (``key number · 2**24 + row``, exact in
float64), converts it with diffusers' function, and records for every diffusers tensor which
single-file tensor and which rows it came from. The checkpoint's keys are checked twice: the
converter must consume every one of them, and the keys and row counts it produces must be exactly
those of the diffusers model class built (on the meta device) with the same configuration.

Block numbers are written as ``{i}`` (the table holds one entry per tensor of a block, checked
identical for blocks 0 and 1). Entries:

* ``"names"``: diffusers key -> single-file key, the whole tensor renamed;
* ``"slices"``: diffusers key -> ``[[single-file key, first row, end row, single-file rows], ...]``,
  the diffusers tensor's rows in order, cut from those rows of those tensors.
* ``"chunks"`` (SD3, whose converter hard-codes no width): diffusers key -> ``[[single-file key,
  index, count], ...]``, part ``index`` of ``count`` equal parts of the tensor (``torch.chunk``):
  the converter is run at two widths and the cut must be the same fraction at both;
* ``"last_block"`` / ``"last"`` (SD3): the block family whose highest-numbered block the converter
  treats apart, and the entries that differ there.
* ``"lora_names"`` (Wan): a module's single-file name -> the diffusers module that diffusers' LoRA
  converter (``_convert_non_diffusers_wan_lora_to_diffusers``) puts a ComfyUI LoRA on it onto,
  found by running that converter on a synthetic LoRA of each module;
* ``"unread"`` (SD3's CLIP-L ``text_projection``): diffusers key -> single-file key of a tensor the
  single-file loader does not read (it sets the identity); a LoRA on it is refused.

Run ``python scripts/gen_single_file_tables.py`` after changing the pinned diffusers;
``tests/single_file/test_single_file_tables.py`` regenerates the file and fails on any difference.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapterfmt", "tables", "single_file_tables.json")

_ID = 1 << 24

#: Flux.1 (BFL) single-file tensors per block and their rows at the released configuration
#: (hidden 3072, MLP 12288, 24 heads of 128, T5 context 4096, CLIP pooled 768, 64 latent channels).
_H, _MLP = 3072, 12288
_FLUX_TOP = {
    "img_in": (_H, 64), "txt_in": (_H, 4096),
    "time_in.in_layer": (_H, 256), "time_in.out_layer": (_H, _H),
    "vector_in.in_layer": (_H, 768), "vector_in.out_layer": (_H, _H),
    "guidance_in.in_layer": (_H, 256), "guidance_in.out_layer": (_H, _H),
    "final_layer.linear": (64, _H), "final_layer.adaLN_modulation.1": (2 * _H, _H),
}  # fmt: skip
_FLUX_DOUBLE = {
    **{f"{s}_mod.lin": (6 * _H, _H) for s in ("img", "txt")},
    **{f"{s}_attn.qkv": (3 * _H, _H) for s in ("img", "txt")},
    **{f"{s}_attn.proj": (_H, _H) for s in ("img", "txt")},
    **{f"{s}_mlp.0": (_MLP, _H) for s in ("img", "txt")},
    **{f"{s}_mlp.2": (_H, _MLP) for s in ("img", "txt")},
}
_FLUX_DOUBLE_NORMS = [f"{s}_attn.norm.{n}_norm.scale" for s in ("img", "txt") for n in ("query", "key")]
_FLUX_SINGLE = {"linear1": (3 * _H + _MLP, _H), "linear2": (_H, _H + _MLP), "modulation.lin": (3 * _H, _H)}
_FLUX_SINGLE_NORMS = [f"norm.{n}_norm.scale" for n in ("query", "key")]
_BLOCKS = 2  #: blocks of each kind in the synthetic checkpoint (their entries must agree)


def _flux_rows() -> dict[str, int]:
    """Single-file key -> rows, for a Flux.1-dev checkpoint with ``_BLOCKS`` blocks of each kind."""
    rows: dict[str, int] = {}
    for name, (out, _in) in _FLUX_TOP.items():
        rows[f"{name}.weight"], rows[f"{name}.bias"] = out, out
    for i in range(_BLOCKS):
        for name, (out, _in) in _FLUX_DOUBLE.items():
            rows[f"double_blocks.{i}.{name}.weight"], rows[f"double_blocks.{i}.{name}.bias"] = out, out
        for name in _FLUX_DOUBLE_NORMS:
            rows[f"double_blocks.{i}.{name}"] = 128
        for name, (out, _in) in _FLUX_SINGLE.items():
            rows[f"single_blocks.{i}.{name}.weight"], rows[f"single_blocks.{i}.{name}.bias"] = out, out
        for name in _FLUX_SINGLE_NORMS:
            rows[f"single_blocks.{i}.{name}"] = 128
    return rows


def _identity_checkpoint(rows: dict[str, int]) -> tuple[dict, list[str]]:
    import torch

    keys = sorted(rows)
    state = {}
    for n, key in enumerate(keys):
        ident = torch.arange(rows[key], dtype=torch.float64) + (n + 1) * _ID
        state[key] = ident[:, None] if key.endswith(("weight", "embedding", "projection")) else ident
    return state, keys


def _decode(tensor, keys: list[str], rows: dict[str, int]) -> list[list]:
    """The runs of (key, first row, end row) a converted tensor's rows came from (of its columns,
    for a tensor the converter transposed: ``[["T", key]]``)."""
    if tensor.dim() == 2 and tensor.shape[0] == 1 and tensor.shape[1] > 1:
        first = int(tensor[0, 0].item())
        return [["T", keys[first // _ID - 1]]]
    values = tensor.reshape(tensor.shape[0], -1)[:, 0].tolist() if tensor.dim() > 1 else tensor.tolist()
    runs: list[list] = []
    for v in values:
        v = int(v)
        key, row = keys[v // _ID - 1], v % _ID
        if runs and runs[-1][0] == key and runs[-1][2] == row:
            runs[-1][2] += 1
        else:
            runs.append([key, row, row + 1])
    return [[k, a, b, rows[k]] for k, a, b in runs]


#: The numbered blocks written as ``{i}`` (the first one of a key); the same rule as
#: :mod:`adapterfmt.tables.single_file_names`.
_BLOCK_NUMBER = re.compile(r"(?:^|\.)(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|joint_blocks|blocks|layers|resblocks)\.(\d+)\.")


def _template(key: str) -> tuple[str, int]:
    m = _BLOCK_NUMBER.search(key)
    if m is None:
        return key, -1
    return f"{key[: m.start(2)]}{{i}}{key[m.end(2):]}", int(m.group(2))


def _check_keys(what: str, converted: dict, expected: dict[str, int]) -> None:
    got = {k: v.shape[0] if v.dim() < 2 or v.shape[0] != 1 else v.shape[1] for k, v in converted.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got[k])
        raise SystemExit(f"diffusers' {what} converter and the diffusers model disagree on {diff[:5]}")


#: The UNet configurations of the released checkpoints (diffusers' own ``unet/config.json``).
_SD1_UNET: dict = {}  # UNet2DConditionModel's defaults are SD 1.x's
_SDXL_UNET = dict(
    sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768)
_SD2_UNET = dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, sample_size=96)
#: OpenCLIP ViT-H as SD 2.x's text encoder: 24 blocks in the file, the last one unused (diffusers' model has 23).
_OPEN_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512, hidden_act="gelu")
_OPEN_CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")


def _unet(config: dict, prefix: str) -> dict:
    """The UNet of an SD 1.x / SDXL single file: LDM / SGM names, as ``convert_ldm_unet_checkpoint`` reads them."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from adapterfmt.formats.diffusion.sgm_names import sgm_aliases  # only to name the synthetic keys; the converter checks them

    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    expected = {k: v.shape[0] for k, v in model.state_dict().items()}
    modules = sorted({k.rpartition(".")[0] for k in expected})
    to_sgm = {d: s for s, d in sgm_aliases(modules, dict(model.config)).items()}
    rows = {}
    for key, n in expected.items():
        module, _, param = key.rpartition(".")
        sgm = next((to_sgm[m] + module[len(m):] for m in sorted(to_sgm, key=len, reverse=True) if module == m or module.startswith(m + ".")), None)
        if sgm is None:
            raise SystemExit(f"no SGM name for {key}")
        rows[f"{prefix}{sgm}.{param}"] = n
    state, keys = _identity_checkpoint(rows)
    converted = convert_ldm_unet_checkpoint(state, dict(model.config))
    _check_keys("UNet", converted, expected)
    return _entries(converted, keys, rows)


def _clip(config: dict, prefix: str) -> dict:
    """CLIP-L (SD 1.x ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``):
    ``convert_ldm_clip_checkpoint`` strips the prefix."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config))
    expected = {"text_model." + k.removeprefix("text_model."): v.shape[0] for k, v in model.state_dict().items()}
    rows = {prefix + k: n for k, n in expected.items()}
    state, keys = _identity_checkpoint(rows)
    converted = convert_ldm_clip_checkpoint(state)
    _check_keys("CLIP", converted, expected)
    return _entries(converted, keys, rows)


def _open_clip(config: dict, prefix: str, *, projection: bool = True, file_layers: int = 0) -> dict:
    """OpenCLIP ViT-bigG (SDXL ``conditioner.embedders.1.model.``) or ViT-H (SD 2.x
    ``cond_stage_model.model.``, whose last block and ``text_projection`` diffusers ignores):
    ``convert_open_clip_checkpoint`` cuts ``attn.in_proj_weight`` into q / k / v rows and transposes
    ``text_projection``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
    expected = {("" if k.startswith(("text_model.", "text_projection")) else "text_model.") + k: v.shape[0] for k, v in model.state_dict().items()}
    h, n = config["hidden_size"], file_layers or config["num_hidden_layers"]
    rows = {f"{prefix}positional_embedding": expected["text_model.embeddings.position_embedding.weight"],
            f"{prefix}token_embedding.weight": expected["text_model.embeddings.token_embedding.weight"],
            f"{prefix}ln_final.weight": h, f"{prefix}ln_final.bias": h, f"{prefix}text_projection": h}
    for i in range(n):
        block = f"{prefix}transformer.resblocks.{i}."
        rows.update({block + "attn.in_proj_weight": 3 * h, block + "attn.in_proj_bias": 3 * h, block + "attn.out_proj.weight": h,
                     block + "attn.out_proj.bias": h, block + "ln_1.weight": h, block + "ln_1.bias": h, block + "ln_2.weight": h,
                     block + "ln_2.bias": h, block + "mlp.c_fc.weight": config["intermediate_size"], block + "mlp.c_fc.bias": config["intermediate_size"],
                     block + "mlp.c_proj.weight": h, block + "mlp.c_proj.bias": h})
    state, keys = _identity_checkpoint(rows)
    converted = convert_open_clip_checkpoint(None, state, prefix=prefix)
    _check_keys("OpenCLIP", converted, expected)
    return _entries(converted, keys, rows)


def _flux() -> dict:
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    rows = _flux_rows()
    state, keys = _identity_checkpoint(rows)
    converted = convert_flux_transformer_checkpoint_to_diffusers(state)
    if state:
        raise SystemExit(f"diffusers' Flux converter left single-file keys unread: {sorted(state)[:5]}")
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=_BLOCKS, num_single_layers=_BLOCKS, guidance_embeds=True)
    _check_keys("Flux", converted, {k: v.shape[0] for k, v in model.state_dict().items()})
    return _entries(converted, keys, rows)


#: SD3 / SD3.5 transformers (diffusers' ``transformer/config.json`` of the released models), each
#: with ``_SD3_LAYERS`` joint blocks (the last one ``context_pre_only``, as in every released model).
_SD3_VARIANTS = {
    "sd3-medium": dict(num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-large": dict(num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}  # fmt: skip
_SD3_LAYERS = 3
#: a second width at which every variant is converted again: a fused tensor's cut must be the same
#: fraction of its rows at both widths (``torch.chunk``), else the generator stops
_SD3_NARROW = dict(num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16)


def _sd3_rows(config: dict) -> dict[str, int]:
    """Single-file (SAI MMDiT) key -> rows, for an SD3 transformer of ``config``."""
    h = config["num_attention_heads"] * config.get("attention_head_dim", 64)
    head = config.get("attention_head_dim", 64)
    qk = config.get("qk_norm") is not None
    dual = set(config.get("dual_attention_layers", ()))
    n = config["num_layers"]
    rows: dict[str, int] = {"pos_embed": 1}

    def linear(name: str, out: int) -> None:
        rows[f"{name}.weight"], rows[f"{name}.bias"] = out, out

    for name in ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "context_embedder", "y_embedder.mlp.0", "y_embedder.mlp.2"):
        linear(name, h)
    linear("final_layer.linear", 2 * 2 * 16)
    linear("final_layer.adaLN_modulation.1", 2 * h)
    for i in range(n):
        last = i == n - 1
        for side in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{side}."
            linear(b + "attn.qkv", 3 * h)
            if qk:
                rows[b + "attn.ln_q.weight"], rows[b + "attn.ln_k.weight"] = head, head
            if side == "context_block" and last:
                linear(b + "adaLN_modulation.1", 2 * h)
                continue
            linear(b + "attn.proj", h)
            linear(b + "adaLN_modulation.1", (9 if side == "x_block" and i in dual else 6) * h)
            linear(b + "mlp.fc1", 4 * h)
            linear(b + "mlp.fc2", h)
        if i in dual:
            b = f"joint_blocks.{i}.x_block.attn2."
            linear(b + "qkv", 3 * h)
            linear(b + "proj", h)
            if qk:
                rows[b + "ln_q.weight"], rows[b + "ln_k.weight"] = head, head
    return rows


def _sd3_once(config: dict) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    rows = _sd3_rows(config)
    state, keys = _identity_checkpoint(rows)
    converted = convert_sd3_transformer_checkpoint_to_diffusers(state)
    if state:
        raise SystemExit(f"diffusers' SD3 converter left single-file keys unread: {sorted(state)[:5]}")
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    _check_keys("SD3", converted, {k: v.shape[0] for k, v in model.state_dict().items()})
    return _entries(converted, keys, rows, last=config["num_layers"] - 1)


def _chunks(wide: dict, narrow: dict, what: str) -> dict:
    """``slices`` taken at two widths -> ``chunks``: ``[[single-file key, index, count], ...]``,
    rows ``index / count`` to ``(index + 1) / count`` of the tensor, the same at both widths."""
    if set(wide) != set(narrow):
        raise SystemExit(f"{what}: the fused tensors differ between widths: {sorted(set(wide) ^ set(narrow))[:5]}")
    out = {}
    for template, runs in wide.items():
        parts = []
        for (k, a, b, n), (k2, a2, b2, n2) in zip(runs, narrow[template], strict=True):
            step, step2 = b - a, b2 - a2
            if k != k2 or n % step or a % step or n2 % step2 or a2 % step2 or (a // step, n // step) != (a2 // step2, n2 // step2):
                raise SystemExit(f"{what}: {template} is not cut into equal parts of {k} (rows {a}:{b} of {n}, {a2}:{b2} of {n2})")
            parts.append([k, a // step, n // step])
        out[template] = parts
    return out


def _sd3() -> dict:
    """The SD3 / SD3.5 transformer (``convert_sd3_transformer_checkpoint_to_diffusers``): every
    variant at its released width and at a narrow one; the converter cuts ``attn.qkv`` into thirds
    and swaps the halves of ``final_layer.adaLN_modulation.1`` (and of the last block's
    ``context_block.adaLN_modulation.1``) whatever the width, recorded as ``chunks``."""
    table: dict = {"names": {}, "chunks": {}, "transposed": {}, "last_block": "joint_blocks", "last": {"names": {}, "chunks": {}}}
    for variant, released in _SD3_VARIANTS.items():
        wide = _sd3_once({**released, "num_layers": _SD3_LAYERS})
        narrow = _sd3_once({**released, **_SD3_NARROW, "num_layers": _SD3_LAYERS})
        for section, w, nr in ((table, wide, narrow), (table["last"], wide["last"], narrow["last"])):
            if w["names"] != nr["names"]:
                raise SystemExit(f"{variant}: renamed tensors differ between widths")
            for field, value in (("names", w["names"]), ("chunks", _chunks(w["slices"], nr["slices"], variant))):
                for template, entry in value.items():
                    if section[field].setdefault(template, entry) != entry:
                        raise SystemExit(f"{variant} converts {template} differently from another SD3 variant")
        if wide["transposed"] or narrow["transposed"]:
            raise SystemExit(f"{variant}: a transposed tensor")
    return table


#: SD3's CLIP text encoders in the single file (``text_encoders.clip_l|clip_g.transformer.`` +
#: transformers' own keys) at the released widths with two layers, as ``CLIPTextModelWithProjection``.
#: (T5 is not tabled: no LoRA format adapterfmt reads, nor diffusers' SD3 loader, adapts it.)
_SD3_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=2, projection_dim=768)
_SD3_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=2, projection_dim=1280, hidden_act="gelu")


def _sd3_clip(config: dict, prefix: str, *, identity_projection: bool) -> dict:
    """CLIP-L / CLIP-G of an SD3 file: ``convert_ldm_clip_checkpoint(checkpoint, prefix)`` strips the
    prefix. diffusers' single-file loader sets CLIP-L's ``text_projection`` to the identity instead
    of reading it (``identity_projection``): that key is listed in ``unread``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    with torch.device("meta"):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    expected = {k: v.shape[0] for k, v in model.state_dict().items()}
    unread = {"text_projection.weight": prefix + "text_projection.weight"} if identity_projection else {}
    rows = {prefix + k: n for k, n in expected.items() if k not in unread}
    state, keys = _identity_checkpoint(rows)
    converted = convert_ldm_clip_checkpoint(state, prefix)
    _check_keys("SD3 CLIP", converted, {k: n for k, n in expected.items() if k not in unread})
    return {**_entries(converted, keys, rows), "unread": unread}


#: Wan 2.1 / 2.2 (the original code's names; ComfyUI adds ``model.diffusion_model.``): an I2V-shaped
#: transformer, whose keys are a superset of T2V's (``img_emb``, ``cross_attn.k_img`` / ``v_img``).
#: diffusers' converter only renames, so the widths are small; two blocks.
_WAN = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, ffn_dim=32, text_dim=24, freq_dim=8, in_channels=4, out_channels=4,
            image_dim=12, added_kv_proj_dim=16)


def _wan_rows() -> dict[str, int]:
    """Single-file key -> rows of the :data:`_WAN` transformer under Wan's own names."""
    h, c = _WAN["num_attention_heads"] * _WAN["attention_head_dim"], _WAN["image_dim"]
    rows: dict[str, int] = {"patch_embedding.weight": h, "patch_embedding.bias": h, "head.modulation": 1}

    def linear(name: str, out: int) -> None:
        rows[f"{name}.weight"], rows[f"{name}.bias"] = out, out

    for name in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2"):
        linear(name, h)
    linear("time_projection.1", 6 * h)
    linear("head.head", 2 * 2 * _WAN["out_channels"])
    linear("img_emb.proj.0", c)
    linear("img_emb.proj.1", c)
    linear("img_emb.proj.3", h)
    linear("img_emb.proj.4", h)
    for i in range(_WAN["num_layers"]):
        b = f"blocks.{i}."
        rows[b + "modulation"] = 1
        for attn in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                linear(f"{b}{attn}.{p}", h)
            rows[f"{b}{attn}.norm_q.weight"], rows[f"{b}{attn}.norm_k.weight"] = h, h
        linear(b + "cross_attn.k_img", h)
        linear(b + "cross_attn.v_img", h)
        rows[b + "cross_attn.norm_k_img.weight"] = h
        linear(b + "norm3", h)
        linear(b + "ffn.0", _WAN["ffn_dim"])
        linear(b + "ffn.2", h)
    return rows


def _wan() -> dict:
    """The Wan transformer (``convert_wan_transformer_to_diffusers``: renames only)."""
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    rows = _wan_rows()
    state, keys = _identity_checkpoint(rows)
    converted = convert_wan_transformer_to_diffusers(state)
    if state:
        raise SystemExit(f"diffusers' Wan converter left single-file keys unread: {sorted(state)[:5]}")
    with torch.device("meta"):
        model = WanTransformer3DModel(**_WAN)
    _check_keys("Wan", converted, {k: v.shape[0] for k, v in model.state_dict().items()})
    table = _entries(converted, keys, rows)
    if table["slices"] or table["transposed"]:
        raise SystemExit("diffusers' Wan converter cut or transposed a tensor: the table has no form for it here")
    return {**table, "lora_names": _wan_lora_names(rows)}


def _wan_lora_names(rows: dict[str, int]) -> dict[str, str]:
    """Wan module (single-file name, block templated) -> the diffusers module that
    ``_convert_non_diffusers_wan_lora_to_diffusers`` puts a ComfyUI LoRA on it onto: the converter
    is run on a LoRA of every module of block 0 and outside the blocks, one at a time beside a
    fixed anchor (the converter needs a block, and ``k_img`` with ``v_img``); a module it does not
    convert (it raises, or drops it) has no entry."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers

    modules = sorted({k.rpartition(".")[0] for k in rows if k.endswith(".weight") and not k.startswith("blocks.1.")})
    anchor = ["blocks.0.self_attn.q", "blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img"]
    out: dict[str, str] = {}
    for module in modules:
        probe = list(dict.fromkeys([*anchor, module]))
        lora = {}
        for j, m in enumerate(probe):
            lora[f"diffusion_model.{m}.lora_A.weight"] = torch.full((1, 1), float(j + 1))
            lora[f"diffusion_model.{m}.lora_B.weight"] = torch.full((1, 1), float(j + 1))
        try:
            converted = _convert_non_diffusers_wan_lora_to_diffusers(lora)
        except (ValueError, KeyError):
            continue
        mark = float(probe.index(module) + 1)
        found = [k for k, v in converted.items() if k.endswith(".lora_A.weight") and float(v.item()) == mark]
        if len(found) > 1:
            raise SystemExit(f"diffusers' Wan LoRA converter puts {module} on several modules: {found}")
        if found:
            target = found[0].removeprefix("transformer.").removesuffix(".lora_A.weight")
            own, _ = _template(module + ".weight")
            diffusers, _ = _template(target + ".weight")
            out[own.removesuffix(".weight")] = diffusers.removesuffix(".weight")
    return out


def _entries(converted: dict, keys: list[str], rows: dict[str, int], *, last: Optional[int] = None) -> dict:
    """The table of one component. ``last``: the number of the synthetic checkpoint's last block,
    which the converter may treat apart (SD3's ``context_pre_only`` block): its entries that differ
    from the other blocks' go to ``"last"``."""
    names: dict[str, str] = {}
    slices: dict[str, list] = {}
    transposed: dict[str, str] = {}
    seen: dict[str, tuple[int, object]] = {}
    at_last: dict[str, object] = {}
    for key in sorted(converted):
        runs = _decode(converted[key], keys, rows)
        if runs[0][0] == "T":
            transposed[key] = runs[0][1]
            continue
        whole = len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == runs[0][3]
        template, block = _template(key)
        templated_runs = []
        for k, a, b, n in runs:
            t, b2 = _template(k)
            if b2 != block:
                raise SystemExit(f"{key} takes rows of {k}, another block")
            templated_runs.append([t, a, b, n])
        value: object = templated_runs[0][0] if whole else templated_runs
        if last is not None and block == last:
            at_last[template] = value
            continue
        if template in seen and seen[template][1] != value:
            raise SystemExit(f"blocks {seen[template][0]} and {block} of {template} convert differently")
        seen[template] = (block, value)
        (names if whole else slices)[template] = value  # type: ignore[assignment]
    out: dict = {"names": names, "slices": slices, "transposed": transposed}
    if last is not None:
        differ = {t: v for t, v in at_last.items() if t not in seen or seen[t][1] != v}
        out["last"] = {"names": {t: v for t, v in differ.items() if isinstance(v, str)},
                       "slices": {t: v for t, v in differ.items() if not isinstance(v, str)}}
    return out


def build() -> str:
    """The text of ``adapterfmt/tables/single_file_tables.json``."""
    import diffusers

    doc = {
        "_comment": "GENERATED by scripts/gen_single_file_tables.py from the pinned diffusers: do not edit",
        "diffusers_version": diffusers.__version__,
        "kinds": {
            "flux": {"transformer": {"converter": "convert_flux_transformer_checkpoint_to_diffusers", **_flux()}},
            "sd1": {
                "unet": {"converter": "convert_ldm_unet_checkpoint", **_unet(_SD1_UNET, "model.diffusion_model.")},
                "text_encoder": {"converter": "convert_ldm_clip_checkpoint", **_clip(_CLIP_L, "cond_stage_model.transformer.")},
            },
            "sd2": {
                "unet": {"converter": "convert_ldm_unet_checkpoint", **_unet(_SD2_UNET, "model.diffusion_model.")},
                "text_encoder": {"converter": "convert_open_clip_checkpoint",
                                 **_open_clip(_OPEN_CLIP_H, "cond_stage_model.model.", projection=False, file_layers=24)},
            },
            "sdxl": {
                "unet": {"converter": "convert_ldm_unet_checkpoint", **_unet(_SDXL_UNET, "model.diffusion_model.")},
                "text_encoder": {"converter": "convert_ldm_clip_checkpoint", **_clip(_CLIP_L, "conditioner.embedders.0.transformer.")},
                "text_encoder_2": {"converter": "convert_open_clip_checkpoint", **_open_clip(_OPEN_CLIP_BIGG, "conditioner.embedders.1.model.")},
            },
            "wan": {"transformer": {"converter": "convert_wan_transformer_to_diffusers", **_wan()}},
            "sd3": {
                "transformer": {"converter": "convert_sd3_transformer_checkpoint_to_diffusers", **_sd3()},
                "text_encoder": {"converter": "convert_ldm_clip_checkpoint",
                                 **_sd3_clip(_SD3_CLIP_L, "text_encoders.clip_l.transformer.", identity_projection=True)},
                "text_encoder_2": {"converter": "convert_ldm_clip_checkpoint",
                                   **_sd3_clip(_SD3_CLIP_G, "text_encoders.clip_g.transformer.", identity_projection=False)},
            },
        },
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def main() -> int:
    text = build()
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {OUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
