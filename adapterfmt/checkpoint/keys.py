"""Exact key mapping between the three namespaces of an adapter's tensors.

* **saved** — the keys in ``adapter_model.safetensors``: ``base_model.model.X.lora_A.weight``,
  ``base_model.model.Y.weight`` (full copy of ``Y``).
* **wrapped** — the keys of the model in memory once PEFT (or :func:`adapterfmt.load`) has wrapped it:
  ``X.lora_A.default.weight``, ``X.base_layer.weight``, ``Y.original_module.weight``,
  ``Y.modules_to_save.default.weight``.
* **base** — the plain model's own keys: ``X.weight``, ``Y.weight``.

Each key is parsed once into :class:`KeyParts` (module path, :class:`Role`, parameter, adapter
name, prefix) and every namespace is rendered from that record through the one table
``ROLE_TEMPLATES``; no code elsewhere does string surgery on keys. See docs/FORMAT.md §3.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

from ..constants import DEFAULT_ADAPTER_NAME, PEFT_PREFIX
from ..errors import UnknownKeyError


class Role(str, enum.Enum):
    """What a tensor is to its module."""

    LORA_A = "lora_A"
    LORA_B = "lora_B"
    LORA_EMBEDDING_A = "lora_embedding_A"
    LORA_EMBEDDING_B = "lora_embedding_B"
    DORA_MAGNITUDE = "lora_magnitude_vector"
    TOKENS_DELTA = "trainable_tokens_delta"
    #: trained copy of a ``modules_to_save`` module
    FULL_COPY = "modules_to_save"
    #: frozen original of a ``modules_to_save`` module (wrapped namespace only)
    ORIGINAL = "original_module"
    #: the frozen layer inside a LoRA wrapper; saved only for full embeddings / ``bias`` settings
    BASE_LAYER = "base_layer"
    #: the frozen embedding inside a trainable-tokens wrapper (wrapped namespace only)
    TOKENS_BASE = "token_adapter.base_layer"
    #: a key with no wrapper infix: a full-copy tensor, a saved base bias, or unknown
    PLAIN = "plain"


@dataclass(frozen=True)
class RoleTemplate:
    """How one role is spelled in each namespace (``None``: the role never appears there).

    Placeholders: ``{module}`` module path, ``{adapter}`` adapter name, ``{param}`` parameter
    name relative to the module (``weight``, ``bias``; dotted for full copies of containers).
    """

    saved: Optional[str]
    wrapped: Optional[str]
    base: Optional[str]


#: The mapping table. The base column names the base tensor the entry applies to.
ROLE_TEMPLATES: dict[Role, RoleTemplate] = {
    Role.LORA_A: RoleTemplate("{module}.lora_A.{param}", "{module}.lora_A.{adapter}.{param}", "{module}.weight"),
    Role.LORA_B: RoleTemplate("{module}.lora_B.{param}", "{module}.lora_B.{adapter}.{param}", "{module}.{param}"),
    Role.LORA_EMBEDDING_A: RoleTemplate(
        "{module}.lora_embedding_A", "{module}.lora_embedding_A.{adapter}", "{module}.weight"
    ),
    Role.LORA_EMBEDDING_B: RoleTemplate(
        "{module}.lora_embedding_B", "{module}.lora_embedding_B.{adapter}", "{module}.weight"
    ),
    Role.DORA_MAGNITUDE: RoleTemplate(
        "{module}.lora_magnitude_vector", "{module}.lora_magnitude_vector.{adapter}.weight", "{module}.weight"
    ),
    Role.TOKENS_DELTA: RoleTemplate(
        "{module}.token_adapter.trainable_tokens_delta",
        "{module}.token_adapter.trainable_tokens_delta.{adapter}",
        "{module}.weight",
    ),
    Role.FULL_COPY: RoleTemplate("{module}.{param}", "{module}.modules_to_save.{adapter}.{param}", "{module}.{param}"),
    Role.ORIGINAL: RoleTemplate(None, "{module}.original_module.{param}", "{module}.{param}"),
    Role.BASE_LAYER: RoleTemplate("{module}.base_layer.{param}", "{module}.base_layer.{param}", "{module}.{param}"),
    Role.TOKENS_BASE: RoleTemplate(None, "{module}.token_adapter.base_layer.{param}", "{module}.{param}"),
    Role.PLAIN: RoleTemplate("{module}.{param}", "{module}.{param}", "{module}.{param}"),
}

#: Roles that belong to a LoRA layer (as opposed to full copies and base tensors).
LORA_ROLES = frozenset(
    {Role.LORA_A, Role.LORA_B, Role.LORA_EMBEDDING_A, Role.LORA_EMBEDDING_B, Role.DORA_MAGNITUDE}
)

# Parse tables, derived from the shape of the templates above.
# Saved keys: the role is the last segment (ParameterDict-style entries) ...
_SAVED_LAST_SEGMENT = {
    "lora_embedding_A": Role.LORA_EMBEDDING_A,
    "lora_embedding_B": Role.LORA_EMBEDDING_B,
    "lora_magnitude_vector": Role.DORA_MAGNITUDE,
}
# ... or the second last, followed by the parameter.
_SAVED_MODULE_ROLE = {"lora_A": Role.LORA_A, "lora_B": Role.LORA_B}
# Wrapped keys: role segment, then adapter name, then (maybe) parameter.
_WRAPPED_ADAPTER_ROLE = {
    "lora_A": (Role.LORA_A, True),
    "lora_B": (Role.LORA_B, True),
    "lora_embedding_A": (Role.LORA_EMBEDDING_A, False),
    "lora_embedding_B": (Role.LORA_EMBEDDING_B, False),
    "lora_magnitude_vector": (Role.DORA_MAGNITUDE, True),
    "modules_to_save": (Role.FULL_COPY, True),
}
_MODULE_PARAMS = frozenset({"weight", "bias"})


class KeyParts(NamedTuple):
    """One tensor key, parsed: ``prefix + render(role, module, param, adapter)``.

    A tuple, not a frozen dataclass: every key of an adapter is parsed into one (200k for a big
    MoE adapter), and a tuple is built in a third of the time.
    """

    module: str
    role: Role
    param: Optional[str] = None
    adapter: Optional[str] = None
    prefix: str = ""

    def with_adapter(self, adapter: str) -> "KeyParts":
        return self._replace(adapter=adapter)


def split_prefix(key: str, prefix: str = PEFT_PREFIX) -> tuple[str, str]:
    """``("base_model.model.", rest)`` if ``key`` starts with the prefix, else ``("", key)``."""
    if prefix and key.startswith(prefix):
        return prefix, key[len(prefix) :]
    return "", key


def _render(template: Optional[str], parts: KeyParts, namespace: str, adapter: Optional[str] = None) -> str:
    if template is None:
        raise UnknownKeyError(
            f"a {parts.role.value} tensor has no name in the {namespace} namespace", key=parts.module
        )
    return template.format(module=parts.module, param=parts.param, adapter=adapter or parts.adapter)


def parse_saved(key: str, *, full_copy_modules: Iterable[str] = (), prefix: str = PEFT_PREFIX) -> KeyParts:
    """Parse a key as written in ``adapter_model.safetensors``.

    Args:
        key: the saved key, with or without the ``base_model.model.`` prefix.
        full_copy_modules: module paths (relative, no prefix) known to be full copies; a plain
            key under one of them is a :attr:`Role.FULL_COPY`, the longest match winning, so a
            container module's nested tensors (``classifier.dense.weight``) are attributed to it.

    Returns:
        The :class:`KeyParts`. A key with no wrapper infix that is under no full-copy module is
        :attr:`Role.PLAIN` (module = all but the last segment).

    Raises:
        UnknownKeyError: the key is empty or has an empty segment.
    """
    pre, rest = split_prefix(key, prefix)
    if not rest or rest[0] == "." or rest[-1] == "." or ".." in rest:
        raise UnknownKeyError("is not a dotted tensor name", key=key)
    # The common shapes first, without splitting the whole key (a 200k-tensor adapter parses
    # each of its keys here): ``M.lora_embedding_A``, ``M.lora_A.weight``, ``M.base_layer.weight``.
    head, _, last = rest.rpartition(".")
    if head:
        role = _SAVED_LAST_SEGMENT.get(last)
        if role is not None:
            return KeyParts(head, role, prefix=pre)
        module, _, second = head.rpartition(".")
        if module:
            role = _SAVED_MODULE_ROLE.get(second)
            if role is not None:
                return KeyParts(module, role, last, prefix=pre)
            if second == "base_layer":
                return KeyParts(module, Role.BASE_LAYER, last, prefix=pre)
            if second == "token_adapter" and last == "trainable_tokens_delta":
                return KeyParts(module, Role.TOKENS_DELTA, prefix=pre)
    segs = rest.split(".")
    # ``bias="all"`` leftovers of modules_to_save wrappers (docs/FORMAT.md §3.5): keep them typed.
    for marker, role in (("original_module", Role.ORIGINAL), ("modules_to_save", Role.FULL_COPY)):
        if marker in segs[1:-1]:
            i = len(segs) - 1 - segs[::-1].index(marker)
            return KeyParts(".".join(segs[:i]), role, ".".join(segs[i + 1 :]), prefix=pre)
    best = ""
    for module in full_copy_modules:
        if rest.startswith(module + ".") and len(module) > len(best):
            best = module
    if best:
        return KeyParts(best, Role.FULL_COPY, rest[len(best) + 1 :], prefix=pre)
    if len(segs) < 2:
        return KeyParts("", Role.PLAIN, rest, prefix=pre)
    return KeyParts(".".join(segs[:-1]), Role.PLAIN, segs[-1], prefix=pre)


def parse_wrapped(key: str, *, prefix: str = PEFT_PREFIX) -> KeyParts:
    """Parse a key of a wrapped model's ``state_dict()`` (PEFT's in-memory names).

    The rightmost wrapper segment decides the role (``lora_A``, ``modules_to_save``,
    ``original_module``, ``base_layer``, ...); the adapter name is the segment after it.

    Raises:
        UnknownKeyError: a wrapper segment is not followed by what the grammar requires.
    """
    pre, rest = split_prefix(key, prefix)
    segs = rest.split(".")
    if not rest or any(s == "" for s in segs):
        raise UnknownKeyError("is not a dotted tensor name", key=key)
    for i in range(len(segs) - 1, 0, -1):
        seg = segs[i]
        module = ".".join(segs[:i])
        tail = segs[i + 1 :]
        if seg == "trainable_tokens_delta" and segs[i - 1] == "token_adapter" and len(tail) == 1:
            return KeyParts(".".join(segs[: i - 1]), Role.TOKENS_DELTA, None, tail[0], pre)
        if seg == "base_layer" and i >= 2 and segs[i - 1] == "token_adapter" and tail:
            return KeyParts(".".join(segs[: i - 1]), Role.TOKENS_BASE, ".".join(tail), None, pre)
        if seg in _WRAPPED_ADAPTER_ROLE:
            role, has_param = _WRAPPED_ADAPTER_ROLE[seg]
            if has_param and len(tail) >= 2:
                return KeyParts(module, role, ".".join(tail[1:]), tail[0], pre)
            if not has_param and len(tail) == 1:
                return KeyParts(module, role, None, tail[0], pre)
            raise UnknownKeyError(
                f"'{seg}' must be followed by an adapter name{' and a parameter' if has_param else ' only'}", key=key
            )
        if seg in ("original_module", "base_layer") and tail:
            role = Role.ORIGINAL if seg == "original_module" else Role.BASE_LAYER
            return KeyParts(module, role, ".".join(tail), None, pre)
    if len(segs) < 2:
        return KeyParts("", Role.PLAIN, rest, prefix=pre)
    return KeyParts(".".join(segs[:-1]), Role.PLAIN, segs[-1], prefix=pre)


def render_saved(parts: KeyParts, *, prefix: Optional[str] = None) -> str:
    """The saved key for ``parts`` (adapter name dropped)."""
    p = parts.prefix if prefix is None else prefix
    return p + _join(_render(ROLE_TEMPLATES[parts.role].saved, parts, "saved"))


def render_wrapped(parts: KeyParts, *, adapter: Optional[str] = None, prefix: Optional[str] = None) -> str:
    """The wrapped (in-memory) key for ``parts``, with ``adapter`` (default: the parsed one, else ``default``)."""
    p = parts.prefix if prefix is None else prefix
    name = adapter or parts.adapter or DEFAULT_ADAPTER_NAME
    return p + _join(_render(ROLE_TEMPLATES[parts.role].wrapped, parts, "wrapped", name))


def render_base(parts: KeyParts) -> str:
    """The plain base model's key this tensor applies to (never prefixed)."""
    return _join(_render(ROLE_TEMPLATES[parts.role].base, parts, "base"))


