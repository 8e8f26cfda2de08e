"""Removing the Linux-only calls, so the portable fallbacks of ``adapterfmt.storage.os_calls`` run on Linux.

``remove_linux_calls(monkeypatch)`` in a test (in process); ``python tests/_portable.py -m MODULE
ARGS...`` runs a module (the CLI) in a process that never had them, for subprocess tests.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

#: What macOS and Windows lack (or, for sendfile, cannot use on files) among what adapterfmt uses.
LINUX_CALLS = ("copy_file_range", "sendfile", "preadv", "pread", "pwrite", "posix_fadvise", "fdatasync", "O_DIRECTORY")


def remove_linux_calls(monkeypatch: Any = None) -> None:
    """Delete the calls from ``os``, hide ``fcntl`` and libc's ``sync_file_range``, detect again."""
    from adapterfmt.storage import os_calls

    for name in LINUX_CALLS:
        if hasattr(os, name):
            if monkeypatch is not None:
                monkeypatch.delattr(os, name)
            else:
                delattr(os, name)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, "fcntl", None)
        monkeypatch.setattr(os_calls, "find_sync_file_range", lambda: None)
        monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)  # as on macOS and Windows
    else:
        sys.modules["fcntl"] = None  # type: ignore[assignment]
        os_calls.find_sync_file_range = lambda: None
        shutil._USE_CP_SENDFILE = False  # type: ignore[attr-defined]
    found = os_calls.detect()
    assert not any(found[name] for name in ("copy_file_range", "sendfile", "preadv", "pread", "pwrite", "posix_fadvise", "fdatasync", "sync_file_range", "flock")), found


def staging_leftovers(staging: str) -> list[str]:
    """What a killed writer leaves beside its output: the staging directory, and where directories
    cannot be locked themselves, its lock file."""
    from adapterfmt.storage import os_calls

    return [staging] if os_calls.directory_locks_follow_renames() else [staging, os_calls.lock_name(staging)]


if __name__ == "__main__":
    import runpy

    remove_linux_calls()
    if sys.argv[1] != "-m":
        raise SystemExit("usage: python tests/_portable.py -m MODULE [ARGS...]")
    module, sys.argv = sys.argv[2], sys.argv[2:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
