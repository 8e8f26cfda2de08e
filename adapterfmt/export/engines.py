"""What each serving engine reads, refuses and how it scales: the rules as data.

Read from the engines' own code (BEHAVIOUR §8.1): vLLM 0.33
``vllm/lora/peft_helper.py`` and ``utils.py``; SGLang ``python/sglang/srt/lora/``; llama.cpp
``convert_lora_to_gguf.py`` and ``src/llama-adapter.cpp``. ``portable`` is what every one of
vLLM, SGLang, TGI, LoRAX and TensorRT-LLM reads identically: one uniform rank, ``lora_alpha = r``,
the scale in the factors, plain ``lora_A`` / ``lora_B`` pairs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: vLLM's ``LoRAConfig.max_lora_rank`` Literal (``vllm/config/lora.py``).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: ``init_lora_weights`` values vLLM accepts as strings (``PEFTHelper._init_is_supported``).
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")

#: Config fields whose truthy value no engine serves (vLLM's ``_validate_features`` refuses
#: them; the others have no implementation), with what they are.
REFUSED_FIELDS = {
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "layer_replication",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "QA-LoRA",
}


@dataclass(frozen=True)
class Engine:
    """One serving engine's rules.

    ``scale``: how the engine scales a module: ``peft`` (PEFT's own rule: rsLoRA, ``rank_pattern``
    and ``alpha_pattern`` honoured), ``alpha_over_r`` (config ``lora_alpha`` / config ``r`` for
    every module: rsLoRA and the patterns ignored), ``alpha_over_tensor_rank`` (config
    ``lora_alpha`` / the rank of each ``lora_b``: llama.cpp), ``one`` (the scale lives in the
    factors: ``lora_alpha = r``, uniform rank).
    """

    name: str
    scale: str
    #: ``modules_to_save`` entries the engine serves as full copies (vLLM: classification heads)
    full_copies_served: tuple[str, ...]
    #: embedding LoRA (``lora_embedding_A`` / ``_B``) served
    embedding_lora: bool
    #: every module padded to one rank (engines that size one buffer per adapter from ``r``)
    uniform_rank: bool
    #: the allowed ``max_lora_rank`` values (``None``: any rank, no such setting)
    max_lora_ranks: Optional[tuple[int, ...]]
    #: what the engine reads from: a PEFT directory or a GGUF file
    output: str
    #: config fields the export writes (the rest of adapter_config.json is dropped)
    config_fields: tuple[str, ...]


_PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "bias", "peft_type", "task_type", "base_model_name_or_path", "modules_to_save")

ENGINES: dict[str, Engine] = {
    "vllm": Engine(
        name="vllm",
        scale="peft",
        full_copies_served=("classifier", "score"),
        embedding_lora=True,
        uniform_rank=False,
        max_lora_ranks=VLLM_MAX_LORA_RANKS,
        output="peft",
        config_fields=_PEFT_FIELDS + ("use_rslora", "rank_pattern", "alpha_pattern", "exclude_modules", "layers_to_transform", "layers_pattern"),
    ),
    "sglang": Engine(
        name="sglang",
        scale="alpha_over_r",
        full_copies_served=(),
        embedding_lora=True,
        uniform_rank=True,
        max_lora_ranks=None,
        output="peft",
        config_fields=_PEFT_FIELDS + ("exclude_modules",),
    ),
    "llama.cpp": Engine(
        name="llama.cpp",
        scale="alpha_over_tensor_rank",
        full_copies_served=(),
        embedding_lora=True,
        uniform_rank=False,
        max_lora_ranks=None,
        output="gguf",
        config_fields=_PEFT_FIELDS,
    ),
    "portable": Engine(
        name="portable",
        scale="one",
        full_copies_served=(),
        embedding_lora=False,
        uniform_rank=True,
        max_lora_ranks=VLLM_MAX_LORA_RANKS,
        output="peft",
        config_fields=_PEFT_FIELDS,
    ),
}

ENGINE_NAMES = tuple(ENGINES)


def engine_scaling(engine: Engine, *, r: int, alpha: float, tensor_rank: int) -> float:
    """The scale ``engine`` applies to a module of an exported adapter whose config says ``r``
    and ``lora_alpha`` (no rsLoRA, no patterns: the export writes none where the engine ignores them)."""
    if engine.scale == "alpha_over_tensor_rank":
        return alpha / tensor_rank if alpha else 1.0
    return alpha / r
