"""Adapter algebra: resize and combine LoRA adapters exactly, from their factors (BEHAVIOUR §9).

What this folder decides: the singular values of a module's delta ``s·B·A`` without ever forming
the m×n product (:mod:`.svd`), which rank a rule keeps (:mod:`adapterfmt.deltas.rank_rules`, ``kept_rank``, shared with extract), how an
adapter is resized (:mod:`.resize`) and how several are combined on their deltas
(:mod:`.combine`), what the per-module report says (:mod:`.report`) and how the result is
written (:mod:`.output`: PEFT's layout with ``rank_pattern`` / ``alpha_pattern``, or a kohya file
in its own format). Never loads a base model.

May import: :mod:`adapterfmt.storage`, :mod:`adapterfmt.checkpoint`, :mod:`adapterfmt.formats`,
:mod:`adapterfmt.sources` and :mod:`adapterfmt.convert` (its foreign-file writer), torch.
Nothing imports this folder but the CLI.
"""
