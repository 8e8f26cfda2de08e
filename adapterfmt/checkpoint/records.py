"""The checkpoint model's records: an adapter described module by module, from headers.

:class:`AdapterCheckpoint` (with :class:`LoraModule`, :class:`FullCopyModule` and
:class:`TokenDelta`) is the one description that inspect, check, merge and load all use;
:func:`adapterfmt.formats.peft.reading.read_adapter` builds it. Plain records: nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..storage.header import TensorInfo
from .config import LoraConfig
from .finding import Finding


class _TensorGroup:
    """``dtype`` and ``params`` of a record that holds ``tensors: dict[str, TensorInfo]``."""

    tensors: dict[str, TensorInfo]

    @property
    def dtype(self) -> str:
        return next(iter(self.tensors.values())).dtype if self.tensors else "-"

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())


@dataclass
class LoraModule(_TensorGroup):
    """One LoRA-adapted module, as the checkpoint describes it.

    ``tensors`` maps ``lora_A``, ``lora_B``, and where present ``lora_B.bias`` and
    ``magnitude`` (DoRA) to their :class:`TensorInfo`. ``rank`` is read from the tensors
    (what the layer was built with); ``config_rank`` is what the config says.

    ``factors`` names a LyCORIS-style module instead (``loha``, ``lokr``, or ``lora`` for a LoCon
    with a Tucker core; kohya / LyCORIS files and PEFT's LOHA / LOKR, FORMAT §10): ``tensors`` then
    holds the factors under their file names (``hada_w1_a``, ``lokr_w1``, ``lora_down`` …) and the
    delta is :func:`adapterfmt.deltas.lycoris.module_delta` (``rank`` may be ``None`` for LoKr).
    """

    path: str
    layer_kind: str  #: ``linear`` (Linear or Conv1D), ``conv1d``/``conv2d``/``conv3d``, ``embedding``
    rank: Optional[int]
    config_rank: int
    alpha: float
    scaling: float
    use_dora: bool
    lora_bias: bool
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  #: slot -> saved key
    factors: Optional[str] = None  #: ``loha`` / ``lokr`` / ``lora`` (Tucker LoCon): a factor module (FORMAT §10.3)
    #: the factor on ``lora_B.bias`` where it is not ``scaling``: 1 for a ComfyUI ``.diff_b``, added as it is
    bias_scaling: Optional[float] = None
    peft_kron: bool = False  #: a PEFT LOKR module: its Kronecker product as PEFT builds it (FORMAT §10.6)


@dataclass
class FullCopyModule(_TensorGroup):
    """A module saved in full (``modules_to_save``): its tensors replace the base module's."""

    path: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  #: param (``weight``, ``dense.bias``) -> info
    keys: dict[str, str] = field(default_factory=dict)  #: param -> saved key


@dataclass
class TokenDelta:
    """Trainable-token rows: row ``j`` replaces row ``indices[j]`` of the embedding ``path``."""

    path: str
    indices: Optional[list[int]]
    tensor: TensorInfo
    key: str


@dataclass
class AdapterCheckpoint:
    """An adapter read from its config and weight header.

    Attributes:
        name: the adapter name (``default`` for a top-level adapter, the folder name otherwise).
        directory: the local directory holding it.
        config: the validated :class:`~adapterfmt.checkpoint.config.LoraConfig`.
        weights_file: the weights file path.
        prefix: the key prefix found (``base_model.model.`` or ``""``).
        lora: module path -> :class:`LoraModule`.
        full_copies: module path -> :class:`FullCopyModule`.
        base_overrides: base key -> tensor that replaces it (full embeddings saved next to a
            LoRA, base biases saved by ``bias="all"``/``"lora_only"``).
        token_deltas: embedding path -> :class:`TokenDelta`.
        unknown_keys: saved keys the grammar and config do not explain.
        findings: warnings found while reading (see :mod:`adapterfmt.checkpoint.findings`).
        sub_adapters: names of other adapters stored in ``<directory>/<name>/``.
        tensors_in_memory: only for ``.bin`` files: key -> tensor.
        source_config: the directory's own ``adapter_config.json`` where ``config`` is a LoRA view
            of it (a PEFT LOHA / LOKR adapter, FORMAT §10.6): what :func:`~adapterfmt.save` writes back.
    """

    name: str
    directory: str
    config: LoraConfig
    weights_file: str
    prefix: str
    lora: dict[str, LoraModule] = field(default_factory=dict)
    full_copies: dict[str, FullCopyModule] = field(default_factory=dict)
    base_overrides: dict[str, TensorInfo] = field(default_factory=dict)
    base_override_keys: dict[str, str] = field(default_factory=dict)
    token_deltas: dict[str, TokenDelta] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    sub_adapters: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    tensors_in_memory: Optional[dict[str, Any]] = None
    source_config: Optional[dict[str, Any]] = None

    @property
    def lora_params(self) -> int:
        return sum(m.params for m in self.lora.values())

    @property
    def full_copy_params(self) -> int:
        return sum(m.params for m in self.full_copies.values())

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Every tensor of the weights file, by saved key."""
        out: dict[str, TensorInfo] = {}
        for m in self.lora.values():
            out.update({m.keys[s]: t for s, t in m.tensors.items()})
        for c in self.full_copies.values():
            out.update({c.keys[p]: t for p, t in c.tensors.items()})
        out.update({self.base_override_keys[k]: t for k, t in self.base_overrides.items()})
        out.update({d.key: d.tensor for d in self.token_deltas.values()})
        return out
