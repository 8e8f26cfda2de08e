"""``adapterfmt check``: prove an adapter binds to a base model, from headers only."""

from __future__ import annotations

from typing import Any, Optional

import click

from adapterfmt.base.reading import read_base
from adapterfmt.base.resolution import resolve
from adapterfmt.formats.peft.reading import read_adapter
from adapterfmt.reports.check import CheckDocument, check_document, foreign_check_document
from adapterfmt.storage.gc_pause import with_gc_paused

from .base_options import ADAPTER_REVISION_HELP, PICKLE_HELP, WEIGHT_NAME_HELP, base_options, single_file_kind_option
from .main import done_without_teardown
from .output import emit_json, warn
from .render import check_text

EXAMPLES = """
\b
Examples:
  adapterfmt check --base testdata/tiny-llama --adapter testdata/tiny-llama-lora
  adapterfmt check --base my-vlm --adapter my-lora --prefix-map model.=language_model.model.
"""


def parse_prefix_map(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """``("OLD=NEW", ...)`` -> ``{OLD: NEW}``, in the order given (the first matching rewrite wins)."""
    out: dict[str, str] = {}
    for v in values:
        old, sep, new = v.partition("=")
        if not sep:
            raise click.BadParameter(f"{v!r} is not OLD=NEW (e.g. model.=language_model.model.)", ctx=ctx, param=param)
        out[old] = new
    return out


def foreign_check(ckpt: Any, adapter: str, base: str, component: Optional[str], single_file_kind: Optional[str] = None) -> CheckDocument:
    """A kohya / LyCORIS / diffusers file (or PEFT LoHa / LoKr directory) checked per component
    against ``base`` (a component or pipeline directory, a single-file checkpoint, or for PEFT the model)."""
    from adapterfmt.formats.diffusion.components import check_component, component_bases, read_component

    if ckpt.format == "peft":
        bases = {None: read_component(base)}
    else:
        bases = component_bases(ckpt, base, component, single_file_kind_override=single_file_kind)
    return foreign_check_document(ckpt, [check_component(ckpt, c, b) for c, b in bases.items()], adapter=adapter, base=base)


def peft_resolution(ckpt: Any, base: str, *, component: Optional[str], single_file_kind: Optional[str], base_subfolder: Optional[str],
                    base_revision: Optional[str], allow_pickle: bool, prefix_map: Optional[dict[str, str]]) -> tuple[Any, Any]:
    """``(base model, resolution)`` of a PEFT LoRA adapter: on a single-file checkpoint, bound to
    its component's tensors and rows (docs/BEHAVIOUR.md §7.6); else :func:`resolve` on the model."""
    from adapterfmt.single_file.checkpoint import read_single_file, single_file_kind as kind_of

    if kind_of(base, kind=single_file_kind) is not None:
        if base_subfolder or base_revision or prefix_map:
            raise click.UsageError("--subfolder, --base-revision and --prefix-map do not apply to a single-file checkpoint")
        from adapterfmt.single_file.peft import resolve_single_file

        model = read_single_file(base, kind=single_file_kind)
        return model, resolve_single_file(ckpt, model, component)[1]
    if component is not None:
        raise click.UsageError("--component applies to kohya/diffusers adapter files and single-file bases only")
    model = read_base(base, subfolder=base_subfolder, revision=base_revision, allow_pickle=allow_pickle)
    return model, resolve(ckpt, model, prefix_map=prefix_map or None)


def emit_check(doc: CheckDocument, *, as_json: bool) -> None:
    """The check document as JSON, or as text on stdout plus its warnings on stderr."""
    if as_json:
        emit_json(doc.as_dict())
        return
    click.echo(check_text(doc))
    for w in doc.warnings:
        warn(f"warning[{w.code}]: {w.message}")


@click.command("check", epilog=EXAMPLES)
@click.option("--base", required=True, metavar="MODEL", help="Base model: a model or pipeline directory, a weights file, or a Hub id (headers only).")
@click.option("--adapter", required=True, metavar="ADAPTER", help="Adapter directory, kohya/diffusers file, or Hub id.")
@click.option("--subfolder", metavar="NAME", help="Check the sub-adapter (or kohya/diffusers file) stored in <ADAPTER>/<NAME>/.")
@click.option("--weight-name", metavar="FILE", help=WEIGHT_NAME_HELP)
@click.option("--adapter-revision", metavar="REV", help=ADAPTER_REVISION_HELP)
@click.option(
    "--prefix-map",
    multiple=True,
    metavar="OLD=NEW",
    callback=parse_prefix_map,
    help="Rewrite adapter module paths starting with OLD to start with NEW before matching (repeatable).",
)
@base_options()
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@single_file_kind_option
@click.option("--component", metavar="NAME", help="kohya/diffusers files: the component --base stands for (unet, text_encoder, text_encoder_2, transformer). A PEFT adapter on a single-file checkpoint: the component it adapts, where its names and shapes fit several.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--strict", is_flag=True, help="Also exit 1 if there is any warning.")
@with_gc_paused  # header-only: millions of acyclic records for a big adapter, which the cyclic collector would walk again and again
def check_command(
    base: str,
    adapter: str,
    subfolder: Optional[str],
    weight_name: Optional[str],
    adapter_revision: Optional[str],
    prefix_map: dict[str, str],
    base_subfolder: Optional[str],
    base_revision: Optional[str],
    allow_pickle: bool,
    single_file_kind: Optional[str],
    component: Optional[str],
    as_json: bool,
    strict: bool,
) -> None:
    """Check that every adapter module resolves to exactly one base tensor with a matching shape.

    Reads config.json and safetensors headers only (no tensor values, no torch). Prints
    "N/N LoRA targets and M/M full copies resolved"; on failure lists the first unresolved
    names and, where one exists, the prefix rewrite that fixes them. Also warns where PEFT's
    plain endswith matching of modules_to_save would bind a different or more than one module.

    Exit status: 0 when everything resolves with matching shapes; 1 on zero or partial
    resolution, a shape error or a tensor the format does not explain (or, with --strict, any
    warning); 2 when an input cannot be read.

    A kohya / LyCORIS or diffusers LoRA file (or a PEFT LoHa / LoKr directory) is checked per
    component against a component or pipeline directory (docs/BEHAVIOUR.md §7.2); in a Hub repo
    it is read by HTTP range requests (header and alpha scalars only).
    """
    from adapterfmt.formats.locate import locate_foreign

    source = locate_foreign(adapter, subfolder=subfolder, weight_name=weight_name, revision=adapter_revision)
    if source is not None:
        doc = foreign_check(source.read(), adapter, base, component, single_file_kind)
        emit_check(doc, as_json=as_json)
        if not doc.ok or (strict and doc.warnings):
            raise click.exceptions.Exit(1)
        return
    ckpt = read_adapter(adapter, subfolder=subfolder, revision=adapter_revision, allow_pickle=allow_pickle)
    model, res = peft_resolution(ckpt, base, component=component, single_file_kind=single_file_kind, base_subfolder=base_subfolder,
                                 base_revision=base_revision, allow_pickle=allow_pickle, prefix_map=prefix_map)
    doc = check_document(res, adapter=adapter, base=base, prefix_map=prefix_map)
    emit_check(doc, as_json=as_json)
    done_without_teardown(ckpt, model, res, doc)
    if not doc.ok or (strict and doc.warnings):
        raise click.exceptions.Exit(1)
