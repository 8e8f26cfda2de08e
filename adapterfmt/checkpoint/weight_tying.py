"""PEFT's ``ensure_weight_tying`` (PEFT >= 0.18): adapters of tied embeddings saved twice.

With ``ensure_weight_tying=True`` on a model whose output head is tied to its input embedding,
PEFT keeps the two tied in the adapter too, and saves both sides (FORMAT.md §3.6, §6.9):

* ``modules_to_save`` naming the embedding: the head's copy shares the embedding copy's weight,
  and the file holds a plain ``lm_head.weight`` next to ``model.embed_tokens.weight`` (equal
  values) although ``modules_to_save`` names only the embedding. That key is the head's full copy.
* ``target_modules`` naming the embedding: the head gets a LoRA whose factors are the embedding
  LoRA's, transposed (``lm_head.lora_A = lora_embedding_Bᵀ``, ``lm_head.lora_B = lora_embedding_Aᵀ``):
  one delta ΔW, used by both modules. The unmerged model computes ``W + ΔW`` for both; PEFT's
  ``merge_and_unload`` adds both LoRAs into the one shared tensor (``W + 2ΔW``) and disagrees with
  its own forward. adapterfmt follows the forward: the twin is applied once.

Everything here is decided from headers and the config, without the base model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..storage.header import SafetensorsHeader, TensorInfo
    from .records import AdapterCheckpoint


def ensures_tying(ckpt: "AdapterCheckpoint") -> bool:
    return bool(ckpt.config.raw.get("ensure_weight_tying"))


def adopt_tied_copies(ckpt: "AdapterCheckpoint", header: "SafetensorsHeader") -> None:
    """Move a plain ``X.weight`` that ``ensure_weight_tying`` saved for a tied head from
    ``unknown_keys`` into a full copy of ``X``.

    Only when the config ensures tying, the key is a plain ``.weight`` under no other rule, and an
    embedding full copy of exactly that shape exists (the copy it is tied to).
    """
    from .keys import Role, parse_saved
    from .records import FullCopyModule

    if not ensures_tying(ckpt) or not ckpt.unknown_keys:
        return
    shapes = {tuple(c.tensors["weight"].shape) for c in ckpt.full_copies.values() if set(c.tensors) == {"weight"}}
    kept = []
    for key in ckpt.unknown_keys:
        parts = parse_saved(key)
        info = header.tensors[key]
        if parts.role is Role.PLAIN and parts.param == "weight" and parts.module and tuple(info.shape) in shapes and parts.module not in ckpt.full_copies:
            copy = ckpt.full_copies.setdefault(parts.module, FullCopyModule(parts.module))
            copy.tensors["weight"] = info
            copy.keys["weight"] = key
        else:
            kept.append(key)
    ckpt.unknown_keys[:] = kept


def tied_lora_twins(ckpt: "AdapterCheckpoint") -> dict[str, str]:
    """Head LoRA module -> embedding LoRA module it mirrors, under ``ensure_weight_tying``.

    A linear LoRA with A ``(r, D)`` and B ``(V, r)`` mirrors an embedding LoRA with
    ``lora_embedding_A`` ``(r, V)`` and ``lora_embedding_B`` ``(D, r)`` of the same rank. Only a
    single candidate embedding counts: two would be ambiguous, and then nothing is paired.
    """
    if not ensures_tying(ckpt):
        return {}
    embeddings = {p: m for p, m in ckpt.lora.items() if m.layer_kind == "embedding"}
    out: dict[str, str] = {}
    for path, m in ckpt.lora.items():
        if m.layer_kind != "linear" or "lora_A" not in m.tensors or "lora_B" not in m.tensors:
            continue
        a, b = tuple(m.tensors["lora_A"].shape), tuple(m.tensors["lora_B"].shape)
        matches = [
            e
            for e, em in embeddings.items()
            if "lora_A" in em.tensors
            and "lora_B" in em.tensors
            and a == tuple(em.tensors["lora_B"].shape)[::-1]
            and b == tuple(em.tensors["lora_A"].shape)[::-1]
        ]
        if len(matches) == 1:
            out[path] = matches[0]
    return out


def without_twins(head_terms: Sequence[Any], emb_terms: Sequence[Any], twins: "set[tuple[int, str]]") -> tuple[list[Any], list[Any]]:
    """``(kept, applied through the embedding)``: a tied head's merge terms less the
    ``ensure_weight_tying`` twins (``twins``: ``(adapter, head module)``) of an embedding LoRA of
    the same adapter. One delta for the one shared tensor, as PEFT's unmerged forward computes
    (PEFT's ``merge_and_unload`` adds it twice, FORMAT.md §6.9)."""
    def lora(t: Any) -> Any:
        return getattr(t, "lora", None)

    emb_adapters = {t.adapter for t in emb_terms if lora(t) is not None and lora(t).layout == "embedding"}
    kept, applied = [], []
    for t in head_terms:
        if lora(t) is not None and (t.adapter, lora(t).module.path) in twins and t.adapter in emb_adapters:
            applied.append(t)
        else:
            kept.append(t)
    return kept, applied


def ties_in_effect(base: Any, touched: "set[str]") -> dict[str, str]:
    """Declared ties of ``base`` (a :class:`~adapterfmt.base.reading.BaseModel`) whose two tensors are
    both stored with equal bytes, among those a merge touches: transformers loads them as one tensor, so a LoRA on either changes both (as in PEFT).

    The only place a merge plan reads tensor bytes: two tensors, compared in 16 MB chunks, and only
    for a declared tie an adapter changes.
    """
    from ..tables.architectures import stored_ties

    out: dict[str, str] = {}
    for head, source in stored_ties(base.config, base.tensors).items():
        h, s = base.tensors[f"{head}.weight"], base.tensors[f"{source}.weight"]
        if (h.key in touched or s.key in touched) and _same_bytes(h, s):
            out[head] = source
    return out


def _same_bytes(a: "TensorInfo", b: "TensorInfo", chunk: int = 1 << 24) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape) or a.start < 0 or b.start < 0:
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.start)
        fb.seek(b.start)
        left = a.nbytes
        while left:
            n = min(chunk, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True
