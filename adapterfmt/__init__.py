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
#: never imports torch; ``merging`` and the loader (``loading``, ``saving``, ``wrapping``,
#: ``adapter_state``) import torch when first used.
_LAZY = {
    **dict.fromkeys(["BaseModel", "read_base"], ".base"),
    **dict.fromkeys(["LoraConfig", "parse_config", "read_config"], ".config"),
    **dict.fromkeys(["AdapterCheckpoint", "FullCopyModule", "LoraModule", "TokenDelta", "read_adapter"], ".describe"),
    "Finding": ".finding",
    **dict.fromkeys(["SafetensorsHeader", "TensorInfo", "read_header"], ".header"),
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
        ".keys",
    ),
    **dict.fromkeys(["Resolution", "resolve"], ".resolution"),
    **dict.fromkeys(["WrappedCheckpoint", "is_wrapped_checkpoint", "read_wrapped"], ".wrapped"),
    **dict.fromkeys(["convert_wrapped", "merge_wrapped", "wrapped_names"], ".convert"),
    **dict.fromkeys(["merge_state_dict", "merge_to_directory"], ".merging"),
    "load": ".loading",
    "save": ".saving",
    "wrap": ".wrapping",
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
        ".adapter_state",
    ),
}

if TYPE_CHECKING:  # pragma: no cover - for IDEs and type checkers
    from .base import BaseModel, read_base  # noqa: F401
    from .config import LoraConfig, parse_config, read_config  # noqa: F401
    from .convert import convert_wrapped, merge_wrapped, wrapped_names  # noqa: F401
    from .describe import AdapterCheckpoint, FullCopyModule, LoraModule, TokenDelta, read_adapter  # noqa: F401
    from .finding import Finding  # noqa: F401
    from .header import SafetensorsHeader, TensorInfo, read_header  # noqa: F401
    from .keys import (  # noqa: F401
        KeyParts,
        Role,
        parse_saved,
        parse_wrapped,
        saved_to_base,
        saved_to_wrapped,
        wrapped_to_base,
        wrapped_to_saved,
    )
    from .adapter_state import (  # noqa: F401
        disable_adapters,
        freeze_full_copies,
        merge,
        set_adapter,
        unfreeze_full_copies,
        unload,
        unmerge,
    )
    from .loading import load  # noqa: F401
    from .merging import merge_state_dict, merge_to_directory  # noqa: F401
    from .resolution import Resolution, resolve  # noqa: F401
    from .saving import save  # noqa: F401
    from .wrapped import WrappedCheckpoint, is_wrapped_checkpoint, read_wrapped  # noqa: F401
    from .wrapping import wrap  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'adapterfmt' has no attribute {name!r}")


__all__ = sorted([*_LAZY, *_error_names])