def _join(key: str) -> str:
    # A module at the root (empty path) renders with a leading dot; drop it.
    return key[1:] if key.startswith(".") else key


def saved_to_wrapped(key: str, *, adapter: str = DEFAULT_ADAPTER_NAME, full_copy_modules: Iterable[str] = ()) -> str:
    """``base_model.model.X.lora_A.weight`` -> ``base_model.model.X.lora_A.<adapter>.weight``."""
    return render_wrapped(parse_saved(key, full_copy_modules=full_copy_modules), adapter=adapter)


def wrapped_to_saved(key: str) -> str:
    """``base_model.model.X.lora_A.default.weight`` -> ``base_model.model.X.lora_A.weight``."""
    return render_saved(parse_wrapped(key))


def saved_to_base(key: str, *, full_copy_modules: Iterable[str] = ()) -> str:
    """The base key a saved tensor applies to: ``...X.lora_A.weight`` -> ``X.weight``."""
    return render_base(parse_saved(key, full_copy_modules=full_copy_modules))


def wrapped_to_base(key: str) -> str:
    """The base key of a wrapped tensor: ``X.base_layer.weight`` / ``Y.original_module.weight`` -> ``X.weight``."""
    return render_base(parse_wrapped(key))


# ---------------------------------------------------------------------------------------------
# Base-namespace parameter keys: ``module.param``, the plain model's own tensor names
# ---------------------------------------------------------------------------------------------


def param_key(module: str, param: str) -> str:
    """A module's parameter key in the base namespace: ``("X", "weight")`` -> ``X.weight``;
    a module at the root (empty path) -> ``weight``."""
    return f"{module}.{param}" if module else param


def weight_key(module: str) -> str:
    """``X`` -> ``X.weight``: the base weight a LoRA module of ``X`` changes."""
    return param_key(module, "weight")


def bias_key(module: str) -> str:
    """``X`` -> ``X.bias``: the base bias ``lora_bias`` (or ``bias="all"``) adds to / replaces."""
    return param_key(module, "bias")


def split_param(key: str) -> tuple[str, str]:
    """``X.weight`` -> ``("X", "weight")``; ``weight`` -> ``("", "weight")`` (the inverse of :func:`param_key`)."""
    module, _, param = key.rpartition(".")
    return module, param


def weight_module(key: str) -> Optional[str]:
    """``X.weight`` -> ``X``; ``None`` for a key that is not a weight."""
    module, param = split_param(key)
    return module if param == "weight" else None
