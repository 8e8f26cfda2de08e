"""The bad-input corpus (``tests/make_bad_inputs.py``) through inspect, check, merge, verify and load.

We test, for every case and every command that applies to it:
  * the documented answer: CLI exit code (2 = cannot read the input; 1 = problems found, for
    ``check``/``verify``; 0 = ``inspect`` reporting a warning by design), ``load`` raising an
    ``AdapterFormatError`` subclass;
  * exit 2 prints exactly one ``Error:`` line on stderr naming the file (and key), never a
    traceback, within a deadline (no hang);
  * inputs are byte-for-byte unchanged, a failed merge leaves nothing beside ``OUT``, a failed load
    leaves the model as it was, and no pickle payload ever runs;
  * reading the headers of every case stays within a small, fixed memory budget.
A summary test then asserts the whole table at once.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import pytest

import make_bad_inputs as corpus
from _hardening_helpers import HANG_SECONDS, deadline, invoke_cli, invoke_cli_process, tree_digest

#: (case, command) pairs, from the static case table.
PAIRS = [(name, command) for name, (spec, _) in corpus.CASES.items() for command in spec.expect]
#: Peak Python allocation allowed while reading one case's headers (the files are < 150 KiB).
HEADER_MEMORY_BUDGET = 4 << 20


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, corpus.Case]:
    root = tmp_path_factory.mktemp("bad-inputs")
    return {c.name: c for c in corpus.build_corpus(root)}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where merges write (outside the corpus, so a stray write into an input is caught)."""
    return tmp_path_factory.mktemp("merge-outputs")


@dataclass(frozen=True)
class Outcome:
    """What one command did with one case."""

    code: object  #: exit code, or "ok"/"error" for load
    stdout: str = ""
    stderr_lines: tuple[str, ...] = ()
    escaped: Optional[BaseException] = None  #: an exception that is not AdapterFormatError (a bug)
    message: str = ""  #: load: the error text
    error_type: str = ""  #: load: the error class
    changed: tuple[str, ...] = ()  #: input paths whose bytes or names changed
    left_behind: tuple[str, ...] = ()  #: merge: entries beside OUT after the run
    model_changed: bool = False  #: load: the model differs after a failed load
    output_problems: tuple[str, ...] = ()  #: merge: what verify finds in a successful OUT


def _args(case: corpus.Case, command: str, out: Path) -> list[str]:
    pickle = ["--allow-pickle"] if case.allow_pickle else []
    if command == "inspect":
        return ["inspect", case.adapter, "--json", *pickle, *(["--scan"] if case.scan else [])]
    if command == "check":
        return ["check", "--base", case.base, "--adapter", case.adapter, *pickle]
    if command == "merge":
        return ["merge", "--base", case.base, "--adapter", case.adapter, "-o", str(out), "--quiet", *pickle]
    if command == "verify":
        return ["verify", case.directory]
    raise AssertionError(command)


def _watched(case: corpus.Case) -> list[str]:
    return [case.adapter, case.base, str(Path(case.directory).parent)]


#: (case, command) -> outcome: each pair runs once, for its own test and for the summary.
_OUTCOMES: dict[tuple[str, str], Outcome] = {}


def _run(case: corpus.Case, command: str, outputs: Path) -> Outcome:
    if (case.name, command) not in _OUTCOMES:
        before = tree_digest(*_watched(case))
        outcome = _load(case) if command == "load" else _cli(case, command, outputs / f"{case.name}-{command}")
        after = tree_digest(*_watched(case))
        changed = tuple(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))
        _OUTCOMES[case.name, command] = replace(outcome, changed=changed)
    return _OUTCOMES[case.name, command]


def _cli(case: corpus.Case, command: str, parent: Path) -> Outcome:
    from adapterfmt.reports.verify import verify_directory

    parent.mkdir()
    out = parent / "OUT"
    result = invoke_cli(_args(case, command, out))
    left = tuple(sorted(os.listdir(parent))) if result.exit_code != 0 else ()
    problems = tuple(f.message for f in verify_directory(out)) if command == "merge" and result.exit_code == 0 else ()
    return Outcome(result.exit_code, result.stdout, tuple(result.stderr_lines), result.exception, left_behind=left, output_problems=problems)


@functools.lru_cache(maxsize=1)
def _pristine_model() -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.from_pretrained(corpus.TESTDATA / corpus.BASE)).eval()


