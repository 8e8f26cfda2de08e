"""The reverse mapping: adapter(s) + base keys -> the exact names of the wrapped model's
``state_dict()`` in memory (what ``PeftModel`` or ``inject_adapter_in_model`` builds), each with
where its value comes from. See docs/FORMAT.md §9."""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

from ...checkpoint.keys import KeyParts, Role, parse_saved, render_wrapped
from ...checkpoint.records import AdapterCheckpoint
from ...constants import DEFAULT_ADAPTER_NAME, PEFT_PREFIX


class WrappedSource(NamedTuple):
    """Where the value of one in-memory tensor comes from: ``kind`` ``base`` (a base key) or
    ``adapter`` (a saved key of adapter ``adapter``)."""

    kind: str
    key: str
    adapter: Optional[str] = None


def wrapped_names(
    adapter: "AdapterCheckpoint | Mapping[str, AdapterCheckpoint]",
    base_keys: Sequence[str],
    *,
    adapter_name: str = DEFAULT_ADAPTER_NAME,
    prefix: str = PEFT_PREFIX,
) -> dict[str, WrappedSource]:
    """The exact ``state_dict()`` names of the wrapped model PEFT builds from a base and adapter(s).

    A LoRA target's own tensors move under ``base_layer``; a full copy's under
    ``original_module`` plus one ``modules_to_save.<name>`` copy per adapter that saves it; a
    trainable-token embedding's under ``token_adapter.base_layer``; every other base key stays.
    The adapter tensors follow, with their adapter name.

    Args:
        adapter: one adapter (named ``adapter_name``), or adapter name -> adapter.
        base_keys: the base model's ``state_dict()`` keys (no prefix).
        prefix: ``base_model.model.`` (a ``PeftModel``) or ``""`` (``inject_adapter_in_model``).

    Returns:
        wrapped name -> :class:`WrappedSource`, base-derived names in ``base_keys`` order first.
        A full copy's parameter missing from the adapter file comes from the base (PEFT copies
        the original module); a base tensor the adapter saves (``base_layer`` of a full
        embedding, ``bias="all"``) comes from the adapter.
    """
    adapters = dict(adapter) if isinstance(adapter, Mapping) else {adapter_name: adapter}
    lora = {m for a in adapters.values() for m in a.lora}
    copies = {m for a in adapters.values() for m in a.full_copies}
    tokens = {m for a in adapters.values() for m in a.token_deltas}
    owners = sorted(lora | copies | tokens, key=len, reverse=True)
    overrides = {k: (n, a.base_override_keys[k]) for n, a in adapters.items() for k in a.base_overrides}

    out: dict[str, WrappedSource] = {}

    def base_source(key: str) -> WrappedSource:
        if key in overrides:
            name, saved = overrides[key]
            return WrappedSource("adapter", saved, name)
        return WrappedSource("base", key)

    for key in base_keys:
        owner = next((m for m in owners if key.startswith(m + ".")), None)
        if owner is None:
            out[prefix + key] = base_source(key)
            continue
        param = key[len(owner) + 1 :]
        if owner in copies:
            out[render_wrapped(KeyParts(owner, Role.ORIGINAL, param), prefix=prefix)] = base_source(key)
            for name, a in adapters.items():
                copy = a.full_copies.get(owner)
                if copy is not None:
                    src = WrappedSource("adapter", copy.keys[param], name) if param in copy.keys else WrappedSource("base", key)
                    out[render_wrapped(KeyParts(owner, Role.FULL_COPY, param), adapter=name, prefix=prefix)] = src
        else:
            role = Role.BASE_LAYER if owner in lora else Role.TOKENS_BASE
            out[render_wrapped(KeyParts(owner, role, param), prefix=prefix)] = base_source(key)
    for name, a in adapters.items():
        saved = [k for m in a.lora.values() for k in m.keys.values()] + [d.key for d in a.token_deltas.values()]
        for key in saved:
            out[render_wrapped(parse_saved(key), adapter=name, prefix=prefix)] = WrappedSource("adapter", key, name)
    return out
