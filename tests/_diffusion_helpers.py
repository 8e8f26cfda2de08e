"""Tiny diffusion components and real foreign adapter files for the diffusion-format tests.

Files are written by the oracles themselves: kohya / LyCORIS files by the ``lycoris-lora``
package (its kohya network on a tiny diffusers UNet and CLIP text encoders built from configs),
diffusers files by diffusers' own ``save_lora_weights`` from PEFT-injected models. Factors are
filled with random values (LyCORIS initialises one factor to zero, which would hide every error).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

#: LyCORIS targets for the tiny UNet: attention blocks, resnets (3x3 conv: LoCon) and samplers.
_PRESET = "adapterfmt-tiny"


def tiny_unet(seed: int = 0, cross_attention_dim: int = 16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4,
    ).eval()


def tiny_clip(seed: int = 1, *, projection: bool = False, hidden: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=24, num_attention_heads=2, num_hidden_layers=1,
                         vocab_size=100, projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _preset() -> str:
    from lycoris.config import PRESET

    PRESET[_PRESET] = dict(
        PRESET["full"], unet_target_module=["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"], unet_target_name=[]
    )
    return _PRESET


def lycoris_network(text_encoders: Any, unet: Any, *, algo: str, dim: int = 4, alpha: float = 2, seed: int = 3, **kwargs: Any):
    """A LyCORIS kohya network applied to ``unet`` and ``text_encoders`` (a model or a list for SDXL),
    with every factor random. Returns the network; its forward is the oracle."""
    import logging

    from lycoris.kohya import create_network

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    net = create_network(1.0, dim, alpha, None, text_encoders, unet, algo=algo, preset=_preset(), warn_on_unmatched=False, **kwargs)
    net.apply_to(text_encoders, unet, True, unet is not None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net


def lycoris_apply_file(file: str, unet: Any) -> Any:
    """LyCORIS's own kohya loader (``create_network_from_weights``) applied to ``unet``: its forward
    is then the oracle for the file."""
    from lycoris.config import PRESET
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    LycorisNetworkKohya.apply_preset(PRESET[_preset()])  # the class-level default preset double-lists time_embedding
    net, _ = create_network_from_weights(1.0, file, None, None, unet)
    net.apply_to(None, unet, False, True)
    return net


def save_lycoris(net: Any, path: str, dtype: Optional[torch.dtype] = None) -> str:
    net.save_weights(path, dtype, None)
    return path


def unet_inputs(seed: int = 5, cross: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 3, cross, generator=g)


def unet_out(unet: Any, seed: int = 5, cross: int = 16) -> torch.Tensor:
    sample, t, ctx = unet_inputs(seed, cross)
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=ctx).sample


def te_out(te: Any) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 17, 42, 1]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def save_component(model: Any, directory: str) -> str:
    """``save_pretrained`` into ``directory`` (diffusers: diffusion_pytorch_model.safetensors; transformers: model.safetensors)."""
    model.save_pretrained(directory)
    return directory


def merged_copy(model: Any, state: dict[str, torch.Tensor]) -> Any:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return m


def rel_err(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    """``|a - b|`` relative to the effect of the adapter ``|b - ref|``."""
    return float((a - b).abs().max() / (b - ref).abs().max().clamp_min(1e-12))


def assert_merged_like_fused(merged_dir: str, fused_model: Any, base_model: Any, n_modules: Optional[int] = None, tol: float = 1e-4) -> None:
    """Every merged weight in ``merged_dir`` equals diffusers' fused one (``fuse_lora``) relative to
    the LoRA's effect on it, and untouched weights are the base's; exactly ``n_modules`` weights
    changed when given (every module applied), else at least one."""
    from safetensors.torch import load_file

    ours = load_file(state_path(merged_dir))
    theirs = {k.replace(".base_layer.", "."): v for k, v in fused_model.state_dict().items() if "lora_" not in k}
    base = base_model.state_dict()
    changed = 0
    for k, v in ours.items():
        effect = (theirs[k] - base[k]).abs().max()
        if effect > 0:
            changed += 1
            assert (v - theirs[k]).abs().max() <= tol * effect, k
        else:
            assert torch.equal(v, base[k]), k
    assert changed == n_modules if n_modules is not None else changed > 0


def state_path(directory: str) -> str:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise FileNotFoundError(directory)


_CACHE: dict[str, Any] = {}


def sd_lora_case(root: Any) -> dict[str, Any]:
    """Built once per session (under ``root`` the first time): an SD-style kohya LoRA/LoCon file by
    LyCORIS (UNet incl. 3x3 convs + one CLIP text encoder; linear rank 4 alpha 2, conv rank 2
    alpha 3), the base components saved as a pipeline directory, and the LyCORIS outputs."""
    if "sd_lora" in _CACHE:
        return _CACHE["sd_lora"]
    import copy

    d = root
    unet, te = tiny_unet(), tiny_clip()
    base = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(te)}
    ref = {"unet": unet_out(unet), "text_encoder": te_out(te)}
    net = lycoris_network(te, unet, algo="lora", dim=4, alpha=2, conv_dim=2, conv_alpha=3)
    out = {"unet": unet_out(unet), "text_encoder": te_out(te)}
    f = save_lycoris(net, os.path.join(d, "sd_lora.safetensors"))
    pipe = os.path.join(d, "pipe")
    save_pipeline(pipe, base["unet"], base["text_encoder"], d)
    _CACHE["sd_lora"] = {"file": f, "dir": d, "pipe": pipe, "base": base, "ref": ref, "out": out}
    return _CACHE["sd_lora"]


def save_pipeline(directory: str, unet: Any, text_encoder: Any, scratch: str) -> str:
    """A complete tiny ``StableDiffusionPipeline`` saved by diffusers (VAE, tokenizer, scheduler too),
    so that ``DiffusionPipeline.from_pretrained`` loads it."""
    import json

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vocab, merges = os.path.join(scratch, "vocab.json"), os.path.join(scratch, "merges.txt")
    with open(vocab, "w") as f:
        json.dump({"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "b</w>": 4, "a": 5, "b": 6}, f)
    with open(merges, "w") as f:
        f.write("#version: 0.2\n")
    torch.manual_seed(7)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer(vocab, merges), unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(directory)
    return directory


def diffusers_fused(file: str, base: dict[str, Any]) -> dict[str, Any]:
    """diffusers' ``load_lora_weights`` + ``fuse_lora`` path on copies of the base components
    (the pipeline's loaders, called per component: ``lora_state_dict`` with its kohya conversion,
    ``load_lora_into_unet`` / ``load_lora_into_text_encoder``, then fuse)."""
    import copy

    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(file)
    out = {}
    for c, model in base.items():
        m = copy.deepcopy(model)
        if c == "unet":
            StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, unet=m)
            m.fuse_lora()
        else:
            StableDiffusionXLPipeline.load_lora_into_text_encoder(sd, alphas, text_encoder=m, prefix=c)
            fuse_text_encoder_lora(m)
        out[c] = m
    return out
