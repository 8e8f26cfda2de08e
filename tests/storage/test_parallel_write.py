"""Files written at their offsets by several threads: same bytes as a sequential write, with the
Linux calls and with their portable fallbacks; errors stop the run and are raised."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Iterator

import pytest

from adapterfmt.storage import os_calls
from adapterfmt.storage.parallel_write import PlacedFile, write_files

from _portable import remove_linux_calls


@pytest.fixture(params=["linux", "portable"])
def calls(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "portable":
        remove_linux_calls(monkeypatch)
    yield request.param
    monkeypatch.undo()
    os_calls.detect()


def test_parts_written_out_of_order_give_the_exact_file(tmp_path: Path, calls: str) -> None:
    rng = random.Random(0)
    source = os.urandom(1 << 20)
    (tmp_path / "src").write_bytes(source)
    src_fd = os_calls.open_read(str(tmp_path / "src"))
    wanted: list[bytes] = []
    files: list[PlacedFile] = []
    jobs = []
    progress: list[int] = []
    hooks: list[int] = []
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            progress.append(n)

    for i in range(4):
        size = 0 if i == 2 else rng.randrange(1, 300_000)
        content = bytes(rng.randrange(256) for _ in range(size)) if i != 3 else source[5 : 5 + size]
        wanted.append(content)
        files.append(PlacedFile(str(tmp_path / f"f{i}"), size, progress=count))
        cuts = sorted({0, size, *(rng.randrange(size + 1) for _ in range(20))})
        for a, b in zip(cuts, cuts[1:]):
            if i == 3:  # copied from another file
                jobs.append((i, lambda f, a=a, b=b: (f.copy(src_fd, 5 + a, b - a, a), f.written(a, b - a))))
            else:
                jobs.append((i, lambda f, a=a, b=b, c=content: (f.write(a, memoryview(c)[a:b]), f.written(a, b - a))))
    rng.shuffle(jobs)
    timings: dict[str, float] = {}
    try:
        write_files(files, jobs, workers=3, sync_threads=2, after_first=hooks.append, timings=timings)
    finally:
        os.close(src_fd)
    for i, content in enumerate(wanted):
        assert (tmp_path / f"f{i}").read_bytes() == content
    assert sum(progress) == sum(len(c) for c in wanted)
    assert sorted(hooks) == [0, 1, 3] and set(timings) == {"jobs", "wait", "sync"}


def test_a_failing_job_stops_the_run_and_is_raised(tmp_path: Path, calls: str) -> None:
    files = [PlacedFile(str(tmp_path / "a"), 10), PlacedFile(str(tmp_path / "b"), 10)]
    ran: list[int] = []

    def boom(f: PlacedFile) -> None:
        raise OSError(28, "No space left on device")

    jobs = [(0, lambda f: f.write(0, b"x" * 10))] + [(1, boom)] + [(1, lambda f: ran.append(1))] * 50
    with pytest.raises(OSError, match="No space"):
        write_files(files, jobs, workers=1)
    assert len(ran) < 50
    for f in files:
        f.abort()


def test_too_many_or_too_few_bytes_are_bugs(tmp_path: Path) -> None:
    seen: list[int] = []
    h = PlacedFile(str(tmp_path / "h"), 6, header=b"HEAD", progress=seen.append)
    h.write(4, b"xy")
    h.finish()
    assert (tmp_path / "h").read_bytes() == b"HEADxy" and seen == [2]
    f = PlacedFile(str(tmp_path / "a"), 4)
    with pytest.raises(RuntimeError, match="past its end"):
        f.write(2, b"abc")
    f.write(0, b"ab")
    with pytest.raises(RuntimeError, match="2 of 4 bytes"):
        f.finish()
    f.abort()
    with pytest.raises(FileExistsError):
        PlacedFile(str(tmp_path / "a"), 1)  # never written through an existing file
