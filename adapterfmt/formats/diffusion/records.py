"""Typed records of one foreign adapter file: a kohya / LyCORIS file or a diffusers LoRA file.

One :class:`ForeignModule` per adapted module, grouped by pipeline component. The records keep
each tensor's :class:`~adapterfmt.storage.header.TensorInfo` (file and byte range) and its key in the
file, so merge, load and convert read the bytes straight from the original file. LoRA modules
become the checkpoint model's own :class:`~adapterfmt.formats.peft.reading.LoraModule` records per component
(:mod:`adapterfmt.formats.diffusion.peft_view`); LoHa and LoKr keep their factor tensors here.
Nothing here reads tensor values except 0-d alpha scalars, and nothing imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ...checkpoint.factors import fits, inner_mismatch, product_shape
from ...checkpoint.finding import Finding
from ...checkpoint.keys import split_prefix
from ...checkpoint.records import FullCopyModule
from ...storage.header import TensorInfo

#: Pipeline component names, as diffusers names the sub-folders of a pipeline.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")

#: Adapter kinds (the JSON ``kind``): LoRA (incl. LoCon), LoHa, LoKr, and ComfyUI's full deltas
#: (``diff``: a whole-weight delta and / or a ``diff_b`` bias delta, added as they are).
LORA, LOHA, LOKR, DIFF = "lora", "loha", "lokr", "diff"

#: Tensor slots per kind. ``down``/``up`` are LoRA's A/B under kohya's names.
LORA_SLOTS = ("lora_down", "lora_up", "lora_mid")
LOHA_SLOTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SLOTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

_NDIM_KIND = {3: "conv1d", 4: "conv2d", 5: "conv3d"}


@dataclass
class ForeignModule:
    """One adapted module of a foreign file.

    Attributes:
        name: the module's name in the file, without the component prefix: kohya's flattened
            ``down_blocks_0_attentions_0_proj_in`` or diffusers' dotted ``down_blocks.0.attentions.0.proj_in``.
        component: ``unet``, ``transformer``, ``text_encoder`` or ``text_encoder_2`` (``None``: a PEFT adapter).
        kind: ``lora``, ``loha``, ``lokr`` or ``diff`` (ComfyUI's ``.diff`` / ``.diff_b`` with no factors;
            a LoRA module may carry a ``diff_b`` too, a bias delta added as it is).
        tensors: slot (``lora_down``, ``hada_w1_a``, ``lokr_w2``, ...) -> tensor.
        keys: slot -> key in the file.
        alpha: the module's alpha (its ``.alpha`` tensor, or the config's), ``None`` if it has none.
        alpha_key: the key of the ``.alpha`` tensor, if any.
        path: the real module path in the component: diffusers' name as written; for kohya names
            set by :func:`adapterfmt.formats.diffusion.names.resolve_names` (``None`` until resolved).
        dora_scale: a LyCORIS ``dora_scale`` tensor (weight decomposition), if present.
        grammar_name: the dotted module path the file's grammar alone gives the name, not checked
            against a model: a diffusers or PEFT name as written; a kohya name read by
            :func:`adapterfmt.formats.diffusion.grammar_names.read_kohya_name` (FORMAT §10.4), ``None``
            when it has no unique reading (``grammar_note`` says why; the flattened name stands).
        checked: whether the name was bound to a module of a base (``--base``): ``path`` is then
            the model's own module path. Set by :func:`adapterfmt.formats.diffusion.names.resolve_names`.
    """

    name: str
    component: Optional[str]  #: ``None`` for a PEFT LoHa / LoKr adapter (one model, no pipeline)
    kind: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    alpha: Optional[float] = None
    alpha_key: Optional[str] = None
    path: Optional[str] = None
    dora_scale: Optional[TensorInfo] = None
    config_scaling: Optional[float] = None  #: diffusers files with a LoraConfig in their metadata
    weight_shape: Optional[tuple[int, ...]] = None  #: the base weight's shape, once resolved against a base
    #: against a single-file base: where the module's weight lies in the file
    #: (:class:`adapterfmt.single_file.checkpoint.Placement`), set with ``path``
    placement: Optional[Any] = None
    #: a LoRA on a fused single-file name against a diffusers base: ``((module, first, end), ...)``,
    #: the diffusers modules it is split onto and the rows of ``lora_up`` each takes (``lora_down`` shared)
    split: Optional[tuple[tuple[str, int, int], ...]] = None
    grammar_name: Optional[str] = None
    grammar_note: Optional[str] = None
    checked: bool = False

    def shown_name(self) -> tuple[str, str]:
        """The name a report prints and how it must be marked: ``(path, "base")`` once checked
        against a base; ``(grammar_name, "grammar")`` otherwise when the grammar reads the name —
        print it marked "not checked against a model"; else ``(name, "file")``, the name as the
        file writes it — print it marked with ``grammar_note`` (no unique reading)."""
        if self.checked and self.path is not None:
            return self.path, "base"
        if self.grammar_name is not None:
            return self.grammar_name, "grammar"
        return self.name, "file"

    @property
    def rank(self) -> Optional[int]:
        """LoRA: ``lora_down``'s first dim. LoHa: ``hada_w1_b``'s first dim. LoKr: the rank of
        the factored half (``lokr_w1_b`` or ``lokr_w2_b``), ``None`` when both halves are full."""
        t = self.tensors
        if self.kind == DIFF:
            return None
        if self.kind == LORA:
            return t["lora_down"].shape[0] if "lora_down" in t and t["lora_down"].shape else None
        if self.kind == LOHA:
            return t["hada_w1_b"].shape[0] if "hada_w1_b" in t and t["hada_w1_b"].shape else None
        for slot in ("lokr_w1_b", "lokr_w2_b"):
            if slot in t and t[slot].shape:
                return t[slot].shape[0]
        return None

    @property
    def scaling(self) -> float:
        """The factor on the module's product (docs/FORMAT.md §10.3): ``alpha / rank``; 1 when
        the file has no alpha, and 1 for a LoKr module with no factored half (its alpha is unused)."""
        if self.config_scaling is not None:
            return self.config_scaling
        rank = self.rank
        if self.alpha is None or self.alpha == 0 or not rank:
            return 1.0  # kohya and LyCORIS: alpha 0 or missing means alpha = rank
        return self.alpha / rank

    @property
    def layer_kind(self) -> Optional[str]:
        """``linear``, ``conv2d``, ... from the base weight once resolved, else as far as the tensors
        tell; ``None`` when they do not (LoHa / LoKr on a convolution may store flattened 2-D factors)."""
        ndim = len(self.weight_shape) if self.weight_shape is not None else max((len(i.shape) for i in self.tensors.values()), default=0)
        if ndim > 2:
            return _NDIM_KIND.get(ndim, f"{ndim}d")
        if self.kind != LORA and self.weight_shape is None:
            return None
        return "linear"

    @property
    def dtype(self) -> str:
        return next(iter(self.tensors.values())).dtype if self.tensors else "-"

    @property
    def params(self) -> int:
        return sum(i.numel for i in self.tensors.values())

    def product_shape(self) -> Optional[tuple[int, ...]]:
        """The shape of the module's product as its factors give it (:func:`adapterfmt.checkpoint.factors.product_shape`)."""
        return product_shape(self.kind, self._weight_shapes()) if self.complete else None

    def _weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(i.shape) for k, i in self.tensors.items() if k != "diff_b"}

    def fits(self, weight_shape: tuple[int, ...]) -> bool:
        """Whether the product can be added to a weight of ``weight_shape`` (:func:`adapterfmt.checkpoint.factors.fits`)."""
        return self.complete and fits(self.kind, self._weight_shapes(), tuple(weight_shape))

    @property
    def complete(self) -> bool:
        """Whether the factors form one applicable product: :attr:`problem` is ``None``."""
        return self.problem is None

    @property
    def problem(self) -> Optional[str]:
        """Why the factors cannot be applied as they are (a factor missing, two forms of one half,
        an empty factor), or ``None``. Every tensor must be used exactly once, so a LoKr half
        given both in full and factored is an error, never a choice."""
        t = self.tensors
        if self.kind == DIFF:
            if "diff" not in t and "diff_b" not in t:
                return "the diff module holds neither .diff nor .diff_b"
            empty = sorted(slot for slot, info in t.items() if info.numel == 0)
            return f"{empty[0]} is empty" if empty else None
        if "diff" in t:  # ComfyUI applies one patch per weight: the .diff would replace the LoRA
            return "holds LoRA factors and a whole-weight delta (.diff) for one weight, which ComfyUI does not apply together"
        if self.kind == LORA:
            missing = "lora_down" not in t or "lora_up" not in t
        elif self.kind == LOHA:
            missing = not all(s in t for s in LOHA_SLOTS[:4]) or (("hada_t1" in t) != ("hada_t2" in t))
        else:
            for half in ("w1", "w2"):
                if f"lokr_{half}" in t and ({f"lokr_{half}_a", f"lokr_{half}_b"} & set(t) or (half == "w2" and "lokr_t2" in t)):
                    return f"holds lokr_{half} and its factors (lokr_{half}_a / lokr_{half}_b / lokr_t2) both"
            w1 = "lokr_w1" in t or ("lokr_w1_a" in t and "lokr_w1_b" in t)
            w2 = "lokr_w2" in t or ("lokr_w2_a" in t and "lokr_w2_b" in t)
            missing = not (w1 and w2) or ("lokr_t2" in t and "lokr_w2_a" not in t)
        if missing:
            return f"the {self.kind} module lacks a factor"
        mismatch = inner_mismatch(self.kind, {slot: tuple(info.shape) for slot, info in t.items()})
        if mismatch:
            return mismatch
        empty = sorted(slot for slot, info in t.items() if info.numel == 0)
        if empty:
            return f"{empty[0]} is empty (rank 0)"
        return None

    def all_keys(self) -> list[str]:
        """Every key of the file this module accounts for."""
        out = list(self.keys.values())
        if self.alpha_key:
            out.append(self.alpha_key)
        if self.dora_scale is not None:
            out.append(self.dora_scale.key)
        return out


