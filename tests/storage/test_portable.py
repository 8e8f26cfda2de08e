"""The merge, crash-safety and concurrency tests again, with the Linux-only calls removed.

``copy_file_range``, ``sendfile``, ``preadv`` / ``pread`` / ``pwrite``, ``posix_fadvise``,
``fdatasync``, ``O_DIRECTORY``, ``fcntl`` and libc's ``sync_file_range`` are deleted for this module
(and for the merges it runs in child processes, through ``tests/_pause_cli.py``), so
:mod:`adapterfmt.storage.os_calls` picks its portable fallbacks — what macOS and Windows get: read/write
copies and positional I/O by seek, no advice, a final sync, and lock files beside the staging
directory instead of ``flock`` on it. The imported tests run here unchanged.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from adapterfmt.storage import os_calls

from _portable import remove_linux_calls

from test_crash_safety import (  # noqa: F401  (collected here, under this module's fixture)
    killed,
    reference,
    test_killed_merge_leaves_no_out_and_a_rerun_succeeds,
    test_killed_overwrite_keeps_the_old_output,
    test_second_merge_into_a_live_output_is_refused,
)
from test_merge import (  # noqa: F401
    base,
    test_non_empty_output_needs_overwrite_which_replaces_it_whole,
    test_running_out_of_space_mid_write_leaves_nothing,
    test_several_compute_workers_write_the_same_bytes,
    test_stale_staging_is_removed_and_a_live_one_refused,
)
from test_merge_parity import test_llama_sharded_bit_identical_layout_and_logits  # noqa: F401
from test_staging import (  # noqa: F401
    test_clean_stale_refuses_a_live_stage,
    test_clean_stale_removes_dead_stages_and_restores_an_old_output,
    test_non_empty_out_needs_overwrite_and_is_replaced_whole,
)


@pytest.fixture(scope="module", autouse=True)
def without_linux_calls() -> Iterator[None]:
    """For every test here and the processes they start."""
    with pytest.MonkeyPatch.context() as patch:
        remove_linux_calls(patch)
        patch.setenv("ADAPTERFMT_TEST_PORTABLE", "1")
        yield
    os_calls.detect()


def test_the_fallbacks_are_in_use() -> None:
    assert not os_calls.available["copy_file_range"] and not os_calls.available["flock"]
    assert not os_calls.directory_locks_follow_renames()
