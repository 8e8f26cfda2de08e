"""Every exception adapterfmt raises for bad input, in one place.

All derive from :class:`AdapterFormatError`. Each carries the facts as attributes
(``path``, ``key``, ``hint``) and renders one line::

    adapter_model.safetensors: 'model.layers.0.q_proj.lora_B.weight': has rank 8 but its lora_A has rank 16; re-export the adapter

A built-in type is mixed in where callers would expect one (``FileNotFoundError``,
``ValueError``, ``OSError``), so plain ``except`` clauses keep working.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence


class AdapterFormatError(Exception):
    """Base class: a checkpoint, config, model or output path that adapterfmt cannot accept.

    Args:
        message: what is wrong (expected vs found).
        path: the file or directory concerned, if any.
        key: the tensor key, config field or module name concerned, if any.
        hint: what the user can do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: "Optional[str | os.PathLike[str]]" = None,
        key: Optional[str] = None,
        hint: Optional[str] = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else os.fspath(path)
        self.key = key
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        if self.key is not None:
            parts.append(f"{self.key!r}: ")
        parts.append(self.message)
        if self.hint:
            parts.append(f"; {self.hint}")
        # One line, always: keys and paths from strangers may carry newlines.
        return "".join(parts).replace("\r", "\\r").replace("\n", "\\n")

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self._render()


# ---------------------------------------------------------------------------------------------
# FILES AND SOURCES
# ---------------------------------------------------------------------------------------------


class CheckpointNotFoundError(AdapterFormatError, FileNotFoundError):
    """A local path or Hub id has no adapter / model files where they are expected."""


class UnsafeFileError(AdapterFormatError):
    """A file adapterfmt will not read as given: pickle without permission, a path escaping its directory."""


class HeaderError(AdapterFormatError, ValueError):
    """A safetensors file whose header or byte layout is damaged (truncated, bad JSON, bad offsets)."""


class ShardIndexError(AdapterFormatError, ValueError):
    """A ``model.safetensors.index.json`` that is not valid or does not match its shards."""


# ---------------------------------------------------------------------------------------------
# CONFIG
# ---------------------------------------------------------------------------------------------


class InvalidConfigError(AdapterFormatError, ValueError):
    """``adapter_config.json`` (or a model ``config.json``) is not valid or not supported."""


class UnsupportedFeatureError(AdapterFormatError, NotImplementedError):
    """The checkpoint uses a PEFT feature adapterfmt cannot handle for this operation."""


# ---------------------------------------------------------------------------------------------
# KEYS, MATCHING AND SHAPES
# ---------------------------------------------------------------------------------------------


class UnknownKeyError(AdapterFormatError, ValueError):
    """A key that fits no rule of the key grammar (see docs/FORMAT.md)."""


class InconsistentAdapterError(AdapterFormatError, ValueError):
    """Adapter tensors disagree with each other (orphan A/B, rank mismatch between A and B)."""


class AmbiguousMatchError(AdapterFormatError, ValueError):
    """A name matches more than one module where exactly one was meant, or is both target and full copy."""


class UnresolvedModulesError(AdapterFormatError, LookupError):
    """Adapter modules that match no module (or no tensor) of the base model.

    ``unresolved`` holds the module names; ``suggestion`` a ``(old, new)`` prefix rewrite if one fixes them.
    """

    def __init__(
        self,
        message: str,
        *,
        unresolved: Sequence[str] = (),
        suggestion: "Optional[tuple[str, str]]" = None,
        **kwargs: object,
    ) -> None:
        self.unresolved = list(unresolved)
        self.suggestion = suggestion
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class ShapeMismatchError(AdapterFormatError, ValueError):
    """An adapter tensor whose shape does not fit the base tensor it applies to."""


# ---------------------------------------------------------------------------------------------
# MERGE AND OUTPUT
# ---------------------------------------------------------------------------------------------


class MergeError(AdapterFormatError, ValueError):
    """A merge that cannot be carried out as asked (conflicting full copies, bad weights)."""


class OutputPathError(AdapterFormatError, OSError):
    """An output path that is refused: inside an input, not empty without ``overwrite``."""


class DiskSpaceError(AdapterFormatError, OSError):
    """Not enough free space for the output; nothing was written."""


class NonFiniteValuesError(AdapterFormatError, ValueError):
    """Tensor values that are NaN or infinite where finite values are required."""


class ModelMismatchError(AdapterFormatError, ValueError):
    """Two models that must have the same tensors do not: a fine-tune of another architecture or
    shape (``extract``), a merged model missing tensors of its base (``verify-merge``)."""


__all__ = [
    "AdapterFormatError",
    "AmbiguousMatchError",
    "CheckpointNotFoundError",
    "DiskSpaceError",
    "HeaderError",
    "InconsistentAdapterError",
    "ShardIndexError",
    "InvalidConfigError",
    "MergeError",
    "ModelMismatchError",
    "NonFiniteValuesError",
    "OutputPathError",
    "ShapeMismatchError",
    "UnknownKeyError",
    "UnresolvedModulesError",
    "UnsafeFileError",
    "UnsupportedFeatureError",
]