@dataclass
class ForeignCheckpoint:
    """A kohya / LyCORIS or diffusers adapter file, read from its header.

    Attributes:
        format: ``kohya``, ``diffusers``, or ``peft`` (a PEFT LoHa / LoKr adapter).
        file: the ``.safetensors`` file.
        modules: every adapted module, in the file's key order.
        unknown_keys: keys that no rule of the format explains (never ignored: merge and convert refuse).
        metadata: the file's ``__metadata__``.
        configs: diffusers only: component -> its LoraConfig fields from ``lora_adapter_metadata``.
        findings: warnings found while reading.
        file_tensors: every tensor of the file by key, as its header lists it (module factors,
            ``alpha`` scalars, ``dora_scale`` and unknown keys alike): what a value scan reads.
        full_copies: PEFT LoHa / LoKr only: the ``modules_to_save`` copies (module path -> record),
            which replace their base modules (FORMAT §3.6); kohya and diffusers files have none.
        base_overrides: PEFT LoHa / LoKr only: base key -> a saved base tensor that replaces it
            (``X.base_layer.weight``, written for a targeted ``lm_head`` / embedding, FORMAT §3.5);
            ``base_override_keys``: base key -> its key in the file.
    """

    format: str
    file: str
    modules: list[ForeignModule] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    file_tensors: dict[str, TensorInfo] = field(default_factory=dict)
    full_copies: dict[str, FullCopyModule] = field(default_factory=dict)
    base_overrides: dict[str, TensorInfo] = field(default_factory=dict)
    base_override_keys: dict[str, str] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        """The components the file adapts, in :data:`COMPONENTS` order."""
        present = {m.component for m in self.modules}
        return [c for c in COMPONENTS if c in present]

    def component_modules(self, component: Optional[str]) -> list[ForeignModule]:
        return [m for m in self.modules if m.component == component]

    @property
    def kinds(self) -> list[str]:
        return sorted({m.kind for m in self.modules})
