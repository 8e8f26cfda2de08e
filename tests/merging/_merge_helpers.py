"""Builders and oracles for the merge tests: tiny models made in code, PEFT's merge_and_unload as truth."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


def save_adapter(model: torch.nn.Module, config: Any, adapter_dir: Path, *, seed: int = 1) -> None:
    """Wrap ``model`` with PEFT (in place), make full copies and token rows differ from the base, save."""
    from peft import get_peft_model

    seeded(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".modules_to_save." in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(str(adapter_dir))


def peft_merged(base_loader: Callable[[], torch.nn.Module], adapter_dirs: list[Path], *, scales: Optional[list[float]] = None) -> torch.nn.Module:
    """PEFT's merge of ``adapter_dirs`` (in order) into a fresh base; ``scales`` multiply each adapter's scaling."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_loader(), str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    if scales is not None:
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict):
                for name, factor in zip(names, scales):
                    if name in scaling:
                        scaling[name] *= factor
    model.base_model.set_adapter(names)
    return model.merge_and_unload()


def read_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in ``directory``."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(str(directory / name)))
    return out


def unequal(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in dtype, shape or any bit (keys of ``ref`` missing from ``ours`` included)."""
    return [k for k, v in ref.items() if k not in ours or ours[k].dtype != v.dtype or not torch.equal(ours[k], v)]


def save_module(module: torch.nn.Module, directory: Path) -> None:
    """A plain ``nn.Module`` saved as a base model directory (``model.safetensors``, no config)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})


def tree_digest(*dirs: Path) -> dict[str, str]:
    """sha256 of every file under ``dirs``: inputs must come out of a merge unchanged."""
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


class ConvEmbed(torch.nn.Module):
    """A custom model with the layer kinds transformers models lack: Conv2d 3x3 and 1x1, Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 6)
        self.conv3 = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 6, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (B, H, W, C)
        x = x.permute(0, 3, 1, 2)
        return self.conv1(torch.relu(self.conv3(x)))


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    """A small adapter written by hand (keys as PEFT saves them), for plan-level refusals."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    doc = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **config}
    (directory / "adapter_config.json").write_text(json.dumps(doc))
    return directory


def lora_pair(module: str, out_features: int, in_features: int, r: int = 2) -> dict[str, torch.Tensor]:
    """Saved ``lora_A`` / ``lora_B`` tensors of one linear module."""
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": torch.randn(r, in_features), f"{prefix}.lora_B.weight": torch.randn(out_features, r)}
