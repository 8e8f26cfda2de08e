"""Readers of every adapter format into the checkpoint model (docs/FORMAT.md §3, §10).

:mod:`.peft` reads PEFT adapter directories (LoRA, AdaLoRA, LoHa, LoKr) and in-memory state
dicts; :mod:`.wrapped` whole ``PeftModel.state_dict()`` saves; :mod:`.diffusion` kohya / LyCORIS
and diffusers LoRA files and their names against a component. :mod:`.detect` says which format
a path holds; :mod:`.locate` finds a foreign file in a folder or Hub repo. Headers only. Imports
the base side and below; nothing that merges, loads or converts.
"""

from __future__ import annotations

from .detect import detect_format, read_foreign
from .diffusion.records import COMPONENTS, ForeignCheckpoint, ForeignModule

__all__ = ["COMPONENTS", "ForeignCheckpoint", "ForeignModule", "detect_format", "read_foreign"]