def _load(case: corpus.Case) -> Outcome:
    import torch

    import adapterfmt

    pristine = _pristine_model()
    model = copy.deepcopy(pristine)
    kwargs = {"allow_pickle": True} if case.allow_pickle else {}
    try:
        with deadline(HANG_SECONDS):
            adapterfmt.load(model, case.adapter, **kwargs)
    except adapterfmt.AdapterFormatError as e:
        reference = pristine.state_dict()
        state = model.state_dict()
        changed = state.keys() != reference.keys() or any(not torch.equal(state[k], reference[k]) for k in state)
        return Outcome("error", message=str(e), error_type=type(e).__name__, model_changed=changed)
    except Exception as e:  # noqa: BLE001 - anything else is the bug this test looks for
        return Outcome("escaped", escaped=e, message=f"{type(e).__name__}: {e}")
    return Outcome("ok")


def _problems(case: corpus.Case, command: str, o: Outcome) -> list[str]:
    """Everything wrong with one outcome, as short phrases (empty: as documented)."""
    want = case.expect[command]
    out = []
    if o.escaped is not None:
        out.append(f"escaped {type(o.escaped).__name__}: {o.escaped}")
    if o.code != want:
        detail = o.message or (o.stderr_lines[-1] if o.stderr_lines else o.stdout[-200:])
        out.append(f"answered {o.code!r}, documented {want!r} ({detail})")
    if o.changed:
        out.append(f"modified inputs {list(o.changed)[:3]}")
    if case.marker and os.path.exists(case.marker):
        out.append("the pickle payload ran")
    if want == 2:
        lines = o.stderr_lines
        if len(lines) != 1 or not lines[0].startswith("Error: "):
            out.append(f"stderr is not one 'Error:' line: {list(lines)[:4]}")
        elif case.file not in lines[0] or (case.key and case.key not in lines[0]):
            out.append(f"error line does not name {case.file!r}" + (f" and {case.key!r}" if case.key else "") + f": {lines[0]}")
    if command == "merge" and o.code != 0 and o.left_behind:
        out.append(f"failed merge left {list(o.left_behind)} beside OUT")
    if o.output_problems:
        out.append(f"merged OUT fails verify: {list(o.output_problems)[:2]}")
    if command == "load" and want == "error" and o.code == "error":
        if "\n" in o.message or case.file not in o.message or (case.key and case.key not in o.message):
            out.append(f"load error does not name {case.file!r}" + (f" and {case.key!r}" if case.key else "") + f" in one line: {o.message}")
        if case.error and o.error_type != case.error:
            out.append(f"load raised {o.error_type}, documented {case.error}")
        if o.model_changed:
            out.append("failed load left the model changed")
    if command == "inspect" and want == 0 and case.finding:
        codes = [w["code"] for w in json.loads(o.stdout or "{}").get("warnings", [])]
        if case.finding not in codes:
            out.append(f"inspect --json warnings {codes} lack {case.finding!r}")
    if command in ("check", "verify") and want == 1 and o.code == 1 and case.file not in o.stdout and (case.key or "") not in o.stdout:
        out.append(f"{command} output names neither {case.file!r} nor the key: {o.stdout[-300:]}")
    return out


def test_corpus_is_large_and_covers_every_fault_family() -> None:
    names = list(corpus.CASES)
    assert len(names) >= 30
    assert sum(any(code == 2 for code in spec.expect.values()) for spec, _ in corpus.CASES.values()) >= 30
    for family in ("st-", "shard-", "lora-", "key-", "config-", "config-type-", "pattern-", "index-", "pickle-", "non-finite", "empty-adapter"):
        assert any(n.startswith(family) for n in names), family


@pytest.mark.parametrize("name, command", PAIRS, ids=[f"{n}-{c}" for n, c in PAIRS])
def test_bad_input(name: str, command: str, built: dict[str, corpus.Case], outputs: Path) -> None:
    """One case through one command answers as documented in the case table."""
    case = built[name]
    problems = _problems(case, command, _run(case, command, outputs))
    assert not problems, f"{name} / {command}: " + "; ".join(problems)


def test_summary_every_case_answers_as_documented(built: dict[str, corpus.Case], outputs: Path) -> None:
    """The acceptance table: every case, every command; exit 2 means one line naming the file."""
    failures = []
    for name, command in PAIRS:
        case = built[name]
        failures += [f"{name:26} {command:8} {p}" for p in _problems(case, command, _run(case, command, outputs))]
    assert not failures, f"{len(failures)} of {len(PAIRS)} runs differ from the case table:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", list(corpus.CASES))
