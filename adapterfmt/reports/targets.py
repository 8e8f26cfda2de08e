"""The data behind ``adapterfmt targets``: which modules of a base a LoRA config would wrap.

Headers only, no torch; the rules are docs/FORMAT.md §5 (:mod:`adapterfmt.checkpoint.matching`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Sequence, Union

from ..checkpoint.finding import Finding
from ..checkpoint.findings import targets_findings
from ..checkpoint.keys import weight_key
from ..checkpoint.matching import TargetSpec, module_names_from_keys, select_targets

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from ..base.reading import BaseModel

class TargetsReport(NamedTuple):
    """Which modules of a base a LoRA config would wrap (``adapterfmt targets``).

    Attributes:
        lora_targets: ``{"module", "shape", "dtype"}`` of each module that would get LoRA.
        full_copies: ``modules_to_save`` entry -> modules it selects (exact rule).
        excluded: modules the targets matched but ``exclude_modules`` removed.
        warnings: ``unused-target``, ``unused-exclude``, ``full-copy-missing`` and
            ``full-copy-suffix`` (PEFT's plain ``endswith`` would wrap other modules too).
    """

    base: str
    lora_targets: list[dict[str, Any]]
    full_copies: dict[str, list[str]]
    excluded: list[str]
    warnings: list[Finding]

    def as_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "lora_targets": list(self.lora_targets),
            "full_copies": dict(self.full_copies),
            "excluded": list(self.excluded),
            "warnings": [w.as_dict() for w in self.warnings],
        }


def preview_targets(
    base_model: BaseModel,
    *,
    base: str,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec = None,
    modules_to_save: Optional[Sequence[str]] = None,
    layers_to_transform: Union[int, Sequence[int], None] = None,
    layers_pattern: Union[str, Sequence[str], None] = None,
    prefix_map: Optional[dict[str, str]] = None,
) -> TargetsReport:
    """Apply the matching rules of docs/FORMAT.md §5 to the modules of ``base_model``.

    With ``prefix_map`` (``{adapter prefix: base prefix}``, as ``check --prefix-map``), module names
    are shown and matched as the adapter names them: a base module ``NEW…`` is ``OLD…``.

    Module names come from the base's tensor keys, shown and matched as PEFT sees them in memory
    (the architecture's conversion rules: ViT ``vit.encoder.layer.0.attention.attention.query`` is
    ``vit.layers.0.attention.q_proj``; per-expert pieces of fused MoE tensors are no modules); a
    module can carry LoRA when it has a direct ``.weight`` (or is an output head tied to the input
    embedding).

    Raises:
        AmbiguousMatchError: a ``modules_to_save`` entry matches several modules, or a module is
            both a LoRA target and a module to save.
        InvalidConfigError: ``target_modules`` is ``"all-linear"``.
    """
    from ..checkpoint.matching import undo_prefix_map
    from ..tables.architectures import memory_modules

    names, leaves = module_names_from_keys(base_model.tensors)
    tied = [t for t in base_model.tied if t not in names]
    renamed = memory_modules(base_model.config, leaves + tied)

    def shown(n: str) -> Optional[str]:
        m = renamed.get(n, n)
        return undo_prefix_map(m, prefix_map) if m is not None and prefix_map else m

    view = {shown(n): n for n in names + tied if shown(n) is not None}
    names, leaves, tied = (
        [s for s in map(shown, names) if s is not None],
        [s for s in map(shown, leaves) if s is not None],
        [s for s in map(shown, tied) if s is not None],
    )
    sel = select_targets(
        names + tied,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        lora_capable=leaves + tied,
    )
    rows = []
    for m in sel.lora_targets:
        b = view.get(m, m)
        info = base_model.tensors.get(weight_key(b)) or base_model.tensors[weight_key(base_model.tied[b])]
        rows.append({"module": m, "shape": list(info.shape), "dtype": info.dtype, "tied_to": base_model.tied.get(b)})
    warnings = targets_findings(sel, exclude_modules)
    return TargetsReport(base=base, lora_targets=rows, full_copies=sel.full_copies, excluded=sel.excluded, warnings=warnings)
