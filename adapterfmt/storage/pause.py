"""Named pause points for crash tests — a test-only hook, inert in normal use.

Writers call :func:`pause_point` at named moments (``start``: staging directory created, nothing
written; ``write:<N>``: the first tensor, or run of copied tensors, of merge shard N, 1-based, is
in the file; ``files``: every output file written; ``rename``: output complete and fsynced, just
before the rename). Nothing happens unless a test has set :data:`pause_hook`; crash tests run the
CLI through ``tests/_pause_cli.py``, which installs a hook that records the point and sleeps so the
test can kill the process there. The library never reads the environment or sleeps for this.
"""

from __future__ import annotations

from typing import Callable, Optional

#: Called with the point's name at every pause point; ``None`` (the default) does nothing.
pause_hook: Optional[Callable[[str], None]] = None


def hooked() -> bool:
    """Whether a test installed a hook (writers then flush queued I/O before pausing)."""
    return pause_hook is not None


def pause_point(name: str) -> None:
    """Call the installed hook with ``name``, if any."""
    hook = pause_hook
    if hook is not None:
        hook(name)
