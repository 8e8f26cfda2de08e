"""``adapterfmt targets``: preview which base modules a LoRA config would wrap."""

from __future__ import annotations

import re
from typing import Optional

import click

from adapterfmt.base.reading import read_base
from adapterfmt.reports.targets import TargetsReport, preview_targets
from adapterfmt.storage.gc_pause import with_gc_paused

from .base_options import PICKLE_HELP, base_options
from .check_cmd import parse_prefix_map
from .output import emit_report, table, warn

EXAMPLES = """
\b
Examples:
  adapterfmt targets --base testdata/tiny-llama --target-modules q_proj --target-modules v_proj
  adapterfmt targets --base testdata/tiny-llama --target-modules q_proj,v_proj --layers-to-transform 0
  adapterfmt targets --base my-model --target-regex '.*\\.(?!11)\\d+\\.fc1$' --json
"""

#: A list entry is a module name or dotted suffix, never a pattern.
_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_REGEX_FLAG = {"target_modules": "--target-regex", "exclude_modules": "--exclude-regex"}


def _names(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Optional[list[str]]:
    """Repeatable and comma-separated module names; anything that is not a dotted name is refused."""
    if not values:
        return None
    out = [v.strip() for value in values for v in value.split(",") if v.strip()]
    for v in out:
        if not _NAME.fullmatch(v):
            regex_flag = _REGEX_FLAG.get(param.name or "")
            hint = f"; for a regular expression use {regex_flag}" if regex_flag else ""
            raise click.BadParameter(f"{v!r} is not a module name or dotted suffix{hint}", ctx=ctx, param=param)
    return out


def _ints(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Optional[list[int]]:
    if not values:
        return None
    try:
        return [int(v) for value in values for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{values!r} are not layer indices (integers)", ctx=ctx, param=param) from None


def _regex(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    if value is not None:
        try:
            re.compile(value)
        except re.error as e:
            raise click.BadParameter(f"{value!r} is not a valid regular expression ({e})", ctx=ctx, param=param) from None
    return value


def render_targets(report: TargetsReport) -> str:
    """The human-readable preview (stdout)."""
    rows = [(t["module"], "x".join(map(str, t["shape"])), t["dtype"]) for t in report.lora_targets]
    lines = [table(rows, ("module", "weight shape", "dtype"))] if rows else []
    for entry, modules in report.full_copies.items():
        lines.append(f"full copy '{entry}': {', '.join(modules) or 'nothing'}")
    if report.excluded:
        lines.append(f"excluded ({len(report.excluded)}): {', '.join(report.excluded)}")
    copies = sum(len(m) for m in report.full_copies.values())
    lines.append(f"{len(report.lora_targets)} modules would get LoRA, {copies} would be saved in full")
    return "\n".join(lines)


@click.command("targets", epilog=EXAMPLES)
@click.option("--base", required=True, metavar="MODEL", help="Base model directory or Hub id (headers only).")
@click.option("--target-modules", multiple=True, callback=_names, metavar="NAME[,NAME...]",
              help="Module names or dotted suffixes, each matching a whole name or its end after a dot (repeatable).")
@click.option("--target-regex", callback=_regex, metavar="PATTERN",
              help="One regular expression that must match a whole module name (PEFT's string target_modules).")
@click.option("--exclude-modules", multiple=True, callback=_names, metavar="NAME[,NAME...]",
              help="Names or dotted suffixes never to target; exclusion always wins (repeatable).")
@click.option("--exclude-regex", callback=_regex, metavar="PATTERN", help="A regular expression of modules never to target.")
@click.option("--modules-to-save", multiple=True, callback=_names, metavar="NAME[,NAME...]",
              help="Modules saved in full; each must match exactly one module (repeatable).")
@click.option("--layers-to-transform", multiple=True, callback=_ints, metavar="N[,N...]",
              help="Only these layer indices, for name/suffix targets (repeatable).")
@click.option("--layers-pattern", multiple=True, metavar="NAME", help="Name of the layer list (e.g. layers, h) for --layers-to-transform.")
@base_options()
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@click.option(
    "--prefix-map",
    multiple=True,
    metavar="OLD=NEW",
    callback=parse_prefix_map,
    help="Show and match base modules starting with NEW as the adapter names them, starting with OLD (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@with_gc_paused  # header-only: millions of acyclic records for a big adapter, which the cyclic collector would walk again and again
def targets_command(
    base: str,
    target_modules: Optional[list[str]],
    target_regex: Optional[str],
    exclude_modules: Optional[list[str]],
    exclude_regex: Optional[str],
    modules_to_save: Optional[list[str]],
    layers_to_transform: Optional[list[int]],
    layers_pattern: tuple[str, ...],
    base_subfolder: Optional[str],
    base_revision: Optional[str],
    allow_pickle: bool,
    prefix_map: dict[str, str],
    as_json: bool,
) -> None:
    """Preview which modules of a base a LoRA config would wrap, with PEFT's matching rules.

    Module names come from the base's tensor keys (headers only); a module can carry LoRA when it
    has its own .weight. --target-modules entries are names, never patterns: an entry matches a
    module whose name equals it or ends with "." + entry. --target-regex must match the whole
    name (re.fullmatch). Give one or the other, not both; the same holds for --exclude-modules and
    --exclude-regex. --layers-to-transform applies to name targets only, as in PEFT.

    Exit status: 0 when at least one module would get LoRA; 1 when none would (PEFT refuses such
    a config); 2 on bad input, a modules_to_save entry matching several modules, or a module
    that is both a target and a module to save.
    """
    if (target_modules is None) == (target_regex is None):
        raise click.UsageError("give exactly one of --target-modules and --target-regex")
    if exclude_modules is not None and exclude_regex is not None:
        raise click.UsageError("give at most one of --exclude-modules and --exclude-regex")
    target = target_regex if target_regex is not None else target_modules
    if target_modules is not None and any(t.lower() == "all-linear" for t in target_modules):
        target = "all-linear"  # PEFT's keyword, not a module name: the library explains why it cannot be previewed
    report = preview_targets(
        read_base(base, subfolder=base_subfolder, revision=base_revision, allow_pickle=allow_pickle),
        base=base,
        target_modules=target,
        exclude_modules=exclude_regex if exclude_regex is not None else exclude_modules,
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        layers_pattern=list(layers_pattern) or None,
        prefix_map=prefix_map or None,
    )
    emit_report(report, render_targets, as_json=as_json)
    if not report.lora_targets:
        if not as_json:
            warn("no module would get LoRA; PEFT raises an error for this config")
        raise click.exceptions.Exit(1)
