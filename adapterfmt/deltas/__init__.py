"""The delta math on tensors, one implementation shared by merge and load (docs/FORMAT.md §6).

:mod:`.lora` is PEFT's LoRA / DoRA merge math per layer layout; :mod:`.lycoris` the dense deltas
of LoRA / LoCon, LoHa and LoKr modules; :mod:`.rank_rules` which rank a rule keeps from a delta's
singular values (resize, combine and extract). Imports torch and nothing of adapterfmt but its errors.
"""
