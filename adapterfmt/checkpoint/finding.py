"""The warning record every check returns: a stable code, a one-line message, the keys concerned.

A leaf module (nothing from the package imported) so that any module can return warnings
without importing the rules that produce them (those live in :mod:`adapterfmt.checkpoint.findings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One warning: ``code`` (stable), ``message`` (one line), ``keys`` (saved keys or module names)."""

    code: str
    message: str
    keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "keys": list(self.keys)}
