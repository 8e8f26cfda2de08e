"""Unit tests of adapterfmt.io_thread.BackgroundIO: order, error hand-off, memory bound, abort."""

from __future__ import annotations

import threading

import pytest

from adapterfmt.io_thread import BackgroundIO


def test_calls_run_in_submission_order_on_one_other_thread() -> None:
    seen: list[tuple[int, str]] = []
    with BackgroundIO() as io:
        for i in range(50):
            io.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"adapterfmt-io"}


def test_drain_waits_for_every_call() -> None:
    done: list[int] = []
    gate = threading.Event()
    with BackgroundIO() as io:
        io.submit(gate.wait)
        io.submit(done.append, 1)
        assert done == []
        gate.set()
        io.drain()
        assert done == [1]
    assert io.busy >= 0.0 and io.waited >= 0.0


def test_first_error_is_raised_by_the_next_submit_and_later_calls_are_skipped() -> None:
    ran: list[int] = []
    io = BackgroundIO()
    io.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        io.drain()
    with pytest.raises(ZeroDivisionError):
        io.submit(ran.append, 1)
    with pytest.raises(ZeroDivisionError):
        io.close()
    assert ran == []


def test_error_raised_by_close_and_suppressed_on_request() -> None:
    io = BackgroundIO()
    io.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space"):
        io.close()
    quiet = BackgroundIO()
    quiet.submit(lambda: 1 / 0)
    quiet.close(raise_error=False)  # no exception


def test_submit_blocks_while_queued_bytes_exceed_the_limit() -> None:
    gate = threading.Event()
    io = BackgroundIO(limit=100)
    io.submit(gate.wait, nbytes=80)  # one call is always let through
    blocked = threading.Event()
    finished = threading.Event()

    def second() -> None:
        blocked.set()
        io.submit(lambda: None, nbytes=80)  # 160 > 100: waits until the first call is done
        finished.set()

    t = threading.Thread(target=second)
    t.start()
    blocked.wait(5)
    assert not finished.wait(0.2), "submit should wait while the limit is exceeded"
    gate.set()
    assert finished.wait(5)
    t.join()
    io.close()


def test_leaving_on_an_exception_skips_the_queue() -> None:
    ran: list[int] = []
    gate = threading.Event()
    with pytest.raises(KeyError):
        with BackgroundIO() as io:
            io.submit(gate.wait)
            io.submit(ran.append, 1)
            threading.Timer(0.3, gate.set).start()  # the first call is still running at the abort
            raise KeyError("caller failed")
    assert ran == []
