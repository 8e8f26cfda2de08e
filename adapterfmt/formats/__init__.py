"""Readers of every adapter format into the checkpoint model (docs/FORMAT.md §3, §10).

:mod:`.peft` reads PEFT adapter directories (LoRA, AdaLoRA, LoHa, LoKr) and in-memory state
dicts; :mod:`.wrapped` whole ``PeftModel.state_dict()`` saves; :mod:`.diffusion` kohya / LyCORIS
and diffusers LoRA files and their names against a component. :mod:`.detect` says which format
a path holds; :mod:`.locate` finds a foreign file in a folder or Hub repo. Headers only. Imports
the base side and below; nothing that merges, loads or converts.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> submodule, imported on first use: reading one format (a PEFT directory, say)
#: never pays for the others' modules.
_LAZY = {
    **dict.fromkeys(["detect_format", "read_foreign"], ".detect"),
    **dict.fromkeys(["COMPONENTS", "ForeignCheckpoint", "ForeignModule"], ".diffusion.records"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
