"""Adapter files of the diffusion ecosystem: kohya / LyCORIS single files and diffusers LoRA files.

``read_foreign(path)`` reads one from its header into a :class:`~adapterfmt.formats.records.ForeignCheckpoint`
(docs/FORMAT.md §10); ``detect_format(path)`` says which format a path holds. Headers only, no torch.
"""

from __future__ import annotations

from .detect import detect_format, read_foreign
from .records import COMPONENTS, ForeignCheckpoint, ForeignModule

__all__ = ["COMPONENTS", "ForeignCheckpoint", "ForeignModule", "detect_format", "read_foreign"]
