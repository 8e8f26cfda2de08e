"""The options that choose a base model inside a folder or repo, shared by every command with ``--base``."""

from __future__ import annotations

from typing import Any, Callable

import click

SUBFOLDER_HELP = "The base's component inside a diffusers pipeline or repo (e.g. unet, transformer, text_encoder)."
REVISION_HELP = "Hub revision of --base (branch, tag or commit)."
WEIGHT_NAME_HELP = (
    "kohya/diffusers: the .safetensors file inside the adapter folder or Hub repo (as diffusers' weight_name); "
    "default: pytorch_lora_weights.safetensors, else the only .safetensors file."
)
ADAPTER_REVISION_HELP = "Hub revision of the adapter (branch, tag or commit)."
PICKLE_HELP = (
    "Permit pickle weights (adapter_model.bin, pytorch_model.bin, diffusion_pytorch_model.bin), "
    "read with torch.load(weights_only=True)."
)


def base_options(*, subfolder_names: tuple[str, ...] = ("--base-subfolder",)) -> Callable[[Any], Any]:
    """``--base-subfolder`` (or the names given) and ``--base-revision``, as ``base_subfolder`` / ``base_revision``."""

    def decorate(f: Any) -> Any:
        f = click.option("--base-revision", "base_revision", metavar="REV", help=REVISION_HELP)(f)
        return click.option(*subfolder_names, "base_subfolder", metavar="NAME", help=SUBFOLDER_HELP)(f)

    return decorate


#: ``--single-file-kind`` (merge, check, inspect): a single-file checkpoint's kind where its keys cannot decide.
single_file_kind_option = click.option(
    "--single-file-kind",
    type=click.Choice(["flux", "sd1", "sd2", "sd3", "sdxl", "wan"]),
    help="A single-file checkpoint as --base: its kind, where the keys cannot decide (checked against them, never assumed).",
)
