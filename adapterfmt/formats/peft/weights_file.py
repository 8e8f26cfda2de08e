"""What to tell a user whose PEFT adapter folder has a config but no weights file PEFT would load.

Imports :mod:`adapterfmt.constants` only; the PEFT LoRA and LoHa / LoKr readers both use it.
"""

from __future__ import annotations

import os

from ...constants import ADAPTER_SAFETENSORS_FILE


def missing_weights_hint(directory: str) -> str:
    """What to do about an adapter folder whose config has no weights file beside it: name the
    weight-like files it does hold (saved under another name?), or say the weights are missing."""
    try:
        found = sorted(f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
    except OSError:
        found = []
    if found:
        return f"the folder holds {', '.join(found)}: if one is this adapter's weights, rename it {ADAPTER_SAFETENSORS_FILE} (PEFT loads no other name)"
    return f"the adapter weights are missing; copy the {ADAPTER_SAFETENSORS_FILE} that PEFT's save_pretrained wrote beside this config"
