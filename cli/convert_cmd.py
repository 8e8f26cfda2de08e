"""``adapterfmt convert``: a wrapped ``PeftModel.state_dict()`` -> PEFT's adapter directory."""

from __future__ import annotations

from typing import Optional

import click

from .base_options import WEIGHT_NAME_HELP
from .output import emit_json, warn

EXAMPLES = """
\b
Examples:
  adapterfmt convert run/model.safetensors -o my-adapter --alpha 16
  adapterfmt convert run/ -o my-adapter --config train/adapter_config.json --base-out my-base
  adapterfmt convert run/pytorch_model.bin -o my-adapter --alpha 16 --adapter-name other --allow-pickle
  adapterfmt convert lora.safetensors --to peft -o unet-adapter --base sd/unet --component unet
  adapterfmt convert unet-adapter --to kohya -o lora.safetensors --base sd/unet --component unet
  adapterfmt convert user/sdxl-loras --weight-name style.safetensors --to peft -o unet-adapter --base sdxl/unet --component unet
"""


@click.command("convert", epilog=EXAMPLES)
@click.argument("wrapped", metavar="WRAPPED")
@click.option("-o", "--output", required=True, metavar="ADAPTER_DIR", help="Adapter directory to create (new or empty).")
@click.option("--adapter-name", metavar="NAME", help="Write only this adapter, at the top of ADAPTER_DIR.")
@click.option("--alpha", type=float, metavar="A", help="lora_alpha used in training (a state dict does not store it); applies to every adapter written.")
@click.option("--config", "config", metavar="CONFIG.json", help="The training run's adapter_config.json (alpha, alpha_pattern, rsLoRA, ...).")
@click.option("--base-out", metavar="BASE_DIR", help="Also write the plain base model the checkpoint carries.")
@click.option("--overwrite", is_flag=True, help="Replace non-empty output directories (only once the new ones are complete).")
@click.option("--allow-pickle", is_flag=True, help="Permit a .bin/.pt/.pth pickle (read with torch.load(weights_only=True)).")
@click.option("--to", "to", type=click.Choice(["peft", "kohya", "diffusers"]), help="Convert a kohya/diffusers file to a PEFT adapter (peft), or a PEFT adapter to a kohya or diffusers file.")
@click.option("--base", "base", metavar="COMPONENT_DIR", help="With --to: the component directory (or pipeline directory) the adapter belongs to; names are resolved against it.")
@click.option("--component", metavar="NAME", help="With --to: unet, text_encoder, text_encoder_2 or transformer.")
@click.option("--weight-name", metavar="FILE", help="With --to peft: " + WEIGHT_NAME_HELP)
@click.option("--revision", metavar="REV", help="With --to peft: Hub revision of the source repo (branch, tag or commit).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary instead of text.")
def convert_command(
    wrapped: str,
    output: str,
    adapter_name: Optional[str],
    alpha: Optional[float],
    config: Optional[str],
    base_out: Optional[str],
    overwrite: bool,
    allow_pickle: bool,
    to: Optional[str],
    base: Optional[str],
    component: Optional[str],
    weight_name: Optional[str],
    revision: Optional[str],
    as_json: bool,
) -> None:
    """Convert a wrapped PeftModel.state_dict() checkpoint into the adapter layout PEFT saves.

    WRAPPED is a .safetensors file, a model.safetensors.index.json (or a directory holding
    either), or with --allow-pickle a .bin/.pt/.pth, whose keys are PEFT's in-memory names
    (…lora_A.default.weight, …base_layer.weight, …modules_to_save.default.weight). The output is
    what save_pretrained writes: adapter_config.json rebuilt from the tensors (rank per module,
    target_modules, modules_to_save, use_dora) plus --alpha or --config, and
    adapter_model.safetensors. Without --adapter-name every adapter is written, `default` at
    the top and any other in ADAPTER_DIR/<name>/. The output appears only when complete; a
    non-empty one is refused unless --overwrite.

    With --to (docs/BEHAVIOUR.md §7.4): `--to peft` writes one component of a kohya / LyCORIS or
    diffusers LoRA file (a local file or folder, or a Hub repo: downloaded through the cache) as a
    PEFT adapter directory; `--to kohya|diffusers` writes a PEFT LoRA
    adapter of one component as a single .safetensors file that diffusers and LyCORIS load;
    `--to diffusers` also takes a local kohya / ComfyUI / XLabs LoRA file (Flux: fused names
    split as diffusers' converters split them).
    Both need --base (the component directory) and, where ambiguous, --component.

    Exit status: 0 on success; 2 when the input cannot be converted (one "Error:" line), e.g.
    without --alpha or --config, since guessing the scale would change the model.
    """
    if to != "peft" and (weight_name is not None or revision is not None):
        raise click.UsageError("--weight-name and --revision apply with --to peft only")
    if to is not None:
        _convert_foreign(wrapped, output, to=to, base=base, component=component, overwrite=overwrite, as_json=as_json,
                         wrapped_only=bool(adapter_name or alpha is not None or config or base_out or allow_pickle),
                         weight_name=weight_name, revision=revision)
        return
    if base is not None or component is not None:
        raise click.UsageError("--base and --component apply with --to only")
    if alpha is not None and config is not None:
        raise click.UsageError("give --alpha or --config, not both")
    from adapterfmt.convert.wrapped import convert_wrapped

    result = convert_wrapped(
        wrapped, output, adapter_name=adapter_name, alpha=alpha, config=config, base_out=base_out, allow_pickle=allow_pickle,
        overwrite=overwrite,
    )
    if as_json:
        emit_json(result.as_dict())
    else:
        for name, directory in result.adapters.items():
            click.echo(f"adapter '{name}': {directory}")
        if result.base_out:
            click.echo(f"base model: {result.base_out}")
        click.echo(f"{result.tensors} tensors, {result.nbytes:,} bytes written")
        for w in result.findings:
            warn(f"warning[{w.code}]: {w.message}")


def _convert_foreign(source: str, output: str, *, to: str, base: Optional[str], component: Optional[str], overwrite: bool,
                     as_json: bool, wrapped_only: bool, weight_name: Optional[str] = None, revision: Optional[str] = None) -> None:
    if wrapped_only:
        raise click.UsageError("--adapter-name, --alpha, --config, --base-out and --allow-pickle apply to wrapped checkpoints, not with --to")
    if base is None:
        raise click.UsageError("--to needs --base COMPONENT_DIR: names are resolved against the real modules")
    from adapterfmt.convert import foreign as foreign_convert

    if to == "peft":
        from adapterfmt.formats.locate import locate_foreign

        found = locate_foreign(source, weight_name=weight_name, revision=revision, download=True)
        path = found.path if found is not None and found.format != "peft" else source  # else to_peft says what it is
        result = foreign_convert.to_peft(path, output, base=base, component=component, overwrite=overwrite)
    else:
        if component is None:
            raise click.UsageError(f"--to {to} needs --component (the file's key prefix names it)")
        result = foreign_convert.from_peft(source, output, to=to, base=base, component=component, overwrite=overwrite)
    if as_json:
        emit_json(result.as_dict())
        return
    click.echo(f"{result.component}: {result.modules} modules, {result.tensors} tensors -> {result.output} ({result.to})")
    if result.folded:
        click.echo(f"folded the scale of {len(result.folded)} module(s) into lora_up (one alpha for the file)")
    for w in result.findings:
        warn(f"warning[{w.code}]: {w.message}")
