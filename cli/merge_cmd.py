"""``adapterfmt merge``: fold LoRA adapters into a base model and write a model directory."""

from __future__ import annotations

from typing import Any, Optional

import click

from .base_options import PICKLE_HELP, WEIGHT_NAME_HELP, base_options, single_file_kind_option
from .check_cmd import parse_prefix_map
from .main import done_without_teardown, freeze_imported_objects
from .output import emit_json, progress_enabled, warn

EXAMPLES = """
\b
Examples:
  adapterfmt merge --base testdata/tiny-llama --adapter testdata/tiny-llama-lora -o merged
  adapterfmt merge --base M --adapter a --adapter b --weight 0.7 --weight 0.3 -o merged --dtype bf16
  adapterfmt merge --base M --adapter A -o merged --max-shard-size 2GB --verify --json
  adapterfmt merge --base PIPELINE --subfolder unet --adapter A -o merged-pipeline
  adapterfmt merge --wrapped run/model.safetensors --alpha 16 -o merged
"""


def _foreign_adapter(adapters: tuple[str, ...], *, weight_name: Optional[str], revision: Optional[str]) -> Any:
    """The one --adapter when it is a kohya / diffusers file or a PEFT LoHa / LoKr directory, local
    or on the Hub (downloaded through the cache), as a ``ForeignSource``; several adapters: none may be."""
    from adapterfmt.formats.locate import locate_foreign

    if weight_name is not None and len(adapters) != 1:
        raise click.UsageError("--weight-name names the file of one --adapter")
    found = [s for s in (locate_foreign(a, weight_name=weight_name, revision=revision, download=True) for a in adapters) if s is not None]
    if found and len(adapters) > 1:
        raise click.UsageError("a kohya/diffusers adapter file merges alone: give one --adapter")
    return found[0] if found else None


def _report_foreign(result: Any, *, quiet: bool, as_json: bool) -> None:
    if not quiet:
        for s in result.components.values():
            for f in s.findings:
                warn(f"warning [{f.code}]: {f.message}")
    if as_json:
        emit_json(result.as_dict())
        return
    for c, s in result.components.items():
        click.echo(f"{c}: {s.output}: {s.tensors_merged} tensors merged, {s.tensors_copied + s.tensors_converted} copied")
    if result.copied:
        click.echo(f"{result.output}: copied {', '.join(result.copied)}")


