"""llama.cpp's GGUF LoRA file, as ``convert_lora_to_gguf.py`` writes it, written with gguf-py.

What the converter does (llama.cpp in llama-cpp-python 0.3.36, gguf-py 0.19.0), for the
architectures of :data:`ARCHITECTURES`: the GGUF architecture from the base's ``config.json``
(``architectures[0]``, a ``text_config``'s first); tensor names from gguf-py's own name map
(``get_tensor_name_map``) plus ``.lora_a`` / ``.lora_b``; Llama-family ``q_proj`` / ``k_proj``
rows permuted for RoPE (on ``lora_b`` only: the rows are the output's); Mixtral's per-expert
``w1`` / ``w2`` / ``w3`` stacked into one 3-D pair per layer; ``token_embd``'s ``lora_a``
transposed; metadata ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``
(float32) and gguf-py's model-card metadata of the adapter directory; tensors converted to
float32 unless float16, then to ``--outtype`` (``q8_0`` falls back to f16 for a row gguf-py
cannot quantize; 1-D tensors f32). Everything else is gguf-py's: the writer, the name map, the
quantizer, the metadata heuristics.

gguf-py is the optional ``adapterfmt[gguf]`` extra (the core depends on torch, safetensors,
huggingface_hub and click only); :func:`require_gguf` names the install command when it is missing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..checkpoint.records import AdapterCheckpoint
from ..constants import MODEL_CONFIG_FILE
from ..errors import CheckpointNotFoundError, InvalidConfigError, ShapeMismatchError, UnsupportedFeatureError

INSTALL_HINT = "pip install 'adapterfmt[gguf]'"


@dataclass(frozen=True)
class GgufArch:
    """How the converter treats one Hugging Face architecture: its gguf-py ``MODEL_ARCH`` name,
    whether q / k rows are permuted for RoPE, whether per-expert Mixtral modules are stacked,
    and whether ``lm_head`` is skipped (Gemma: llama.cpp ties it)."""

    gguf_arch: str
    rope_permute: bool = False
    stacked_experts: bool = False
    skips_lm_head: bool = False


#: Hugging Face ``architectures[0]`` -> what the converter's model class does with LoRA tensors
#: (``conversion/llama.py`` LlamaModel, ``qwen.py`` Qwen2Model / Qwen3Model, ``gemma.py``
#: GemmaModel, ``phi.py`` Phi3MiniModel).
ARCHITECTURES: dict[str, GgufArch] = {
    "LlamaForCausalLM": GgufArch("LLAMA", rope_permute=True),
    "MistralForCausalLM": GgufArch("LLAMA", rope_permute=True),
    "MixtralForCausalLM": GgufArch("LLAMA", rope_permute=True, stacked_experts=True),
    "Qwen2ForCausalLM": GgufArch("QWEN2"),
    "Qwen3ForCausalLM": GgufArch("QWEN3"),
    "GemmaForCausalLM": GgufArch("GEMMA", skips_lm_head=True),
    "Phi3ForCausalLM": GgufArch("PHI3"),
}

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

_EXPERT = re.compile(r"^(?P<pre>.*\.layers\.(?P<bid>\d+)\.block_sparse_moe\.experts)\.(?P<xid>\d+)\.(?P<wid>w[123])$")


def require_gguf() -> Any:
    """gguf-py, or one line naming the extra that installs it."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedFeatureError("writing a GGUF file needs gguf-py, which is not installed", key="gguf", hint=INSTALL_HINT) from None
    return gguf


# ---------------------------------------------------------------------------------------------
# BASE CONFIG
# ---------------------------------------------------------------------------------------------