def test_headers_are_read_in_bounded_memory(name: str, built: dict[str, corpus.Case]) -> None:
    """Describing a case from headers never allocates more than a few MiB (size bombs included)."""
    from adapterfmt import AdapterFormatError, read_adapter, read_base

    case = built[name]
    tracemalloc.start()
    try:
        with deadline(HANG_SECONDS):
            for read in (lambda: read_adapter(case.adapter), lambda: read_base(case.base)):
                try:
                    read()
                except AdapterFormatError:
                    pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < HEADER_MEMORY_BUDGET, f"{name}: {peak} bytes"


@pytest.mark.parametrize("name", ["st-header-over-100mb", "st-huge-shape", "st-header-nested", "st-fifo"])
def test_size_bombs_in_a_real_process_with_a_memory_cap(name: str, built: dict[str, corpus.Case]) -> None:
    """The installed CLI, under a 1 GiB address-space cap: one error line, exit 2, no hang."""
    case = built[name]
    result = invoke_cli_process(["inspect", case.adapter], timeout=HANG_SECONDS, memory_limit=1 << 30)
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr_lines) == 1 and result.stderr_lines[0].startswith("Error: "), result.stderr
    assert case.file in result.stderr_lines[0]


def _hub_cache(tmp_path: Path) -> Path:
    """A huggingface_hub cache layout for tiny-llama: snapshot files are symlinks into blobs/."""
    repo = tmp_path / "models--someone--tiny-llama"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted((corpus.TESTDATA / corpus.BASE).iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_cache_snapshot_symlinks_are_followed(tmp_path: Path) -> None:
    """Shard symlinks into the cache's blobs/ are how huggingface_hub stores files: accepted."""
    from adapterfmt import read_base
    from adapterfmt.reports.verify import verify_directory

    snapshot = _hub_cache(tmp_path)
    base = read_base(snapshot)
    assert len(base.shards) == 3
    assert verify_directory(snapshot) == []


def test_hub_cache_snapshot_symlink_outside_blobs_is_refused(tmp_path: Path) -> None:
    from adapterfmt import UnsafeFileError, read_base

    snapshot = _hub_cache(tmp_path)
    elsewhere = tmp_path / corpus.SHARD2
    elsewhere.write_bytes((snapshot / corpus.SHARD2).read_bytes())
    (snapshot / corpus.SHARD2).unlink()
    (snapshot / corpus.SHARD2).symlink_to(elsewhere)
    with pytest.raises(UnsafeFileError, match=corpus.SHARD2):
        read_base(snapshot)


# ---------------------------------------------------------------------------------------------
# OUTPUT FILESYSTEM FAULTS AND SIGNALS (make_bad_inputs.OUTPUT_FAULTS, SIGNAL_CASES)
# ---------------------------------------------------------------------------------------------

MERGE_BASE, MERGE_ADAPTER = corpus.TESTDATA / corpus.BASE, corpus.TESTDATA / corpus.ADAPTER


def _listing(root: Path, skip: Path) -> set[str]:
    """Every path under ``root`` (relative), not descending into ``skip``."""
    out = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if here == skip:
            dirs[:] = []
            continue
        for name in dirs + files:
            out.add(str((here / name).relative_to(root)))
    return out


def _merge_process(out: Path, extra: tuple[str, ...] = (), fsize_limit: Optional[int] = None) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    return subprocess.run(
        [sys.executable, "-m", "adapterfmt_cli.main", "merge", "--base", str(MERGE_BASE), "--adapter", str(MERGE_ADAPTER), "-o", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
        preexec_fn=limit if fsize_limit else None,
    )


@pytest.mark.parametrize("name", list(corpus.OUTPUT_FAULTS))
def test_output_filesystem_fault(name: str, tmp_path: Path) -> None:
    """A merge into a broken place: the documented exit, one line naming the path and the errno's
    meaning, no traceback, inputs byte-identical, nothing beside OUT (nor folders the run made)."""
    import sys

    fault = corpus.OUTPUT_FAULTS[name]
    if fault.mounts and (sys.platform != "linux" or os.geteuid() != 0):
        pytest.skip(f"{name}: mounting filesystems needs root on Linux")
    folder = tmp_path / "case"
    folder.mkdir()
    try:
        setup = fault.setup(folder)
    except OSError as e:
        pytest.skip(f"{name}: this machine cannot set the fault up: {e}")
    try:
        inputs_before = tree_digest(MERGE_BASE, MERGE_ADAPTER)
        before = _listing(folder, setup.out)
        result = _merge_process(setup.out, setup.args, setup.fsize_limit)
        after = _listing(folder, setup.out)
        assert tree_digest(MERGE_BASE, MERGE_ADAPTER) == inputs_before, "an input changed"
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == fault.exit_code, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        out_rel = str(setup.out.relative_to(folder))
        if fault.exit_code == 0:
            made = {out_rel} | {str(p) for p in Path(out_rel).parents if str(p) != "."}
            assert after - before <= made, f"left beside OUT: {sorted(after - before - made)}"
            from adapterfmt.reports.verify import verify_directory

            assert all((setup.out / f).is_file() for f in fault.ok_files), sorted(os.listdir(setup.out))
            assert verify_directory(setup.out) == []
            assert not [e for e in os.listdir(setup.out) if "adapterfmt-" in e]
            if os.path.ismount(setup.out):
                assert any(line.startswith("note: ") and "mount point" in line for line in lines), lines
        else:
            assert len(lines) == 1 and lines[0].startswith("Error: "), lines
            assert all(text in lines[0] for text in fault.line_has), lines[0]
            assert after == before, f"left behind: {sorted(after ^ before)}"
            for created in setup.created_parents:
                assert not created.exists(), f"the run left the folder it created: {created}"
            if os.path.isdir(setup.out) and len(setup.out.name) < 256:
                assert not [e for e in os.listdir(setup.out) if "adapterfmt-" in e]
    finally:
        for undo in reversed(setup.undo):
            undo()


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("name", list(corpus.SIGNAL_CASES))
def test_signal_stops_a_merge_cleanly(name: str, tmp_path: Path) -> None:
    """SIGTERM / SIGHUP at a pause point: one line, exit 128+signal, nothing beside OUT — not even
    the folder above OUT that the run created — and the inputs unchanged."""
    import signal
    import subprocess
    import sys
    import time

    from _hardening_helpers import PAUSE_CLI

    sig_name, point = corpus.SIGNAL_CASES[name]
    sig = getattr(signal, sig_name)
    out = tmp_path / "made-by-the-run" / "OUT"
    marker = tmp_path / "reached"
    inputs_before = tree_digest(MERGE_BASE, MERGE_ADAPTER)
    # write points pause in a writer thread, which the interrupted main thread waits for: a short pause
    args = [sys.executable, str(PAUSE_CLI), point, str(marker), "8", "cli", "merge", "--base", str(MERGE_BASE), "--adapter", str(MERGE_ADAPTER), "-o", str(out), "--quiet"]
    # the child starts with the default disposition for the signal it is sent: run under `nohup`
    # (SIGHUP ignored) or a shell that ignores SIGTERM, this test would otherwise inherit SIG_IGN,
    # which the merge rightly keeps (cli/main.py), and the signal would do nothing
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=functools.partial(signal.signal, sig, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + HANG_SECONDS
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"the merge never reached {point}"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=HANG_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 128 + sig, stderr
    assert len(lines) == 1 and lines[0] == f"Error: interrupted by {sig_name}; nothing was written", lines
    assert sorted(os.listdir(tmp_path)) == ["reached"], sorted(os.listdir(tmp_path))
    assert tree_digest(MERGE_BASE, MERGE_ADAPTER) == inputs_before


def test_sigkill_leftover_is_cleaned_and_reported_by_the_next_run(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from _hardening_helpers import PAUSE_CLI

    out, marker = tmp_path / "OUT", tmp_path / "reached"
    args = [sys.executable, str(PAUSE_CLI), "write:2", str(marker), "60", "cli", "merge", "--base", str(MERGE_BASE), "--adapter", str(MERGE_ADAPTER), "-o", str(out), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG_SECONDS
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftover = [e for e in os.listdir(tmp_path) if "adapterfmt-tmp" in e]
    assert len(leftover) == 1
    result = _merge_process(out)
    assert result.returncode == 0, result.stderr
    assert f"removed the leftover of an interrupted merge: {tmp_path / leftover[0]}" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["OUT", "reached"]


def test_corpus_grows_across_the_hardening_classes() -> None:
    """Issue 14's classes: filesystem faults, signals, typed configs, hostile patterns."""
    assert len(corpus.OUTPUT_FAULTS) >= 12 and len(corpus.SIGNAL_CASES) >= 8
    assert sum(n.startswith("config-type-") for n in corpus.CASES) >= 10
    assert sum(n.startswith("pattern-") for n in corpus.CASES) >= 6
