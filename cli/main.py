"""The ``adapterfmt`` click group: wiring, lazy command import, and the one error handler.

Each command lives in its own module and is imported only when it runs, so ``adapterfmt
inspect`` never pays for torch. Every :class:`~adapterfmt.errors.AdapterFormatError` becomes one
``Error: ...`` line on stderr and exit code 2; other exceptions keep their traceback (bugs).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Optional

import click

from adapterfmt.constants import DEBUG
from adapterfmt.errors import AdapterFormatError

#: command name -> "module:attribute" (relative to this package)
COMMANDS: dict[str, str] = {
    "inspect": ".inspect_cmd:inspect_command",
    "check": ".check_cmd:check_command",
    "targets": ".targets_cmd:targets_command",
    "merge": ".merge_cmd:merge_command",
    "verify": ".verify_cmd:verify_command",
    "convert": ".convert_cmd:convert_command",
}


class AdapterFormatClickError(click.ClickException):
    """An AdapterFormatError shown as one line, exit code 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


class LazyGroup(click.Group):
    """Imports a command's module only when that command is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module_name, __package__), attr)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterFormatError as e:
            if DEBUG:
                raise
            raise AdapterFormatClickError(str(e)) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterfmt")
def cli() -> None:
    """Inspect, check, merge and load PEFT LoRA adapter checkpoints.

    Set ADAPTERFMT_DEBUG=1 to see full tracebacks.
    """


#: Set by a command whose output is committed and printed: the process may end without the
#: interpreter's teardown (torch's takes 0.4-0.9 s after a merge has finished).
skip_teardown = False


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point.

    After a successful merge (:data:`skip_teardown`), stdout and stderr are flushed and the
    process leaves with ``os._exit``: everything the merge wrote is already durable and renamed
    into place, so the interpreter's teardown has nothing left to do but cost time. Only this
    entry point does it; the click group called in-process (tests, other programs) never exits.
    """
    try:
        cli.main(args=argv, prog_name="adapterfmt")
    except SystemExit as e:
        if skip_teardown and e.code in (0, None):
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):  # a closed pipe: nothing more to flush
                    os._exit(1)
            os._exit(0)
        raise


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
