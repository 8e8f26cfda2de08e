"""adapterfmt: understand, check, merge and load PEFT LoRA adapter checkpoints.

``import adapterfmt`` never imports torch: names that need it (``load``, ``merge_state_dict``,
``save``, ``wrap``, ...) are resolved lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import *  # noqa: F401,F403  (tiny, and callers catch these first)
from .errors import __all__ as _error_names

__version__ = "0.1.0"

#: public name -> submodule. Everything is imported on first attribute access, so
#: ``import adapterfmt`` stays cheap (the header-only CLI path pays only for what it uses) and
#: never imports torch; ``merging`` and ``loading`` import torch when first used.
_LAZY = {
    **dict.fromkeys(["BaseModel", "read_base"], ".base.reading"),
    **dict.fromkeys(["LoraConfig", "parse_config", "read_config"], ".checkpoint.config"),
    **dict.fromkeys(["AdapterCheckpoint", "FullCopyModule", "LoraModule", "TokenDelta", "read_adapter"], ".formats.peft.reading"),
    "Finding": ".checkpoint.finding",
    **dict.fromkeys(["SafetensorsHeader", "TensorInfo", "read_header"], ".storage.header"),
    **dict.fromkeys(
        [
            "KeyParts",
            "Role",
            "parse_saved",
            "parse_wrapped",
            "saved_to_base",
            "saved_to_wrapped",
            "wrapped_to_base",
            "wrapped_to_saved",
        ],
        ".checkpoint.keys",
    ),
    **dict.fromkeys(["Resolution", "resolve"], ".base.resolution"),
    **dict.fromkeys(["WrappedCheckpoint", "is_wrapped_checkpoint", "read_wrapped"], ".formats.wrapped.reading"),
    **dict.fromkeys(["convert_wrapped", "merge_wrapped", "wrapped_names"], ".convert.wrapped"),
    **dict.fromkeys(["merge_state_dict", "merge_to_directory"], ".merging.engine"),
    "load": ".loading.loader",
    "save": ".loading.saving",
    "wrap": ".loading.wrapping",
    **dict.fromkeys(
        [
            "merge",
            "unmerge",
            "unload",
            "set_adapter",
            "disable_adapters",
            "freeze_full_copies",
            "unfreeze_full_copies",
        ],
        ".loading.adapters",
    ),
}

if TYPE_CHECKING:  # pragma: no cover - for IDEs and type checkers
    from .base.reading import BaseModel, read_base  # noqa: F401
    from .base.resolution import Resolution, resolve  # noqa: F401
    from .checkpoint.config import LoraConfig, parse_config, read_config  # noqa: F401
    from .checkpoint.finding import Finding  # noqa: F401
    from .checkpoint.keys import (  # noqa: F401
        KeyParts,
        Role,
        parse_saved,
        parse_wrapped,
        saved_to_base,
        saved_to_wrapped,
        wrapped_to_base,
        wrapped_to_saved,
    )
    from .convert.wrapped import convert_wrapped, merge_wrapped, wrapped_names  # noqa: F401
    from .formats.peft.reading import AdapterCheckpoint, FullCopyModule, LoraModule, TokenDelta, read_adapter  # noqa: F401
    from .formats.wrapped.reading import WrappedCheckpoint, is_wrapped_checkpoint, read_wrapped  # noqa: F401
    from .loading.adapters import (  # noqa: F401
        disable_adapters,
        freeze_full_copies,
        merge,
        set_adapter,
        unfreeze_full_copies,
        unload,
        unmerge,
    )
    from .loading.loader import load  # noqa: F401
    from .loading.saving import save  # noqa: F401
    from .loading.wrapping import wrap  # noqa: F401
    from .merging.engine import merge_state_dict, merge_to_directory  # noqa: F401
    from .storage.header import SafetensorsHeader, TensorInfo, read_header  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'adapterfmt' has no attribute {name!r}")


__all__ = sorted([*_LAZY, *_error_names])
