"""adapterfmt's file names are the ones PEFT and huggingface_hub use (the sources they are copied from).

They are spelled in adapterfmt/constants.py rather than imported so that the header-only commands
never import huggingface_hub (tests/project/test_no_torch.py); this test keeps the copies honest.
"""

from __future__ import annotations

import huggingface_hub.constants as hf
import peft.utils.constants as peft_constants

from adapterfmt import constants


def test_model_file_names_are_huggingface_hubs():
    assert constants.MODEL_CONFIG_FILE == hf.CONFIG_NAME
    assert constants.SAFETENSORS_WEIGHTS_FILE == hf.SAFETENSORS_SINGLE_FILE
    assert constants.SAFETENSORS_INDEX_FILE == hf.SAFETENSORS_INDEX_FILE
    assert constants.SAFETENSORS_WEIGHTS_FILE_PATTERN == hf.SAFETENSORS_WEIGHTS_FILE_PATTERN


def test_adapter_file_names_are_pefts():
    assert constants.ADAPTER_CONFIG_FILE == peft_constants.CONFIG_NAME
    assert constants.ADAPTER_SAFETENSORS_FILE == peft_constants.SAFETENSORS_WEIGHTS_NAME
    assert constants.ADAPTER_BIN_FILE == peft_constants.WEIGHTS_NAME