def read_base_config(base: str, *, revision: Optional[str] = None) -> tuple[dict[str, Any], str, Optional[str]]:
    """``(config.json, local folder, hub id or None)`` of the base: a directory holding
    ``config.json`` or a Hub id (only ``config.json`` is fetched, through the cache).

    Raises:
        CheckpointNotFoundError: no config.json there, or the Hub cannot be reached (offline and not cached).
    """
    from ..sources.paths import resolve_dir

    local = os.path.exists(base)
    folder = resolve_dir(base, patterns=[MODEL_CONFIG_FILE], revision=revision, what="base model")
    path = os.path.join(folder, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"has no {MODEL_CONFIG_FILE}", path=folder, hint="llama.cpp's converter reads the base's config.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidConfigError(f"cannot be read as JSON ({e})", path=path) from None
    if not isinstance(doc, dict):
        raise InvalidConfigError("is not a JSON object", path=path)
    return doc, folder, None if local else base


def architecture(config: dict[str, Any], where: str) -> tuple[str, GgufArch]:
    """The Hugging Face architecture the converter reads, and its rules.

    Raises:
        UnsupportedFeatureError: an architecture adapterfmt does not write GGUF for (named).
    """
    arch = None
    if config.get("architectures"):
        arch = config["architectures"][0]
    text = config.get("text_config") or {}
    if isinstance(text, dict) and text.get("architectures"):
        arch = text["architectures"][0]
    if arch is None:
        raise UnsupportedFeatureError("names no architectures; llama.cpp's converter reads architectures[0]", path=where, key="architectures")
    if arch not in ARCHITECTURES:
        raise UnsupportedFeatureError(
            f"architecture {arch!r} has no GGUF LoRA export here",
            path=where,
            key="architectures",
            hint=f"supported: {', '.join(ARCHITECTURES)}",
        )
    return arch, ARCHITECTURES[arch]


def _text(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _hparam(config: dict[str, Any], names: tuple[str, ...], where: str) -> int:
    for n in names:
        if config.get(n) is not None:
            return int(config[n])
    raise InvalidConfigError(f"has none of {', '.join(names)}", path=where, hint="llama.cpp's converter needs it")


# ---------------------------------------------------------------------------------------------
# NAMES
# ---------------------------------------------------------------------------------------------


@dataclass
class GgufTarget:
    """Where one adapter module's pair goes: the GGUF tensor name (without ``.lora_a``), and
    whether its ``lora_b`` rows are RoPE-permuted with ``heads`` heads; an expert's
    ``(layer, expert, wid)`` when it is stacked."""

    name: str
    permute_heads: Optional[int] = None
    expert: Optional[tuple[int, int, str]] = None


class GgufNames:
    """gguf-py's name map for one base config: adapter module path -> :class:`GgufTarget`."""

    def __init__(self, config: dict[str, Any], where: str) -> None:
        gguf = require_gguf()
        self.hf_arch, self.rules = architecture(config, where)
        self.config = _text(config)
        self.where = where
        self.arch = getattr(gguf.MODEL_ARCH, self.rules.gguf_arch)
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self.blocks = _hparam(self.config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"), where)
        self.map = gguf.get_tensor_name_map(self.arch, self.blocks)
        self.heads = _hparam(self.config, ("n_heads", "num_attention_heads"), where)
        kv = self.config.get("n_kv_heads", self.config.get("num_key_value_heads"))
        self.kv_heads = int(kv) if kv is not None else self.heads
        self.experts = int(self.config.get("num_local_experts") or 0)

    def _name(self, hf_name: str) -> Optional[str]:
        hf_name = hf_name.replace("language_model.", "") if "language_model." in hf_name else hf_name
        return self.map.get_name(key=hf_name, try_suffixes=(".weight", ".bias"))

    def target(self, module: str) -> tuple[Optional[GgufTarget], str]:
        """The target of ``module`` (an adapter module path), or ``None`` and why not."""
        if self.rules.skips_lm_head and module == "lm_head":
            return None, "lm_head (llama.cpp's converter skips it for this architecture)"
        if module == "lm_head" and self.config.get("tie_word_embeddings"):
            return None, "lm_head of a base whose head is tied to token_embd (llama.cpp has no output tensor for it, llama.cpp #9065)"
        expert = _EXPERT.match(module) if self.rules.stacked_experts else None
        if expert is not None:
            bid, xid, wid = int(expert["bid"]), int(expert["xid"]), expert["wid"]
            name = self._name(f"layers.{bid}.feed_forward.experts.{wid}.weight")
            if name is None or not self.experts:
                return None, "an expert module the converter cannot stack"
            return GgufTarget(name, None, (bid, xid, wid)), ""
        name = self._name(module + ".weight")
        if name is None:
            return None, "a module with no llama.cpp tensor name"
        heads = None
        if self.rules.rope_permute:
            if module.endswith("q_proj"):
                heads = self.heads
            elif module.endswith("k_proj"):
                heads = self.kv_heads
        return GgufTarget(name, heads), ""


def unservable_modules(adapter: AdapterCheckpoint, config: dict[str, Any], where: str) -> dict[str, str]:
    """Adapter modules llama.cpp's GGUF cannot name (with why): they go into the serving base.

    Also checks the base config fits the adapter (a config of another model is bad input).

    Raises:
        UnsupportedFeatureError: the architecture has no GGUF export here.
        ShapeMismatchError: the adapter's shapes do not fit the base config.
    """
    names = GgufNames(config, where)
    out: dict[str, str] = {}
    experts: dict[int, set[tuple[int, str]]] = {}
    for path, m in adapter.lora.items():
        target, why = names.target(path)
        if target is None:
            out[path] = why
            continue
        _check_fits(names, path, m, where)
        if target.expert is not None:
            bid, xid, wid = target.expert
            experts.setdefault(bid, set()).add((xid, wid))
    for path, m in adapter.lora.items():
        if path in out:
            continue
        match = _EXPERT.match(path) if names.rules.stacked_experts else None
        if match is not None and len(experts.get(int(match["bid"]), ())) != names.experts * 3:
            out[path] = "an expert of a layer whose experts are not all adapted (the converter stacks only complete layers)"
    return out


def _check_fits(names: GgufNames, path: str, m: Any, where: str) -> None:
    c = names.config
    hidden = c.get("hidden_size")
    layer = re.search(r"\.layers\.(\d+)\.", "." + path)
    if layer is not None and int(layer.group(1)) >= names.blocks:
        raise ShapeMismatchError(f"adapts layer {layer.group(1)} but the base config has {names.blocks} layers", path=where, key=path, hint="is --base the adapter's base model?")
    a, b = m.tensors.get("lora_A"), m.tensors.get("lora_B")
    if a is None or b is None or m.layer_kind != "linear" or hidden is None:
        return
    head_dim = int(c.get("head_dim") or (int(hidden) // names.heads))
    expect_in = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "gate_proj": hidden, "up_proj": hidden}
    expect_out = {"q_proj": names.heads * head_dim, "k_proj": names.kv_heads * head_dim, "v_proj": names.kv_heads * head_dim, "o_proj": hidden, "down_proj": hidden}
    leaf = path.rsplit(".", 1)[-1]
    if leaf in expect_in and a.shape[-1] != expect_in[leaf] or leaf in expect_out and b.shape[0] != expect_out[leaf]:
        raise ShapeMismatchError(
            f"has lora_A {list(a.shape)} / lora_B {list(b.shape)}, which do not fit the base config "
            f"(hidden_size {hidden}, {names.heads} heads, {names.kv_heads} kv heads, head_dim {head_dim})",
            path=where,
            key=path,
            hint="is --base the adapter's base model?",
        )


# ---------------------------------------------------------------------------------------------
# WRITING
# ---------------------------------------------------------------------------------------------


def _permute(t: Any, heads: int) -> Any:
    """llama.cpp's ``LlamaModel.permute`` on the rows of ``t``."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def gguf_tensors(plan: Any, names: GgufNames) -> list[tuple[str, Any]]:
    """``(gguf name, float32 / float16 torch tensor)`` in the converter's order."""
    import torch

    from ..storage.tensor_source import TensorReader
    from .write import exported_tensors

    adapter = plan.adapter
    pairs: dict[str, dict[str, Any]] = {}
    with TensorReader(adapter.tensors_in_memory) as reader:
        for path, slot, t in exported_tensors(plan, reader):
            pairs.setdefault(path, {})[slot] = t
    # the converter walks the adapter's keys in file order (safetensors: sorted) and keeps the
    # first appearance of each module
    order = sorted(pairs, key=lambda p: min(adapter.lora[p].keys[s] for s in ("lora_A", "lora_B")))
    out: list[tuple[str, Any]] = []
    stacks: dict[int, dict[tuple[int, str], tuple[Any, Any]]] = {}
    for path in order:
        a, b = pairs[path]["lora_A"], pairs[path]["lora_B"]
        if a.dtype != b.dtype:
            a, b = a.float(), b.float()
        if a.dtype not in (torch.float16, torch.float32):
            a, b = a.float(), b.float()
        target, _ = names.target(path)
        assert target is not None  # unservable modules were baked by the plan
        if target.expert is not None:
            bid, xid, wid = target.expert
            layer = stacks.setdefault(bid, {})
            layer[(xid, wid)] = (a, b)
            if len(layer) >= names.experts * 3:
                for w in ("w1", "w2", "w3"):
                    sa = torch.stack([layer[(x, w)][0] for x in range(names.experts)], 0)
                    sb = torch.stack([layer[(x, w)][1] for x in range(names.experts)], 0)
                    name = names._name(f"layers.{bid}.feed_forward.experts.{w}.weight")
                    out += [(name + ".lora_a", sa), (name + ".lora_b", sb)]
            continue
        if target.permute_heads is not None:
            b = _permute(b, target.permute_heads)
        if target.name.startswith("token_embd."):
            a = a.T
        out += [(target.name + ".lora_a", a), (target.name + ".lora_b", b)]
    return out


def check_gguf_output(out: str, inputs: list[str], *, overwrite: bool) -> str:
    """``out`` absolute, refused (one line) when it is inside an input, a directory, or exists without ``overwrite``."""
    from ..errors import OutputPathError

    target = os.path.abspath(out)
    for source in inputs:
        src = os.path.realpath(source)
        if os.path.realpath(target).startswith(src.rstrip(os.sep) + os.sep):
            raise OutputPathError(f"is inside the input {source}", path=target, hint="write the file somewhere else; inputs are never modified")
    if os.path.isdir(target):
        raise OutputPathError("is a directory", path=target, hint="give a .gguf file path")
    if os.path.exists(target) and not overwrite:
        raise OutputPathError("exists", path=target, hint="pass --overwrite to replace it, or choose another path")
    return target


def _qtype(gguf: Any, outtype: str, name: str, ndim: int) -> Any:
    Q = gguf.GGMLQuantizationType
    if ndim <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    if name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]


def write_gguf(
    plan: Any,
    out: str,
    *,
    config: dict[str, Any],
    base_folder: str,
    hub_id: Optional[str],
    outtype: str = "f32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``plan``'s adapter as a GGUF LoRA file at ``out`` (a temporary file beside it, synced,
    renamed into place). Returns ``{"file", "architecture", "tensors", "types"}``.

    ``base_folder`` names the model when the adapter directory's model card does not (the
    converter's fallback); ``hub_id``, when the base came from the Hub, names it instead (as the
    converter's ``--base-model-id`` does).
    """
    from pathlib import Path

    from ..storage.staging import TMP_TAG, fsync_dir, fsync_file

    gguf = require_gguf()
    if outtype not in OUTTYPES:
        raise InvalidConfigError(f"unknown --outtype {outtype!r}", key="outtype", hint=f"use one of {', '.join(OUTTYPES)}")
    names = GgufNames(config, os.path.join(base_folder, MODEL_CONFIG_FILE))
    target = check_gguf_output(out, [plan.adapter.directory], overwrite=overwrite)
    tensors = gguf_tensors(plan, names)

    writer = gguf.GGUFWriter(path=None, arch=names.arch_name, endianess=gguf.GGUFEndian.LITTLE)
    types: dict[str, str] = {}
    for name, t in tensors:
        data = t.contiguous().numpy()
        qtype = _qtype(gguf, outtype, name, data.ndim)
        try:
            q = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:
            qtype = gguf.GGMLQuantizationType.F16
            q = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, q, raw_dtype=qtype)
        types[name] = qtype.name
    total_params = writer.get_total_parameter_count()[0]
    metadata = gguf.Metadata.load(None, Path(plan.adapter.directory), None, total_params)
    if hub_id:
        metadata.name = hub_id
    if metadata.name is None:
        metadata.name = Path(base_folder).name
    if metadata.size_label is None and total_params > 0:
        metadata.size_label = gguf.size_label(*writer.get_total_parameter_count())
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(plan.config["lora_alpha"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.{TMP_TAG}-{os.getpid()}")
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(parent)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"file": target, "architecture": names.arch_name, "tensors": len(tensors), "types": sorted(set(types.values()))}

