"""Every portable call of ``adapterfmt.storage.os_calls`` with the Linux call and with its fallback."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest

from adapterfmt.storage import os_calls

from _portable import remove_linux_calls

HERE = Path(__file__).resolve().parents[1]  # tests/


@pytest.fixture(params=["linux", "portable"])
def calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test twice: with this system's calls, and with the Linux-only ones removed."""
    if request.param == "portable":
        remove_linux_calls(monkeypatch)
    yield request.param
    monkeypatch.undo()
    os_calls.detect()


def test_detection_finds_the_linux_calls_here() -> None:
    found = os_calls.detect()
    if sys.platform.startswith("linux"):
        assert found["copy_file_range"] and found["posix_fadvise"] and found["flock"] and found["sync_file_range"]


def test_copy_range_read_into_and_write_at(tmp_path: Path, calls: str) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "src").write_bytes(data)
    src = os_calls.open_read(str(tmp_path / "src"))
    dst = os_calls.open_new(str(tmp_path / "dst"))
    try:
        os_calls.write_all(dst, b"head")
        os_calls.copy_range(src, dst, 5, 1000)  # at the current position
        os_calls.copy_range(src, dst, 100, len(data) - 100, dst_offset=2000)  # at an offset
        os_calls.write_at(dst, b"xy", 1004)
        spare = os_calls.open_new(str(tmp_path / "spare"))
        with pytest.raises(OSError) as e:  # the source ends before the range does
            os_calls.copy_range(src, spare, len(data) - 10, 20)
        os.close(spare)
        assert e.value.errno == errno.EIO
        view = memoryview(bytearray(50))
        assert os_calls.read_into(src, view, 7) == 50 and bytes(view) == data[7:57]
        assert os_calls.read_exact(src, memoryview(bytearray(10)), len(data) - 10)
        assert not os_calls.read_exact(src, memoryview(bytearray(10)), len(data) - 5)
        os_calls.advise_sequential(src)
        os_calls.start_writeback(dst, 0, 4096)
        os_calls.sync_data(dst)
    finally:
        os.close(src)
        os.close(dst)
    got = (tmp_path / "dst").read_bytes()
    assert got[:4] == b"head" and got[4:1004] == data[5:1005] and got[1004:1006] == b"xy"
    assert got[2000:] == data[100:]
    with pytest.raises(FileExistsError):
        os_calls.open_new(str(tmp_path / "dst"))


def test_sync_path_and_directory(tmp_path: Path, calls: str) -> None:
    (tmp_path / "f").write_bytes(b"x")
    os_calls.sync_path(str(tmp_path / "f"))
    os_calls.sync_directory(str(tmp_path))  # a no-op where directories cannot be opened


