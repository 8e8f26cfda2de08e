"""PEFT's own layout: ``adapter_config.json`` + ``adapter_model.safetensors`` (docs/FORMAT.md §1-3).

:mod:`.reading` (``read_adapter``) for LoRA / AdaLoRA, :mod:`.lycoris` for PEFT LoHa / LoKr,
:mod:`.memory` for a state dict + config held in memory.
"""
