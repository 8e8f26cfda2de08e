"""Extracting a LoRA adapter from a fine-tune: ``T − B``, one module at a time (``extract``, BEHAVIOUR §10).

:mod:`.pairing` decides from headers what every tensor of the tuned model is to the adapter (a
LoRA module, a ``lora_B.bias``, a full copy, unchanged, or changed but not low-rank material) and
refuses a fine-tune of another architecture or shape; :mod:`.factorize` is the per-module
factorization (randomized SVD, its error computed exactly, exact SVD where it misses the target)
and the rank rule; :mod:`.extract` streams it and writes the adapter through
:mod:`adapterfmt.storage.staging`. Imports base, checkpoint, storage and below (torch).
"""
