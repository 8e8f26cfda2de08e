"""Run the adapterfmt CLI (or ``save``) with a pause hook installed — the crash tests' child process.

    python tests/_pause_cli.py POINT MARKER SECONDS cli ARGS...    # adapterfmt ARGS...
    python tests/_pause_cli.py POINT MARKER SECONDS save OUT       # tiny-llama + its LoRA, adapterfmt.save(OUT)

At pause point POINT (``adapterfmt.storage.pause``) the hook writes POINT to MARKER (whole, then renamed:
a watcher never reads half a name) and sleeps SECONDS, so the test can kill the process there.
Other points pass straight through. Only this test helper reads its arguments; the library reads
no environment variable for it.
"""

from __future__ import annotations

import os
import sys
import time


def install(point: str, marker: str, seconds: float) -> None:
    import adapterfmt.storage.pause

    def hook(name: str) -> None:
        if name != point:
            return
        with open(f"{marker}.tmp", "w") as f:
            f.write(name)
        os.replace(f"{marker}.tmp", marker)
        time.sleep(seconds)

    adapterfmt.storage.pause.pause_hook = hook


def main(argv: list[str]) -> None:
    point, marker, seconds, mode, *rest = argv
    if os.environ.get("ADAPTERFMT_TEST_PORTABLE") == "1":  # test_portable.py: without the Linux-only calls
        import _portable

        _portable.remove_linux_calls()
    install(point, marker, float(seconds))
    if mode == "save":
        import adapterfmt
        from _load_helpers import TESTDATA, tiny_llama

        model = tiny_llama()
        adapterfmt.load(model, TESTDATA / "tiny-llama-lora")
        adapterfmt.save(model, rest[0], adapter_name=None)
        return
    from adapterfmt_cli.main import main as cli_main

    sys.argv = ["adapterfmt", *rest]
    cli_main()


if __name__ == "__main__":
    main(sys.argv[1:])
