"""The dotted reading of a kohya flattened module name from the grammar alone, with no base (FORMAT §10.4).

kohya flattens ``down_blocks.0.attentions.0.proj_in`` to ``down_blocks_0_attentions_0_proj_in``.
Against a base the name is resolved exactly (:mod:`.names`); without one, ``inspect`` can still
show the dotted name diffusers reads the file into (its kohya SD / SDXL conversion), because the
components of Stable Diffusion 1.x / 2.x / XL have a closed vocabulary of module names. Each
component has a grammar: the templates of every module path that carries a weight (``#`` is a
layer index). A flattened name is split at its ``_`` in every way that spells a template, and:

* exactly one dotted path fits: that is its reading (never checked against a model);
* none fits (another architecture, a module outside the grammar, an SGM index the standard
  block arithmetic does not place): no reading; the flattened name stays, with why;
* several fit: no reading either, never a guess; the note names them.

Grammars, in the component's own (diffusers) module names:

* ``unet``: ``UNet2DConditionModel`` (conv_in, time / add embeddings, down / mid / up blocks of
  ``resnets``, ``attentions`` with ``transformer_blocks``, samplers, conv_norm_out, conv_out). SGM /
  LDM names (``input_blocks_4_1_…``, ``middle_block_…``, ``output_blocks_…``, ``time_embed``,
  ``label_emb``, ``out``), which sd-scripts writes for SDXL, are read with the block arithmetic of
  the standard configs (``layers_per_block`` 2, as SD 1.x, 2.x and XL have) — the inverse of
  :mod:`.sgm_names`.
* ``text_encoder``, ``text_encoder_2``: CLIP's text model, one naming for both:
  ``text_model.embeddings.…``, ``text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj,
  layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}``, ``text_model.final_layer_norm`` and
  ``text_projection``, whether the file spells ``text_model_`` or not (transformers 5's
  ``CLIPTextModel`` has dropped ``text_model.``; ``CLIPTextModelWithProjection`` and old files keep
  it; diffusers' loader strips it where the model lacks it).
* ``transformer`` (and any other): no grammar; names are not read.

Pure string work: no torch, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

#: A layer index in a template (a ModuleList position: ``0`` or no leading zero).
INDEX = "#"
_INDEX = re.compile(r"0|[1-9][0-9]*")

#: ``layers_per_block`` of the standard SD 1.x / 2.x / XL UNet configs: the SGM block arithmetic.
STANDARD_LAYERS_PER_BLOCK = 2


class _Node:
    __slots__ = ("children", "module")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.module = False


def grammar_trie(templates: Iterable[str]) -> _Node:
    """A trie of dotted templates (``#``: a layer index); each template's last segment is a module."""
    root = _Node()
    for t in templates:
        node = root
        for seg in t.split("."):
            node = node.children.setdefault(seg, _Node())
        node.module = True
    return root


def _parses(node: _Node, name: str, start: int, acc: list[str], out: list[str]) -> None:
    """Every dotted path of the trie below ``node`` whose flattening is ``name[start:]``."""
    for seg, child in node.children.items():
        if seg == INDEX:
            m = _INDEX.match(name, start)
            if m is None:
                continue
            end, tok = m.end(), m.group()
        elif name.startswith(seg, start):
            end, tok = start + len(seg), seg
        else:
            continue
        if end == len(name):
            if child.module:
                out.append(".".join([*acc, tok]))
        elif name[end] == "_":
            acc.append(tok)
            _parses(child, name, end + 1, acc, out)
            acc.pop()


def parse_flattened(name: str, grammar: _Node) -> list[str]:
    """The distinct dotted paths of ``grammar`` that flatten to ``name`` (``.`` -> ``_``), in order."""
    out: list[str] = []
    _parses(grammar, name, 0, [], out)
    return list(dict.fromkeys(out))


# --- the grammars -----------------------------------------------------------------------------

_RESNET = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
_BASIC_BLOCK = ("norm1", "norm2", "norm3", *(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
                "ff.net.0.proj", "ff.net.2")
_TRANSFORMER = ("norm", "proj_in", "proj_out", *(f"transformer_blocks.#.{b}" for b in _BASIC_BLOCK))
_UNET_TOP = ("conv_in", "conv_norm_out", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
             "add_embedding.linear_1", "add_embedding.linear_2")

UNET_TEMPLATES: tuple[str, ...] = (
    *_UNET_TOP,
    *(f"{side}.#.resnets.#.{r}" for side in ("down_blocks", "up_blocks") for r in _RESNET),
    *(f"{side}.#.attentions.#.{t}" for side in ("down_blocks", "up_blocks") for t in _TRANSFORMER),
    "down_blocks.#.downsamplers.#.conv",
    "up_blocks.#.upsamplers.#.conv",
    *(f"mid_block.resnets.#.{r}" for r in _RESNET),
    *(f"mid_block.attentions.#.{t}" for t in _TRANSFORMER),
)
"""diffusers ``UNet2DConditionModel`` module paths with a weight (SD 1.x / 2.x / XL)."""

#: SGM resnet child -> diffusers resnet child (the inverse of :data:`.sgm_names._RESNET`).
_SGM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
               "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
#: SGM top-level module -> diffusers module (the inverse of :data:`.sgm_names._TOP`).
_SGM_TOP = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out",
            "out.2": "conv_out"}

SGM_TEMPLATES: tuple[str, ...] = (
    *_SGM_TOP,
    *(f"input_blocks.#.0.{r}" for r in _SGM_RESNET),
    "input_blocks.#.0.op",
    *(f"input_blocks.#.1.{t}" for t in _TRANSFORMER),
    *(f"middle_block.#.{r}" for r in _SGM_RESNET),
    *(f"middle_block.#.{t}" for t in _TRANSFORMER),
    *(f"output_blocks.#.0.{r}" for r in _SGM_RESNET),
    *(f"output_blocks.#.1.{t}" for t in _TRANSFORMER),
    "output_blocks.#.1.conv",
    "output_blocks.#.2.conv",
)
"""SGM / LDM UNet module paths with a weight (sd-scripts' SDXL UNet), read through :func:`from_sgm`."""

_CLIP_WRAPPER = "text_model"
_CLIP_INNER = ("embeddings.token_embedding", "embeddings.position_embedding", "final_layer_norm",
               *(f"encoder.layers.#.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                                   "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")))
CLIP_TEMPLATES: tuple[str, ...] = (*_CLIP_INNER, *(f"{_CLIP_WRAPPER}.{p}" for p in _CLIP_INNER), "text_projection")
"""CLIP text model module paths with a weight, with and without ``text_model.``."""


def from_sgm(path: str, layers_per_block: int = STANDARD_LAYERS_PER_BLOCK) -> Optional[str]:
    """The diffusers UNet path of the SGM path ``path`` (FORMAT §10.4's block arithmetic read
    backwards), ``None`` where that arithmetic places no such module (a resnet at a downsampler's
    index, an SGM middle block 3, ``input_blocks.0`` beyond ``conv_in``)."""
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    side, _, rest = path.partition(".")
    n_str, _, rest = rest.partition(".")
    if side not in ("input_blocks", "middle_block", "output_blocks") or not _INDEX.fullmatch(n_str):
        return None
    n, lpb = int(n_str), layers_per_block
    if side == "middle_block":
        inner = _SGM_RESNET.get(rest)
        if inner is not None:
            resnet = {0: 0, 2: 1}.get(n)
            return None if resnet is None else f"mid_block.resnets.{resnet}.{inner}"
        return f"mid_block.attentions.0.{rest}" if n == 1 else None
    k, _, rest = rest.partition(".")
    if side == "input_blocks":
        if n == 0:
            return None
        b, j = divmod(n - 1, lpb + 1)
        if k == "0" and rest == "op":
            return f"down_blocks.{b}.downsamplers.0.conv" if j == lpb else None
        if j == lpb:
            return None
        if k == "0":
            inner = _SGM_RESNET.get(rest)
            return None if inner is None else f"down_blocks.{b}.resnets.{j}.{inner}"
        return f"down_blocks.{b}.attentions.{j}.{rest}"
    b, j = divmod(n, lpb + 1)  # output_blocks: an up block has lpb + 1 layers
    if rest == "conv" and k in ("1", "2"):
        return f"up_blocks.{b}.upsamplers.0.conv" if j == lpb else None
    if k == "0":
        inner = _SGM_RESNET.get(rest)
        return None if inner is None else f"up_blocks.{b}.resnets.{j}.{inner}"
    return f"up_blocks.{b}.attentions.{j}.{rest}" if k == "1" else None


def _clip(path: str) -> Optional[str]:
    """One naming for both CLIP text encoders: ``text_model.`` in front of the text model's modules."""
    if path == "text_projection" or path.startswith(_CLIP_WRAPPER + "."):
        return path
    return f"{_CLIP_WRAPPER}.{path}"


@dataclass(frozen=True)
class Grammar:
    """One way of reading a component's flattened names: a trie of templates and a function from
    the dotted path it spells to the component's module path (``None``: no such module)."""

    label: str
    trie: _Node
    to_module: Callable[[str], Optional[str]]


_UNET = (Grammar("the diffusers UNet (SD 1.x / 2.x / XL)", grammar_trie(UNET_TEMPLATES), lambda p: p),
         Grammar("the SGM UNet (standard layers_per_block 2)", grammar_trie(SGM_TEMPLATES), from_sgm))
_CLIP = (Grammar("the CLIP text model", grammar_trie(CLIP_TEMPLATES), _clip),)

#: component -> the grammars its kohya names are read with (none: the names are not read).
GRAMMARS: dict[str, tuple[Grammar, ...]] = {"unet": _UNET, "text_encoder": _CLIP, "text_encoder_2": _CLIP}


@dataclass(frozen=True)
class GrammarReading:
    """A flattened name read from the grammar alone: ``dotted`` when exactly one module path fits
    (not checked against a model), else ``None`` and ``note`` says why."""

    dotted: Optional[str]
    note: Optional[str] = None


def read_kohya_name(component: Optional[str], name: str) -> GrammarReading:
    """The dotted reading of kohya's flattened ``name`` of ``component`` (module docstring)."""
    grammars = GRAMMARS.get(component or "")
    if not grammars:
        return GrammarReading(None, f"no grammar for {component or 'this'} module names; the name is as the file writes it")
    fits: list[str] = []
    misplaced: list[tuple[str, str]] = []
    for g in grammars:
        for spelled in parse_flattened(name, g.trie):
            module = g.to_module(spelled)
            if module is None:
                misplaced.append((g.label, spelled))
            else:
                fits.append(module)
    fits = list(dict.fromkeys(fits))
    if len(fits) == 1:
        return GrammarReading(fits[0])
    if fits:
        return GrammarReading(None, f"reads as {' and as '.join(repr(f) for f in fits)}; not read without a base")
    if misplaced:
        label, spelled = misplaced[0]
        return GrammarReading(None, f"spells {spelled!r} of {label}, which names no module there")
    labels = " or ".join(g.label for g in grammars)
    return GrammarReading(None, f"fits no module name of {labels}")
