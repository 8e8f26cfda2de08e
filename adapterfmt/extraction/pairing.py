"""What every tensor of a fine-tune is to the extracted adapter, decided from headers and bytes.

:func:`pair_models` refuses a tuned model of another architecture, with tensors the base lacks
(or the reverse) or of other shapes, naming the tensor — except a resized vocabulary (the first
dim of an embedding or output head), which is a change like any other that is not low-rank
material. :func:`classify` then gives each changed tensor a role: a LoRA module (a 2-D weight,
``nn.Linear`` layout), its ``lora_B.bias``, a full copy (``modules_to_save``, only when named),
or listed as not low-rank material (norms and other 1-D tensors, embeddings, resized vocabularies,
conv kernels, modules outside ``--target-modules``, a bias whose weight did not change).
Unchanged tensors (byte-equal) are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..base.reading import BaseModel
from ..checkpoint.keys import split_param
from ..checkpoint.matching import is_within, matches_entry
from ..errors import ModelMismatchError, UnsupportedFeatureError
from ..storage.header import TensorInfo
from ..storage.tensor_source import TensorSource

#: last name segments of embedding modules (input, position and type embeddings)
_EMBEDDING_WORDS = ("embed", "wte", "wpe", "shared", "embeddings")
#: model types whose linear layers are transformers' Conv1D, stored (in, out)
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


@dataclass
class NotLowRank:
    """A changed tensor that is not a LoRA module: listed, saved as a full copy only when named."""

    key: str
    shape: tuple[int, ...]
    reason: str
    saved: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "shape": list(self.shape), "reason": self.reason, "saved_as_full_copy": self.saved}


@dataclass
class Pairing:
    """Per role, the (base, tuned) tensor infos of the extraction."""

    lora: dict[str, tuple[TensorInfo, TensorInfo]] = field(default_factory=dict)  #: module -> weight infos
    biases: dict[str, tuple[TensorInfo, TensorInfo]] = field(default_factory=dict)  #: module -> bias infos
    full_copies: dict[str, list[tuple[str, TensorInfo]]] = field(default_factory=dict)  #: module -> (param, tuned tensor)
    not_low_rank: list[NotLowRank] = field(default_factory=list)
    unchanged: int = 0


def _model_type(config: dict) -> Optional[str]:
    return config.get("model_type") or None


def pair_models(base: BaseModel, tuned: BaseModel) -> None:
    """Refuse a tuned model that is not a fine-tune of ``base`` (from headers).

    Raises:
        ModelMismatchError: another architecture, a tensor only one of them has, another shape
            (other than a resized vocabulary); each naming the tensor.
        UnsupportedFeatureError: a Conv1D architecture (GPT-2), whose weights PEFT stores transposed.
    """
    bt, tt = _model_type(base.config), _model_type(tuned.config)
    if bt and tt and bt != tt:
        raise ModelMismatchError(f"is a {tt} model but the base is a {bt}", path=tuned.directory, key="model_type", hint="extract from a fine-tune of this base")
    if bt in _CONV1D_MODEL_TYPES:
        raise UnsupportedFeatureError(f"is a {bt} model, whose linear layers are Conv1D ((in, out) weights)", path=base.directory, hint="not supported by extract yet")
    for key, info in base.tensors.items():
        t = tuned.tensors.get(key)
        if t is None:
            if split_param(key)[0] in tuned.tied:
                continue
            raise ModelMismatchError("is in the base but not in the tuned model", path=tuned.directory, key=key, hint="extract from a fine-tune of this base")
        if tuple(t.shape) != tuple(info.shape) and not _resized_vocab(key, info.shape, t.shape, base):
            raise ModelMismatchError(
                f"has shape {list(t.shape)} in the tuned model but {list(info.shape)} in the base",
                path=t.file,
                key=key,
                hint="extract from a fine-tune of this base (same architecture and sizes)",
            )
    for key in tuned.tensors:
        if key not in base.tensors and split_param(key)[0] not in base.tied:
            raise ModelMismatchError("is in the tuned model but not in the base", path=tuned.directory, key=key, hint="extract from a fine-tune of this base")


def _is_embedding(module: str, base: BaseModel) -> bool:
    last = module.rsplit(".", 1)[-1]
    return any(w in last for w in _EMBEDDING_WORDS) or module in base.tied.values()


def _resized_vocab(key: str, a: Sequence[int], b: Sequence[int], base: BaseModel) -> bool:
    module, _ = split_param(key)
    head = module in base.tied or module.rsplit(".", 1)[-1] in ("lm_head", "embed_out", "output")
    return len(a) == len(b) == 2 and a[1] == b[1] and a[0] != b[0] and (head or _is_embedding(module, base))


def _named(module: str, names: Sequence[str]) -> bool:
    return any(matches_entry(module, n) for n in names)


def classify(
    base: BaseModel, tuned: BaseModel, source: TensorSource, *, targets: Optional[Sequence[str]], full_copies: Sequence[str]
) -> Pairing:
    """Every changed tensor's role (see the module docstring); compares bytes, reads no tensor whole."""
    out = Pairing()
    changed: dict[str, tuple[TensorInfo, TensorInfo]] = {}
    for key, t in tuned.tensors.items():
        b = base.tensors.get(key)
        if b is None:  # an untied head in the tuned model: compare it with the embedding it was tied to
            module, param = split_param(key)
            b = base.tensors.get(f"{base.tied[module]}.{param}") if module in base.tied else None
            if b is None:
                continue
        if source.same_bytes(b, t):
            out.unchanged += 1
        else:
            changed[key] = (b, t)
    by_module: dict[str, dict[str, tuple[TensorInfo, TensorInfo]]] = {}
    for key, pair in changed.items():
        module, param = split_param(key)
        by_module.setdefault(module, {})[param] = pair
    named = [m for m in by_module if _named(m, full_copies)]
    for module in named:  # the whole module is replaced: every tensor of it, changed or not
        out.full_copies[module] = [(key[len(module) + 1 :], info) for key, info in tuned.tensors.items() if is_within(split_param(key)[0], module)]
    for module, params in by_module.items():
        if module in out.full_copies:
            continue
        weight = params.get("weight")
        lora = (
            weight is not None
            and len(weight[1].shape) == 2
            and tuple(weight[0].shape) == tuple(weight[1].shape)
            and not _is_embedding(module, base)
            and (targets is None or _named(module, targets))
            and weight[1].key in base.tensors
        )
        if lora:
            out.lora[module] = weight
        for param, (b, t) in params.items():
            if lora and param == "weight":
                continue
            if lora and param == "bias" and len(t.shape) == 1:
                out.biases[module] = (b, t)
                continue
            out.not_low_rank.append(NotLowRank(t.key, tuple(t.shape), _reason(module, param, b, t, base, targets, by_module)))
    for module, infos in out.full_copies.items():
        for _, t in infos:
            if t.key in changed:
                out.not_low_rank.append(NotLowRank(t.key, tuple(t.shape), "named in --full-copies", saved=True))
    return out


def _reason(module: str, param: str, b: TensorInfo, t: TensorInfo, base: BaseModel, targets: Optional[Sequence[str]], by_module: dict) -> str:
    if tuple(b.shape) != tuple(t.shape):
        return f"resized vocabulary ({list(b.shape)} -> {list(t.shape)})"
    if t.key not in base.tensors:
        return "an untied output head (tied to the embedding in the base)"
    if _is_embedding(module, base):
        return "an embedding"
    if len(t.shape) == 1:
        if param == "bias":
            return "a bias whose weight did not change" if "weight" not in by_module.get(module, {}) else "the bias of a module left out"
        return "a norm or other 1-D tensor"
    if len(t.shape) > 2:
        return f"a {len(t.shape)}-D tensor (conv kernel)"
    if targets is not None:
        return "not in --target-modules"
    return "not a linear weight"