def test_replace_directory_over_an_empty_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("1")
    (tmp_path / "out").mkdir()
    os_calls.replace_directory(str(tmp_path / "new"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_text() == "1"

    # Windows refuses to rename onto an existing directory: the empty one is removed first.
    real = os.rename

    def windows_rename(src: str, dst: str) -> None:
        if os.path.exists(dst):
            raise FileExistsError(errno.EEXIST, "exists", dst)
        real(src, dst)

    monkeypatch.setattr(os, "rename", windows_rename)
    (tmp_path / "again").mkdir()
    (tmp_path / "empty").mkdir()
    os_calls.replace_directory(str(tmp_path / "again"), str(tmp_path / "empty"))
    assert (tmp_path / "empty").is_dir() and not (tmp_path / "again").exists()
    (tmp_path / "more").mkdir()
    with pytest.raises(FileExistsError):
        os_calls.replace_directory(str(tmp_path / "more"), str(tmp_path / "out"))  # not empty: refused


def _fake_msvcrt() -> types.ModuleType:
    """Windows' ``msvcrt.locking`` semantics (non-blocking byte-range lock, OSError when held),
    emulated with flock so that the msvcrt code path runs here."""
    fake = types.ModuleType("msvcrt")
    fake.LK_NBLCK, fake.LK_UNLCK = 2, 0  # type: ignore[attr-defined]

    def locking(fd: int, mode: int, nbytes: int) -> None:
        if mode == fake.LK_UNLCK:  # type: ignore[attr-defined]
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None

    fake.locking = locking  # type: ignore[attr-defined]
    return fake


HOLDER = """
import os, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
if {portable!r}:
    import _portable
    _portable.remove_linux_calls()
from adapterfmt.storage import os_calls
lock = os_calls.try_lock(sys.argv[1])
print("held" if lock else "refused", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["flock", "msvcrt", "exclusive-file"])
def test_locks_exclude_other_holders_and_die_with_their_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    if kind != "flock":
        remove_linux_calls(monkeypatch)
        if kind == "msvcrt":
            monkeypatch.setitem(sys.modules, "msvcrt", _fake_msvcrt())
        os_calls.detect()
    try:
        path = str(tmp_path / "thing.lock")
        lock = os_calls.try_lock(path)
        assert lock is not None and lock.kind == kind
        assert os_calls.try_lock(path) is None  # a second holder, even in this process
        lock.release()
        lock.release()  # idempotent
        with os_calls.try_lock(path) as again:
            assert again is not None

        # Another process holds it: refused here; once that process is killed, it is free again.
        code = HOLDER.format(repo=str(HERE.parent), tests=str(HERE), portable=kind == "exclusive-file")
        holder = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            assert os_calls.try_lock(path) is None
        finally:
            holder.kill()
            holder.wait()
        final = os_calls.try_lock(path)
        assert final is not None
        final.release(remove=True)
        assert not os.path.exists(path)
    finally:
        monkeypatch.undo()
        os_calls.detect()


def test_exclusive_file_lock_is_not_taken_from_a_live_or_unreadable_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    remove_linux_calls(monkeypatch)
    try:
        path = tmp_path / "x.lock"
        path.write_text(str(os.getppid()))  # a live process
        assert os_calls.try_lock(str(path)) is None
        path.write_text("")  # being written by its owner
        assert os_calls.try_lock(str(path)) is None
    finally:
        monkeypatch.undo()
        os_calls.detect()


@pytest.mark.parametrize("kind", ["flock-directory", "msvcrt", "exclusive-file"])
def test_directory_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    if kind != "flock-directory":
        remove_linux_calls(monkeypatch)
        if kind == "msvcrt":
            monkeypatch.setitem(sys.modules, "msvcrt", _fake_msvcrt())
        os_calls.detect()
    try:
        folder = tmp_path / "stage"
        folder.mkdir()
        lock = os_calls.lock_directory(str(folder))
        assert lock is not None and lock.kind == kind
        assert os_calls.lock_directory(str(folder)) is None
        assert os_calls.directory_locks_follow_renames() == (kind == "flock-directory")
        lock.release(remove=True)
        assert sorted(os.listdir(tmp_path)) == ["stage"]  # no lock file left behind
        assert folder.is_dir()
    finally:
        monkeypatch.undo()
        os_calls.detect()


#: Calls only os_calls.py may make: Linux-only (or missing on Windows), each with a fallback there.
PLATFORM_CALLS = {"copy_file_range", "sendfile", "preadv", "pread", "pwrite", "pwritev", "posix_fadvise", "fdatasync", "O_DIRECTORY", "O_EXCL"}


def test_no_platform_call_outside_os_calls() -> None:
    """Every use of a Linux-only call goes through adapterfmt.storage.os_calls, which has its fallback."""
    import ast

    package = HERE.parent / "adapterfmt"
    found = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "os_calls.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" and node.attr in PLATFORM_CALLS:
                found.append(f"{path.name}:{node.lineno} os.{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                found += [f"{path.name}:{node.lineno} import {n}" for n in names if n in ("fcntl", "msvcrt")]
    assert found == []
