"""Exact resolution of a foreign file's module names against the real modules of a component.

kohya flattens ``down_blocks.0.attentions.0.proj_in`` to ``down_blocks_0_attentions_0_proj_in``;
the underscores of real names make that lossy, so a name is never parsed back. Instead every
module of the base component (each ``X`` with a tensor ``X.weight`` in its safetensors header)
is flattened the same way, and a file name resolves to the module whose flattened path equals
it. Two such modules: :class:`~adapterfmt.errors.AmbiguousMatchError` naming both; none: the
name is unresolved, reported as ``check`` reports a module with no base tensor.

Aliases (docs/FORMAT.md §10.4), tried only when no module matches: the SGM names of a
diffusers UNet's modules (:mod:`.sgm_names`), and CLIP text encoders. Old files name them
``text_model.encoder.layers.…`` (``lora_te_text_model_encoder_…``) while transformers 5's
``CLIPTextModel`` has ``encoder.layers.…`` (``CLIPTextModelWithProjection`` keeps
``text_model.``). For a text-encoder component, when no module matches exactly, a name with a
leading ``text_model`` segment is matched without it, and one without it is matched with it —
what diffusers' loader does by stripping ``text_model.``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from ...errors import AmbiguousMatchError
from .records import ForeignModule

_CLIP_WRAPPER = "text_model"


def flatten(path: str) -> str:
    """kohya's flattening: every ``.`` becomes ``_``."""
    return path.replace(".", "_")


def base_module_paths(tensor_keys: Iterable[str]) -> list[str]:
    """The modules of a base component: ``X`` for every tensor ``X.weight``."""
    return [k[: -len(".weight")] for k in tensor_keys if k.endswith(".weight")]


@dataclass
class NameResolution:
    """Where each module of one component went: ``resolved`` name in file -> module path."""

    component: Optional[str]
    resolved: dict[str, str] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unresolved


class _Index:
    def __init__(self, paths: Iterable[str], key) -> None:
        self.by: dict[str, list[str]] = {}
        for p in paths:
            self.by.setdefault(key(p), []).append(p)

    def get(self, name: str) -> list[str]:
        return self.by.get(name, [])


def _aliases(name: str, sep: str) -> list[str]:
    head = _CLIP_WRAPPER + sep
    return [name[len(head) :]] if name.startswith(head) else [head + name]


def resolve_names(
    modules: list[ForeignModule],
    module_paths: Iterable[str],
    *,
    component: Optional[str],
    file: Optional[str] = None,
    flattened: bool = True,
    aliases: Optional[dict[str, str]] = None,
) -> NameResolution:
    """Bind each module's name in the file to exactly one module path of the component.

    Sets ``m.path`` and ``m.checked`` on every resolved module (``None`` / ``False`` on unresolved ones).

    Args:
        modules: the file's modules of ``component``.
        module_paths: the component's module paths (:func:`base_module_paths`).
        flattened: kohya names (compared flattened) or diffusers' dotted paths (compared as they are).
        aliases: other names of the modules (name -> module path), tried when no module path
            matches: the SGM names of a diffusers UNet (:mod:`.sgm_names`).

    Raises:
        AmbiguousMatchError: a name fits two modules; the message names both.
    """
    paths = list(module_paths)
    index = _Index(paths, flatten if flattened else (lambda p: p))
    sep = "_" if flattened else "."
    alias_index = _Index(aliases or {}, flatten if flattened else (lambda p: p))
    text_encoder = bool(component) and component.startswith("text_encoder")
    res = NameResolution(component)
    for m in modules:
        candidates = index.get(m.name)
        if not candidates and text_encoder:
            candidates = [c for alias in _aliases(m.name, sep) for c in index.get(alias)]
        if not candidates and aliases:
            candidates = [aliases[a] for a in alias_index.get(m.name)]
        if len(candidates) > 1:
            raise AmbiguousMatchError(
                f"{component} module name {m.name!r} fits both {candidates[0]!r} and {candidates[1]!r}",
                path=file,
                key=m.keys.get(next(iter(m.keys))) if m.keys else m.name,
                hint="the flattened name is ambiguous; rename the module in the file to one of them",
            )
        if candidates:
            m.path, m.checked = candidates[0], True
            res.resolved[m.name] = candidates[0]
        else:
            m.path, m.checked = None, False
            res.unresolved.append(m.name)
    return res