class _Bar:
    """A tqdm bar over bytes on stderr, created on the first report (when the total is known)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, n: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge", leave=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.command("merge", epilog=EXAMPLES)
@click.option("--base", metavar="MODEL", help="Base model: a model or pipeline directory, a weights file, or a Hub id; or a wrapped checkpoint (as --wrapped).")
@click.option("--adapter", "adapters", multiple=True, metavar="ADAPTER", help="Adapter directory, kohya/diffusers file, or Hub id (repeatable; merged in order).")
@click.option("--weight-name", metavar="FILE", help=WEIGHT_NAME_HELP)
@click.option("--adapter-revision", metavar="REV", help="Hub revision of every --adapter that is a Hub id (branch, tag or commit).")
@click.option("--wrapped", metavar="WRAPPED", help="A wrapped PeftModel.state_dict() checkpoint: merge its adapter into the base it carries.")
@click.option("--adapter-name", metavar="NAME", help="With --wrapped: the adapter to merge (default: 'default' or the only one).")
@click.option("--alpha", type=float, metavar="A", help="With --wrapped: the lora_alpha used in training (a state dict does not store it).")
@click.option("--config", "adapter_config", metavar="CONFIG.json", help="With --wrapped: the training run's adapter_config.json.")
@click.option("--weight", "weights", multiple=True, type=float, help="Weight of each adapter's LoRA deltas, one per --adapter (default 1.0 each).")
@click.option("-o", "--output", required=True, metavar="OUT", help="Output directory (must not be inside an input).")
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    help="Dtype of every floating-point tensor of the output (default: the base's own).",
)
@click.option("--max-shard-size", metavar="SIZE", help="Re-shard the output (e.g. 5GB); default: the base's shard layout.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty (atomically).")
@click.option("--allow-unused", is_flag=True, help="Merge what resolves; skip adapter modules that match no base tensor.")
@base_options(subfolder_names=("--subfolder", "--base-subfolder"))
@click.option(
    "--prefix-map",
    multiple=True,
    metavar="OLD=NEW",
    callback=parse_prefix_map,
    help="Rewrite adapter module paths starting with OLD to start with NEW before matching (repeatable; the first match wins).",
)
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@click.option("--component", metavar="NAME", help="kohya/diffusers adapter files: the component to merge (unet, text_encoder, text_encoder_2, transformer); needed when --base is one component directory and the file adapts several. A PEFT adapter on a single-file checkpoint: the component it adapts, where its names and shapes fit several.")
@single_file_kind_option
@click.option("--verify", is_flag=True, help="Verify the output's files before moving it into place.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
def merge_command(
    base: Optional[str],
    adapters: tuple[str, ...],
    weight_name: Optional[str],
    adapter_revision: Optional[str],
    wrapped: Optional[str],
    adapter_name: Optional[str],
    alpha: Optional[float],
    adapter_config: Optional[str],
    weights: tuple[float, ...],
    output: str,
    dtype: Optional[str],
    max_shard_size: Optional[str],
    overwrite: bool,
    allow_unused: bool,
    base_subfolder: Optional[str],
    base_revision: Optional[str],
    prefix_map: dict[str, str],
    allow_pickle: bool,
    component: Optional[str],
    single_file_kind: Optional[str],
    verify: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Merge LoRA adapters into a base model and write a model directory of the same kind.

    OUT mirrors the base: a transformers, diffusers or sentence-transformers directory with the
    same weight file names, shards and index and every other file copied; with --subfolder the
    whole diffusers pipeline, that component merged; a loose weights file becomes the layout's
    standard name beside its own config and tokenizer files.

    Plans from headers first: any adapter module that matches no base tensor, any shape
    mismatch or unsupported feature stops the merge before anything is written. Then streams
    tensor by tensor (untouched tensors are copied byte for byte) into a temporary directory
    beside OUT, which is renamed into place only when complete.

    With --wrapped (or a wrapped checkpoint as --base and no --adapter) the base and the adapter
    both come from one PeftModel.state_dict() save; --alpha or --config is then required.

    A kohya / LyCORIS or diffusers LoRA file as --adapter merges into a diffusers pipeline
    directory (every component the file adapts; the rest copied) or into one component
    directory (--component picks that part of the file), see docs/BEHAVIOUR.md §7.3; or into a
    single-file checkpoint (Flux.1, SD 1.x, SD 2.x, SDXL, SD3, Wan; OUT is FILE.safetensors, the same
    file back), see docs/BEHAVIOUR.md §7.6. So do PEFT LoRA adapters of diffusers components (each
    one's component decided by its module names, or --component).
    """
    from adapterfmt.storage.gc_pause import gc_paused

    with gc_paused():  # importing torch builds ~10^5 objects: the cyclic collector's passes over them cost ~0.2 s
        from adapterfmt import merge_to_directory

        freeze_imported_objects()  # or the first collection after the pause walks them all
    from adapterfmt.formats.wrapped.reading import is_wrapped_checkpoint

    if wrapped is None and base is not None and not adapters and is_wrapped_checkpoint(base):
        wrapped, base = base, None
    if wrapped is not None and (base is not None or adapters or weights):
        raise click.UsageError("--wrapped carries its own base and adapters: give it without --base, --adapter and --weight")
    if wrapped is None and (base is None or not adapters):
        raise click.UsageError("give --base and --adapter, or --wrapped")
    if wrapped is not None and (base_subfolder or base_revision):
        raise click.UsageError("--subfolder and --base-revision apply to --base only")
    if wrapped is None and (adapter_name or alpha is not None or adapter_config):
        raise click.UsageError("--adapter-name, --alpha and --config apply to --wrapped only")
    if wrapped is not None and (weight_name or adapter_revision):
        raise click.UsageError("--weight-name and --adapter-revision apply to --adapter only")
    bar = _Bar(progress_enabled(quiet))
    try:
        options: dict[str, Any] = dict(
            dtype=dtype,
            max_shard_size=int(max_shard_size) if max_shard_size and max_shard_size.isdigit() else max_shard_size,
            overwrite=overwrite,
            allow_unused=allow_unused,
            allow_pickle=allow_pickle,
            verify=verify,
            progress=bar,
        )
        foreign = _foreign_adapter(adapters, weight_name=weight_name, revision=adapter_revision) if wrapped is None else None
        if foreign is not None and foreign.format == "peft":  # PEFT's LoHa / LoKr
            from adapterfmt.merging.foreign import merge_peft_lycoris

            if weights or component:
                raise click.UsageError("--weight and --component do not apply to a PEFT LoHa/LoKr adapter")
            summary = merge_peft_lycoris(base, foreign.path, output, subfolder=base_subfolder, revision=base_revision, **options)
        elif foreign is not None:
            if weights or base_revision:
                raise click.UsageError("--weight and --base-revision do not apply to a kohya/diffusers adapter file")
            if component and base_subfolder and component != base_subfolder:
                raise click.UsageError("--component and --subfolder name different components")
            from adapterfmt.merging.foreign import merge_foreign

            options.pop("allow_pickle")
            # --subfolder C of a pipeline base: that component merged, the whole pipeline written
            result = merge_foreign(base, foreign.path, output, component=component or base_subfolder, single_file_kind=single_file_kind, **options)
            _report_foreign(result, quiet=quiet, as_json=as_json)
            return
        elif wrapped is None and (single := _single_file_base(base, single_file_kind)) is not None:
            # PEFT LoRA adapters of diffusers components into a single-file checkpoint (BEHAVIOUR §7.6)
            from adapterfmt.merging.single_file_peft import merge_peft_into_single_file

            if base_subfolder or base_revision:
                raise click.UsageError("--subfolder and --base-revision do not apply to a single-file checkpoint")
            summary = merge_peft_into_single_file(
                single, _peft_adapters(adapters, adapter_revision, allow_pickle), output, component=component, weights=list(weights) or None,
                prefix_map=prefix_map or None, **options,
            )
        elif component is not None:
            raise click.UsageError("--component applies to kohya/diffusers adapter files and single-file bases only")
        elif wrapped is not None:
            from adapterfmt.convert.wrapped import merge_wrapped

            summary = merge_wrapped(wrapped, output, adapter_name=adapter_name, alpha=alpha, config=adapter_config, **options)
        else:
            summary = merge_to_directory(
                base,
                _peft_adapters(adapters, adapter_revision, allow_pickle),
                output,
                weights=list(weights) or None,
                subfolder=base_subfolder,
                revision=base_revision,
                prefix_map=prefix_map or None,
                **options,
            )
    finally:
        bar.close()
    if not quiet:
        for path in summary.removed_stale:
            warn(f"removed the leftover of an interrupted merge: {path}")
        for note in summary.notes:
            warn(f"note: {note}")
        for name in summary.skipped:
            warn(f"skipped (matches nothing in the base model): {name}")
        for key in summary.untied:
            warn(f"wrote the tied head '{key}' separately and set tie_word_embeddings to false")
        for f in summary.findings:
            warn(f"warning [{f.code}]: {f.message}")
    done_without_teardown()  # the output is committed
    if as_json:
        emit_json(summary.as_dict())
        return
    from adapterfmt.storage.staging import format_bytes

    click.echo(
        f"{summary.output}: {summary.tensors_merged} tensors merged, {summary.tensors_replaced} replaced, "
        f"{summary.tensors_copied + summary.tensors_converted} copied"
        f"{f' ({summary.tensors_converted} converted)' if summary.tensors_converted else ''}; "
        f"{format_bytes(summary.bytes_written)} in {summary.seconds:.1f} s"
    )
    labels = {"lora_modules": "LoRA modules", "full_copies": "full copies", "base_tensors": "saved base tensors", "token_rows": "token-row tensors"}
    for n, applied in enumerate(summary.applied, 1):
        parts = [f"{done}/{total} {labels[k]}" for k, (done, total) in applied.items() if total or k == "lora_modules"]
        click.echo(f"adapter {n}: {', '.join(parts)} applied")


def _single_file_base(base: Optional[str], kind: Optional[str]) -> Any:
    """The single-file checkpoint ``base`` is (:class:`~adapterfmt.single_file.checkpoint.SingleFileBase`), or ``None``."""
    from adapterfmt.single_file.checkpoint import read_single_file, single_file_kind

    if base is None or single_file_kind(base, kind=kind) is None:
        return None
    return read_single_file(base, kind=kind)


def _peft_adapters(adapters: tuple[str, ...], revision: Optional[str], allow_pickle: bool) -> list[Any]:
    """The --adapter specs for the merge engine; read here only when --adapter-revision applies."""
    if revision is None:
        return list(adapters)
    from adapterfmt.formats.peft.reading import read_adapter

    return [read_adapter(a, revision=revision, allow_pickle=allow_pickle) for a in adapters]
