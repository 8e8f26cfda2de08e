"""Shared helpers for hardening tests: input hashing, deadlines, CLI runs.

Any test that reads a checkpoint can prove it left its inputs alone::

    from _hardening_helpers import inputs_untouched

    def test_something(tmp_path):
        with inputs_untouched("testdata/tiny-llama", "testdata/tiny-llama-lora"):
            run_the_thing()

or take the ``untouched`` fixture by importing it into the test module
(``from _hardening_helpers import untouched  # noqa: F401``) and calling
``untouched(path, ...)`` before the work; it compares at teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTDATA = ROOT / "testdata"
#: Runs the CLI with a pause hook installed (crash tests): ``PAUSE_CLI POINT MARKER SECONDS cli ARGS...``.
PAUSE_CLI = ROOT / "tests" / "_pause_cli.py"
#: Seconds any single bad-input command may take before it counts as a hang.
HANG_SECONDS = 60


# ---------------------------------------------------------------------------------------------
# INPUTS UNTOUCHED
# ---------------------------------------------------------------------------------------------


def tree_digest(*paths: "str | os.PathLike[str]") -> dict[str, str]:
    """``{path: fingerprint}`` for every entry under ``paths``: sha256 of files, target of symlinks,
    ``dir`` for directories (so added or removed files show up, not only changed bytes)."""
    out: dict[str, str] = {}
    for top in paths:
        top = os.fspath(top)
        if os.path.islink(top) or not os.path.isdir(top):
            out[top] = _fingerprint(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            out[dirpath] = "dir"
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                if name in dirnames and not os.path.islink(full):
                    continue
                out[full] = _fingerprint(full)
    return out


def _fingerprint(path: str) -> str:
    if os.path.islink(path):
        return "link:" + os.readlink(path)
    if not os.path.exists(path):
        return "missing"
    if not os.path.isfile(path):
        return "special"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assert_same_digest(before: dict[str, str], after: dict[str, str]) -> None:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"inputs were modified: {changed[:10]}"


@contextlib.contextmanager
def inputs_untouched(*paths: "str | os.PathLike[str]") -> Iterator[dict[str, str]]:
    """Assert that nothing under ``paths`` changes (bytes, names, links) inside the block."""
    before = tree_digest(*paths)
    yield before
    assert_same_digest(before, tree_digest(*paths))


@pytest.fixture
def untouched() -> Iterator[Callable[..., None]]:
    """``untouched(path, ...)`` records digests now; the test fails at teardown if any changed."""
    watched: list[tuple[tuple[str, ...], dict[str, str]]] = []

    def watch(*paths: "str | os.PathLike[str]") -> None:
        names = tuple(os.fspath(p) for p in paths)
        watched.append((names, tree_digest(*names)))

    yield watch
    for names, before in watched:
        assert_same_digest(before, tree_digest(*names))


# ---------------------------------------------------------------------------------------------
# DEADLINES AND CLI RUNS
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` if the block runs longer than ``seconds`` (main thread, POSIX)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: treated as a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass(frozen=True)
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    #: the exception that escaped the command (a bug: click would print a traceback), if any
    exception: Optional[BaseException] = None

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def invoke_cli(args: Sequence[str], *, timeout: float = HANG_SECONDS) -> CliResult:
    """Run ``adapterfmt ARGS`` in-process with click's runner, under a deadline."""
    from click.testing import CliRunner

    from adapterfmt_cli.main import cli

    with deadline(timeout):
        result = CliRunner().invoke(cli, list(args), catch_exceptions=True)
    escaped = result.exception if result.exception is not None and not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.stdout, result.stderr, escaped)


def invoke_cli_process(
    args: Sequence[str], *, timeout: float = HANG_SECONDS, env: Optional[dict[str, str]] = None, memory_limit: Optional[int] = None
) -> CliResult:
    """Run ``adapterfmt ARGS`` in a fresh process (optionally with an address-space limit in bytes)."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    proc = subprocess.run(
        [sys.executable, "-m", "adapterfmt_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=limit if memory_limit else None,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)
