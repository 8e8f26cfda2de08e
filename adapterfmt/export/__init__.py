"""Export for serving: adapters that vLLM, SGLang and llama.cpp accept, and a serving base for the rest.

What this folder decides: for each serving engine, which parts of a PEFT LoRA adapter the engine
reads as PEFT does (kept), reads with another scale rule (folded into the factors), never reads
(dropped), or cannot take at all (baked into a copy of the base by the merge engine), and the
``max_lora_rank`` the engine must be started with. :mod:`.engines` holds each engine's rules as
data; :mod:`.plan` decides from headers only; :mod:`.write` writes the PEFT directory;
:mod:`.gguf_file` writes llama.cpp's GGUF LoRA file (with gguf-py, the optional ``adapterfmt[gguf]``
extra); :mod:`.run` orders the work (``export_adapter``: every check first, the serving base, then
the adapter); :mod:`.serving` is the per-engine verdict that ``inspect`` shows (headers only).

May import: merging (the serving base is baked by :func:`~adapterfmt.merging.engine.merge_to_directory`),
formats, base, sources, checkpoint, storage, tables and below; nothing imports this folder but the CLI.
"""
