"""adapterfmt: understand, check, merge and load PEFT LoRA adapter checkpoints.

``import adapterfmt`` never imports torch: names that need it (``load``, ``merge_state_dict``,
``save``, ``wrap``, ...) are resolved lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import BaseModel, read_base
from .config import LoraConfig, parse_config, read_config
from .describe import AdapterCheckpoint, FullCopyModule, LoraModule, TokenDelta, read_adapter
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _error_names
from .findings import Finding
from .header import SafetensorsHeader, TensorInfo, read_header
from .keys import KeyParts, Role, parse_saved, parse_wrapped, saved_to_base, saved_to_wrapped, wrapped_to_base, wrapped_to_saved
from .resolve import Resolution, resolve
from .wrapped import WrappedCheckpoint, is_wrapped_checkpoint, read_wrapped
from .convert import convert_wrapped, merge_wrapped, wrapped_names

__version__ = "0.1.0"

#: name -> module, imported on first attribute access (these modules import torch).
_LAZY = {
    "merge_state_dict": ".merging",
    "merge": ".loading",
    "merge_to_directory": ".merging",
    "load": ".loading",
    "save": ".loading",
    "wrap": ".loading",
    "set_adapter": ".loading",
    "disable_adapters": ".loading",
    "unmerge": ".loading",
    "unload": ".loading",
    "freeze_full_copies": ".loading",
    "unfreeze_full_copies": ".loading",
}

if TYPE_CHECKING:  # pragma: no cover
    from .merging import merge_state_dict, merge_to_directory  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'adapterfmt' has no attribute {name!r}")


__all__ = [
    "AdapterCheckpoint",
    "BaseModel",
    "Finding",
    "FullCopyModule",
    "KeyParts",
    "LoraConfig",
    "LoraModule",
    "Resolution",
    "Role",
    "SafetensorsHeader",
    "TensorInfo",
    "TokenDelta",
    "parse_config",
    "parse_saved",
    "parse_wrapped",
    "read_adapter",
    "read_base",
    "read_config",
    "read_header",
    "resolve",
    "saved_to_base",
    "saved_to_wrapped",
    "wrapped_to_base",
    "wrapped_to_saved",
    "WrappedCheckpoint",
    "is_wrapped_checkpoint",
    "read_wrapped",
    "convert_wrapped",
    "merge_wrapped",
    "wrapped_names",
    *_error_names,
    *_LAZY,
]
