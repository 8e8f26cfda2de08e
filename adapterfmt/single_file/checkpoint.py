"""A single-file checkpoint read as a base, and where diffusers' modules lie in it (headers only).

:func:`read_single_file` gives a :class:`SingleFileBase`: the file read by the one base reader
(a loose weights file: every tensor, the merge writes the same file back) plus its kind, its
prefix and the placements of the generated table (:mod:`adapterfmt.tables.single_file_names`).

* :meth:`SingleFileBase.place` — a module named the diffusers way (``transformer_blocks.0.attn.to_q``)
  or the file's own way (``double_blocks.0.img_attn.qkv``) -> the file's weight key and, for a part of
  a fused tensor, the rows it takes (:class:`Placement`).
* :meth:`SingleFileBase.module_paths` — every module name either way, for exact name resolution.
* :func:`fused_parts` — a fused single-file module -> the diffusers modules it holds and their rows
  (used to split a LoRA on a fused name onto a diffusers base).

Rows are checked against the table: a fused tensor of another size than diffusers cuts is refused,
never re-cut by a guess.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Optional

from ..base.reading import BaseModel, read_base
from ..checkpoint.keys import split_param, weight_key
from ..errors import CheckpointNotFoundError, ShapeMismatchError, UnsupportedFeatureError
from ..storage.header import read_header
from ..tables.single_file_names import (
    components_of,
    diffusers_names_of,
    from_single_file,
    has_lora_names,
    last_block_family,
    lora_own_name,
    to_single_file,
    transposed,
    transposed_keys,
    unread_key,
)
from .kinds import COMPONENT_PREFIXES, DESCRIPTIONS, detect_kind


@dataclass(frozen=True)
class Placement:
    """Where one module's weight is in the single file.

    Attributes:
        key: the file's tensor key (with the file's prefix).
        rows: ``((first, end, source_first), ...)``: rows ``first:end`` of the tensor take the
            module's rows from ``source_first`` on; ``None``: the whole tensor is the module's weight.
        shape: the module's weight shape (the rows it takes, the tensor's other dims).
    """

    key: str
    rows: Optional[tuple[tuple[int, int, int], ...]]
    shape: tuple[int, ...]


@dataclass
class SingleFileBase(BaseModel):
    """A single-file checkpoint: the whole file as a base model, its kind, its prefix (ComfyUI's,
    or none) and the component a LoRA is being placed on (:meth:`view`)."""

    kind: str = ""
    prefix: str = ""
    component: str = ""
    _placements: dict[str, Optional[Placement]] = field(default_factory=dict, repr=False)

    @property
    def description(self) -> str:
        return DESCRIPTIONS.get(self.kind, self.kind)

    @property
    def file(self) -> str:
        return os.path.join(self.directory, self.shards[0])

    @property
    def components(self) -> list[str]:
        """The diffusers components the file holds: the kind's diffusion model (its keys have no
        fixed prefix, :data:`~.kinds.COMPONENT_PREFIXES`), and each other component of the kind whose
        tensors are in the file (SD3's text encoders are optional)."""
        out = []
        for c in components_of(self.kind):
            start = COMPONENT_PREFIXES[(self.kind, c)]
            if not start or any(k.startswith(start) for k in self.tensors):
                out.append(c)
        return out

    @property
    def key_prefix(self) -> str:
        """The file's prefix of this component's keys: ComfyUI's ``model.diffusion_model.`` is the
        diffusion model's only (an SD3 file's ``text_encoders.*`` have none)."""
        return "" if COMPONENT_PREFIXES[(self.kind, self.component)] else self.prefix

    @functools.cached_property
    def last_block(self) -> Optional[int]:
        """The number of the file's last block of the family the converter treats apart (SD3's
        ``joint_blocks``, as ``convert_sd3_transformer_checkpoint_to_diffusers`` counts them); ``None``
        for a kind without one."""
        family = last_block_family(self.kind, self.component)
        if family is None:
            return None
        start = f"{self.component_prefix}{family}."
        numbers = [k[len(start):].split(".", 1)[0] for k in self.tensors if k.startswith(start)]
        return max((int(n) for n in numbers if n.isdigit()), default=None)

    def view(self, component: str) -> "SingleFileBase":
        """The same file, placing modules of ``component``."""
        return replace(self, component=component, _placements={})

    @property
    def component_prefix(self) -> str:
        """Where this component's tensors start in the file (``model.diffusion_model.`` for an SDXL UNet)."""
        return self.key_prefix + COMPONENT_PREFIXES[(self.kind, self.component)]

    def own_modules(self) -> list[str]:
        """The component's modules under the file's own names, without the prefixes
        (``double_blocks.0.img_attn.qkv``, ``input_blocks.4.1.proj_in``)."""
        start = self.component_prefix
        n = len(start)
        return [m for m, p in (split_param(k[n:]) for k in self.tensors if k.startswith(start)) if p == "weight" and m]

    def diffusers_modules(self) -> list[str]:
        """The diffusers modules of the component whose weights the file holds (per the table), in file order."""
        out: dict[str, None] = {}
        n, last = len(self.key_prefix), self.last_block
        for key in self.tensors:
            if not key.startswith(self.component_prefix):
                continue
            for d in diffusers_names_of(self.kind, self.component, key[n:], last=last):
                name, param = split_param(d)
                if param == "weight":
                    out[name] = None
        for d, key in transposed_keys(self.kind, self.component).items():  # named, so that a LoRA on it is refused by :meth:`place`
            name, param = split_param(d)
            if param == "weight" and "{i}" not in key and self.key_prefix + key in self.tensors:
                out[name] = None
        return list(out)

    def module_paths(self) -> list[str]:
        """Every module name a LoRA may use: the diffusers names, then the file's own (once each)."""
        return list(dict.fromkeys(self.diffusers_modules() + self.own_modules()))

    def place(self, module: str) -> Optional[Placement]:
        """Where ``module`` (a diffusers or an own name, unprefixed) lies; ``None`` when nowhere.

        Raises:
            ShapeMismatchError: the fused tensor has another row count than diffusers cuts.
        """
        return self.place_key(weight_key(module))

    def place_key(self, key: str) -> Optional[Placement]:
        """Where the diffusers tensor ``key`` (``norm_out.linear.bias``, unprefixed) lies; ``None`` when
        nowhere. :meth:`place` is this for a module's ``weight``.

        Raises:
            ShapeMismatchError: the fused tensor has another row count than diffusers cuts.
        """
        if key not in self._placements:
            self._placements[key] = self._place(key)
        return self._placements[key]

    def _place(self, diffusers_key: str) -> Optional[Placement]:
        module = split_param(diffusers_key)[0]
        segments = to_single_file(self.kind, self.component, diffusers_key, last=self.last_block)
        if not segments:
            unread = unread_key(self.kind, self.component, diffusers_key)
            if unread is not None and self.key_prefix + unread in self.tensors:
                raise UnsupportedFeatureError(
                    f"holds {module!r} of {self.component}, which diffusers' single-file loader does not read (it sets the identity); "
                    "adapterfmt does not merge a LoRA on it there", path=self.file, key=self.key_prefix + unread, hint="merge into the diffusers folder of the model instead",
                )
            own = self.component_prefix + diffusers_key
            if own in self.tensors:
                return Placement(own, None, tuple(self.tensors[own].shape))
            flipped = transposed(self.kind, self.component, diffusers_key)
            if flipped is not None and self.key_prefix + flipped in self.tensors:
                raise UnsupportedFeatureError(f"is stored transposed in the single file; adapterfmt does not merge a LoRA on {module!r} there",
                                              path=self.file, key=self.key_prefix + flipped, hint="merge into the diffusers folder of the model instead")
            return None
        rows, at, key, tail = [], 0, None, ()
        for seg in segments:
            full = self.key_prefix + seg.key
            info = self.tensors.get(full)
            if info is None:
                return None
            if key is not None and full != key:  # never produced by the covered converters
                raise ShapeMismatchError(f"diffusers module {module!r} spans two tensors of the file", path=self.file, key=full)
            key, tail = full, tuple(info.shape[1:])
            if seg.chunk is not None:
                index, count = seg.chunk
                if not info.shape or info.shape[0] % count:
                    raise ShapeMismatchError(
                        f"has {info.shape[0] if info.shape else 0} rows, which diffusers' converter cannot cut into {count} equal parts for {module!r} "
                        f"({self.description})", path=self.file, key=full, hint="is this file damaged or of another model?",
                    )
                step = info.shape[0] // count
                seg = seg._replace(first=index * step, end=(index + 1) * step)
            elif seg.rows is not None and info.shape[0] != seg.rows:
                raise ShapeMismatchError(
                    f"has {info.shape[0]} rows; diffusers cuts {module!r} out of a {seg.rows}-row tensor ({self.description})",
                    path=self.file, key=full, hint="not the released configuration of this model: adapterfmt does not re-cut fused tensors by guess",
                )
            end = info.shape[0] if seg.end is None else seg.end
            rows.append((seg.first, end, at))
            at += end - seg.first
        assert key is not None
        whole = len(rows) == 1 and rows[0][0] == 0 and rows[0][1] == self.tensors[key].shape[0]
        return Placement(key, None if whole else tuple(rows), (at, *tail))


def fused_parts(kind: str, component: str, module: str) -> list[tuple[str, int, int]]:
    """``(diffusers module, first, end)`` for each diffusers module the single-file module
    ``module`` (as the table names it) holds rows of, when it holds several in order (a fused
    tensor); ``[]`` otherwise."""
    parts = from_single_file(kind, component, weight_key(module))
    if len(parts) < 2 or any(b is None for _d, _a, b in parts) or len({d for d, _a, _b in parts}) != len(parts):
        return []  # a tensor renamed whole, or one module's rows permuted (a swapped pair): not split
    out, at = [], 0
    for d, a, b in parts:
        name, param = split_param(d)
        if a != at or param != "weight":  # not a plain cut in order (a swapped pair): not split
            return []
        out.append((name, a, int(b)))  # type: ignore[arg-type]
        at = int(b)  # type: ignore[arg-type]
    return out


def own_module_names(kind: str, component: str, diffusers_modules: "list[str]",
                     rows: "Optional[dict[str, int]]" = None) -> dict[str, tuple[Optional[str], list[tuple[str, int, int]]]]:
    """The single-file module names (without the component's prefix) of a diffusers model's
    modules: own name -> ``(diffusers module, [])`` for a renamed one, ``(None, parts)`` for a
    fused one (:func:`fused_parts`; ``[]``: no split, e.g. a pair of swapped halves). A kind with a
    table of diffusers' LoRA converter (Wan's ``_convert_non_diffusers_wan_lora_to_diffusers``) names
    exactly the modules that converter maps.

    Args:
        rows: diffusers module -> its weight's rows. A fused tensor that diffusers' converter cuts
            in equal parts (``chunks``: SD3's ``attn.qkv``) is split only with them, each module
            taking its own rows in order, and only where the parts are equal and each module takes
            one of them; otherwise it has no split. The last block of :func:`last_block_family`
            (SD3's ``context_pre_only`` block) is looked up in its own entries.
    """
    start = COMPONENT_PREFIXES[(kind, component)]
    out: dict[str, tuple[Optional[str], list[tuple[str, int, int]]]] = {}
    if has_lora_names(kind, component):  # the kind's LoRA converter decides (Wan), not its single-file one
        for d in diffusers_modules:
            own = lora_own_name(kind, component, d)
            if own is not None:
                out[own] = (d, [])
        return out
    last = _own_last_block(kind, component, diffusers_modules)
    chunked: dict[str, list[tuple[str, int, int]]] = {}
    for d in diffusers_modules:
        for seg in to_single_file(kind, component, weight_key(d), last=last) or []:
            own, param = split_param(seg.key)
            if param != "weight" or not own.startswith(start):
                continue
            if seg.chunk is not None:  # equal parts of a fused tensor: split with the diffusers rows only
                chunked.setdefault(own[len(start):], []).append((d, *seg.chunk))
                continue
            if seg.end is None:
                out[own[len(start):]] = (d, [])
            elif own[len(start):] not in out:
                out[own[len(start):]] = (None, fused_parts(kind, component, own))
    for own, entries in chunked.items():
        out[own] = (None, _chunk_parts(entries, rows))
    return out


def _own_last_block(kind: str, component: str, diffusers_modules: "list[str]") -> Optional[int]:
    """The number of the last block of :func:`last_block_family` that ``diffusers_modules`` reach, or ``None``."""
    family = last_block_family(kind, component)
    if family is None:
        return None
    start = COMPONENT_PREFIXES[(kind, component)] + family + "."
    numbers = []
    for d in diffusers_modules:
        for seg in to_single_file(kind, component, weight_key(d)) or []:
            if seg.key.startswith(start) and seg.key[len(start):].split(".", 1)[0].isdigit():
                numbers.append(int(seg.key[len(start):].split(".", 1)[0]))
    return max(numbers, default=None)


def _chunk_parts(entries: "list[tuple[str, int, int]]", rows: "Optional[dict[str, int]]") -> list[tuple[str, int, int]]:
    """``(diffusers module, first, end)`` in order for a fused tensor cut in equal parts, each module
    one part (``(module, index, count)`` entries); ``[]`` when that is not so or the rows are unknown."""
    if rows is None:
        return []
    count = entries[0][2]
    modules = [d for d, _i, _c in entries]
    if len(entries) != count or len(set(modules)) != count or sorted(i for _d, i, _c in entries) != list(range(count)) \
            or any(c != count or d not in rows for d, _i, c in entries) or len({rows[d] for d in modules}) != 1:
        return []
    step = rows[modules[0]]
    return [(d, i * step, (i + 1) * step) for d, i, _c in sorted(entries, key=lambda e: e[1])]


def single_file_kind(path: str, *, kind: Optional[str] = None) -> Optional[tuple[str, str]]:
    """``(kind, prefix)`` if ``path`` is a ``.safetensors`` single-file checkpoint of a covered kind;
    ``None`` for any other file or a folder.

    Raises:
        UnsupportedFeatureError: a recognised kind not covered; see :func:`~.kinds.detect_kind`.
        HeaderError: a damaged or truncated file.
    """
    if not (os.path.isfile(path) and path.endswith(".safetensors")):
        if kind is not None:
            raise CheckpointNotFoundError("is not a single-file .safetensors checkpoint", path=path)
        return None
    return detect_kind(read_header(path).tensors, path=path, kind=kind)


def read_single_file(path: "str | os.PathLike[str]", *, kind: Optional[str] = None) -> SingleFileBase:
    """Read a single-file checkpoint of a covered kind as a base.

    Raises:
        CheckpointNotFoundError: not such a checkpoint (a folder, or keys of no covered kind).
        UnsupportedFeatureError, HeaderError: see :func:`single_file_kind`.
    """
    spec = os.fspath(path)
    found = single_file_kind(spec, kind=kind)
    if found is None:
        raise CheckpointNotFoundError("is not a single-file checkpoint of a kind adapterfmt knows", path=spec,
                                      hint=f"covered: {', '.join(DESCRIPTIONS.values())}")
    model = read_base(spec)
    return SingleFileBase(**{f: getattr(model, f) for f in model.__dataclass_fields__}, kind=found[0], prefix=found[1],
                          component=components_of(found[0])[0])


__all__ = ["Placement", "SingleFileBase", "fused_parts", "own_module_names", "read_single_file", "single_file_kind"]
