"""File names, grammar words and defaults of the adapter format, named once.

Sources: PEFT ``src/peft/utils/constants.py`` (adapter file names) and huggingface_hub
``constants.py`` (model weight file names), see docs/FORMAT.md.

The model file names are huggingface_hub's (``CONFIG_NAME``, ``SAFETENSORS_SINGLE_FILE``,
``SAFETENSORS_INDEX_FILE``, ``SAFETENSORS_WEIGHTS_FILE_PATTERN``). They are spelled here, not
imported, because ``import huggingface_hub.constants`` costs the header-only commands about 15 ms
(half their start-up) and tests/project/test_no_torch.py keeps huggingface_hub off that path;
tests/project/test_constants.py fails if a value here differs from huggingface_hub's.
"""

from __future__ import annotations

import os

#: Version of the JSON documents that the CLI prints (``--json``).
FORMAT_VERSION = 2

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_SAFETENSORS_FILE = "adapter_model.safetensors"
ADAPTER_BIN_FILE = "adapter_model.bin"

#: huggingface_hub.constants.CONFIG_NAME
MODEL_CONFIG_FILE = "config.json"
#: huggingface_hub.constants.SAFETENSORS_SINGLE_FILE
SAFETENSORS_WEIGHTS_FILE = "model.safetensors"
#: huggingface_hub.constants.SAFETENSORS_INDEX_FILE
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
#: huggingface_hub.constants.SAFETENSORS_WEIGHTS_FILE_PATTERN: suffix ``-00001-of-00005``.
SAFETENSORS_WEIGHTS_FILE_PATTERN = "model{suffix}.safetensors"

#: Prefix PEFT puts in front of every saved LoRA key (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."
DEFAULT_ADAPTER_NAME = "default"

#: The safetensors library refuses headers larger than this (``MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype name -> bits per element.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on", "y"}


#: ``ADAPTERFMT_DEBUG=1`` makes the CLI show tracebacks of AdapterFormatError too.
DEBUG = _is_true(os.environ.get("ADAPTERFMT_DEBUG"))


#: safetensors dtypes LoRA tensors are computed from, the base dtypes a delta can be added to, and
#: those ``--dtype`` converts.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
