"""The ``adapterfmt`` click group: wiring, lazy command import, and the one error handler.

Each command lives in its own module and is imported only when it runs, so ``adapterfmt
inspect`` never pays for torch. Every :class:`~adapterfmt.errors.AdapterFormatError` becomes one
``Error: ...`` line on stderr and exit code 2; other exceptions keep their traceback (bugs).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
from typing import Any, Iterator, Optional

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
    "resize": ".resize_cmd:resize_command",
    "combine": ".combine_cmd:combine_command",
    "export": ".export_cmd:export_command",
    "extract": ".extract_cmd:extract_command",
    "verify-merge": ".verify_merge_cmd:verify_merge_command",
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
        with _signals_interrupt():
            try:
                return super().invoke(ctx)
            except AdapterFormatError as e:
                if DEBUG:
                    raise
                raise AdapterFormatClickError(str(e)) from None
            except KeyboardInterrupt as e:
                # the stack has unwound: every staging directory is removed, nothing is left behind
                signum = getattr(e, "signum", signal.SIGINT)
                click.echo(f"Error: interrupted by {signal.Signals(signum).name}; nothing was written", err=True)
                ctx.exit(128 + int(signum))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like SIGINT's KeyboardInterrupt so that staged output is removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


#: What ``docker stop``, systemd, job schedulers (SIGTERM), a closed terminal (SIGHUP) and Ctrl-C send.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP behave like SIGINT: an exception that unwinds the
    stack (and with it every staging directory). After the first one, further stop signals are
    ignored so the clean-up itself is never cut short. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}

    def stop(signum: int, frame: object) -> None:
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in _STOP_SIGNALS:
        if previous[s] is not signal.SIG_IGN:  # a signal ignored on purpose (nohup) stays ignored
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adapterfmt")
def cli() -> None:
    """Inspect, check, merge and load PEFT LoRA adapter checkpoints.

    Set ADAPTERFMT_DEBUG=1 to see full tracebacks.
    """


#: Set by a command whose output is committed and printed: the process may end without the
#: interpreter's teardown (torch's takes 0.4-0.9 s after a merge has finished).
skip_teardown = False
#: Whether :func:`main` (the console script) runs the command: only then does it end by ``os._exit``.
_in_console_script = False
#: What :func:`done_without_teardown` keeps alive until ``os._exit``.
_kept_until_exit: list[Any] = []


def done_without_teardown(*records: Any) -> None:
    """The command's output is committed and printed: the console script may leave without the
    interpreter's teardown.

    ``records`` (an adapter's description, a report) are kept alive until then: freeing the
    millions of objects of a 100k-module adapter one by one, or a last cyclic collection walking
    them, costs 0.2-0.6 s, for a process that is about to end. Called in-process (tests, other
    programs), nothing is kept.
    """
    global skip_teardown
    skip_teardown = True
    if _in_console_script:
        _kept_until_exit.extend(records)
        gc.freeze()  # and no collection walks them again on the way out (0.2 s for 100k modules)


def freeze_imported_objects() -> None:
    """In the console script, take every object that exists now (a fresh torch import's ~10^5)
    out of the cyclic collector's reach: the module objects live until the process ends anyway,
    and the first collection after the import otherwise walks them all (0.06 s). Called
    in-process (tests, other programs), nothing is frozen."""
    if _in_console_script:
        gc.freeze()


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point.

    After a successful merge, inspect or check (:func:`done_without_teardown`), stdout and stderr
    are flushed and the process leaves with ``os._exit``: what the command wrote is already
    printed, or durable and renamed into place, so the interpreter's teardown has nothing left to
    do but cost time. Only this entry point does it; the click group called in-process (tests,
    other programs) never exits.
    """
    global _in_console_script
    _in_console_script = True
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
    # ``python -m adapterfmt_cli.main`` runs this file as a second copy of the module, named
    # __main__; the commands import adapterfmt_cli.main and set its flags (done_without_teardown),
    # so run that module's main, as the console script does, or the flags are set where nobody reads them.
    importlib.import_module(__spec__.name if __spec__ is not None else "adapterfmt_cli.main").main(sys.argv[1:])
