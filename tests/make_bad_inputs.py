"""Generate the bad-input corpus from the real checkpoints in ``testdata/``.

Every case is a deliberately broken *copy* of a PEFT-written checkpoint (``testdata/`` is never
modified): damaged safetensors headers and byte layouts, broken adapter configs, inconsistent
LoRA tensors, bad shard indexes, escaping symlinks and pickle files. Nothing binary is committed;
the corpus is rebuilt into a temporary directory at test time.

Each :class:`Case` says which file and key the one-line error must name and what every command
must answer (exit codes, ``load`` outcome). Run it by hand to look at the files::

    python tests/make_bad_inputs.py /tmp/corpus        # builds and lists the cases
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Optional

ROOT = Path(__file__).resolve().parent.parent
TESTDATA = ROOT / "testdata"
BASE = "tiny-llama"
ADAPTER = "tiny-llama-lora"

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INDEX = "model.safetensors.index.json"
SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"

# Keys of tiny-llama-lora used by the cases (q_proj is square 64x64, k_proj is 32x64).
PFX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
Q_A, Q_B = f"{PFX}{Q}.lora_A.weight", f"{PFX}{Q}.lora_B.weight"
K_A, K_B = f"{PFX}{K}.lora_A.weight", f"{PFX}{K}.lora_B.weight"
LM_HEAD = f"{PFX}lm_head.weight"

#: What a command must answer: exit codes for the CLI commands, ``"error"``/``"ok"`` for ``load``.
#: A command missing from the mapping does not apply (``inspect`` and ``load`` on a broken base).
Expect = Mapping[str, object]

#: The usual answer: the input cannot be read. ``verify`` reports a damaged directory as a
#: problem found (exit 1); its exit 2 is kept for a path it cannot check at all.
UNREADABLE_ADAPTER: Expect = {"inspect": 2, "check": 2, "merge": 2, "load": "error", "verify": 1}
UNREADABLE_BASE: Expect = {"check": 2, "merge": 2, "verify": 1}
#: Well-formed files whose tensors do not fit together or do not fit the base. ``inspect``
#: describes such an adapter and reports a warning (exit 0, by design); ``check`` reports that it
#: does not resolve (exit 1, its "problems found" code); ``merge`` and ``load`` refuse.
INCONSISTENT: Expect = {"inspect": 0, "check": 1, "merge": 2, "load": "error", "verify": 1}


@dataclass(frozen=True)
class Case:
    """One broken checkpoint and what every command must say about it.

    Attributes:
        name: short id (the directory name and the pytest id).
        fault: what is broken, in words.
        side: ``"adapter"`` (broken adapter, pristine base) or ``"base"`` (the reverse).
        file: text the one-line error must contain: the file name (or ``<case>/adapter`` for a
            directory-level fault).
        key: a key, field or module the error must also contain, where the fault has one.
        expect: command -> exit code (CLI) or ``"error"``/``"ok"`` (``load``).
        error: the :class:`~adapterfmt.errors.AdapterFormatError` subclass ``load`` must raise,
            where only one is right.
        finding: warning code that ``inspect --json`` must report where it exits 0 by design.
        allow_pickle: pass ``--allow-pickle`` / ``allow_pickle=True``.
        scan: pass ``inspect --scan`` (read tensor values).
        marker: a file that must never come to exist (what a pickle payload would create).
        adapter, base: the directories, filled in by :func:`build_corpus`.
    """

    name: str
    fault: str
    side: str = "adapter"
    file: str = ADAPTER_WEIGHTS
    key: Optional[str] = None
    expect: Expect = field(default_factory=lambda: dict(UNREADABLE_ADAPTER))
    error: Optional[str] = None
    finding: Optional[str] = None
    allow_pickle: bool = False
    scan: bool = False
    marker: Optional[str] = None
    adapter: str = ""
    base: str = ""

    @property
    def directory(self) -> str:
        """The directory holding the broken files (what ``verify`` checks)."""
        return self.adapter if self.side == "adapter" else self.base


#: name -> (case, breaker). A breaker gets the fresh copy to break and the case's own folder.
CASES: dict[str, tuple[Case, Callable[[Path, Path], None]]] = {}


def case(name: str, fault: str, **kw: object) -> Callable[[Callable[[Path, Path], None]], Callable[[Path, Path], None]]:
    """Register the decorated breaker as case ``name``."""
    if kw.get("side") == "base":
        kw.setdefault("expect", dict(UNREADABLE_BASE))

    def register(breaker: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
        assert name not in CASES, name
        CASES[name] = (Case(name, fault, **kw), breaker)  # type: ignore[arg-type]
        return breaker

    return register


# ---------------------------------------------------------------------------------------------
# RAW SAFETENSORS: read and write the bytes directly, so any defect can be written
# ---------------------------------------------------------------------------------------------


def read_raw(path: Path) -> tuple[dict, bytes]:
    """``(header dict in file order, data buffer)`` of a valid safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path: Path, header: "dict | bytes", data: bytes, *, declared_len: Optional[int] = None) -> None:
    """Write ``len + header + data``; ``header`` may be raw bytes, ``declared_len`` may lie."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    n = len(text) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + text + data)


def tensors_of(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """key -> (dtype, shape, bytes), in file order, plus ``__metadata__`` kept aside."""
    header, data = read_raw(path)
    header.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}


def pack(path: Path, tensors: Mapping[str, tuple[str, list[int], bytes]], metadata: Optional[dict] = None) -> None:
    """Write a well-formed safetensors file from key -> (dtype, shape, bytes)."""
    header: dict = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    data = bytearray()
    for key, (dtype, shape, raw) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    write_raw(path, header, bytes(data))


def edit_header(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite the header of ``path`` through ``change`` (data buffer unchanged)."""
    header, data = read_raw(path)
    change(header)
    write_raw(path, header, data)


def edit_tensors(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite the tensors of ``path`` (key -> (dtype, shape, bytes)) through ``change``."""
    tensors = tensors_of(path)
    change(tensors)
    pack(path, tensors)


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


# ---------------------------------------------------------------------------------------------
# SAFETENSORS HEADERS AND BYTE LAYOUTS
# ---------------------------------------------------------------------------------------------


@case("st-truncated", "file cut in half: tensor data runs past the end")
def _st_truncated(a: Path, _: Path) -> None:
    p = a / ADAPTER_WEIGHTS
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@case("st-too-short", "file shorter than the 8-byte length prefix")
def _st_too_short(a: Path, _: Path) -> None:
    (a / ADAPTER_WEIGHTS).write_bytes(b"\x10\x00\x00")


@case("st-empty-file", "zero-byte weights file")
def _st_empty_file(a: Path, _: Path) -> None:
    (a / ADAPTER_WEIGHTS).write_bytes(b"")


@case("st-header-past-eof", "header length prefix points past the end of the file")
def _st_header_past_eof(a: Path, _: Path) -> None:
    p = a / ADAPTER_WEIGHTS
    header, data = read_raw(p)
    write_raw(p, header, data, declared_len=p.stat().st_size + 1000)


@case("st-header-over-100mb", "header length prefix of 2**40 (declared only, never allocated)")
def _st_header_over_100mb(a: Path, _: Path) -> None:
    p = a / ADAPTER_WEIGHTS
    header, data = read_raw(p)
    write_raw(p, header, data, declared_len=2**40)


@case("st-header-not-json", "header bytes are not JSON")
def _st_header_not_json(a: Path, _: Path) -> None:
    p = a / ADAPTER_WEIGHTS
    header, data = read_raw(p)
    write_raw(p, b"{" + b"x" * (len(json.dumps(header, separators=(",", ":"))) - 1), data)


@case("st-header-not-object", "header is a JSON array, not an object")
def _st_header_not_object(a: Path, _: Path) -> None:
    p = a / ADAPTER_WEIGHTS
    write_raw(p, b"[1, 2, 3]", read_raw(p)[1])


@case("st-header-not-utf8", "header bytes are not UTF-8")
def _st_header_not_utf8(a: Path, _: Path) -> None:
    p = a / ADAPTER_WEIGHTS
    write_raw(p, b'{"\xff\xfe": 1}', read_raw(p)[1])


@case("st-header-nested", "header is 100k nested arrays (JSON recursion bomb)")
def _st_header_nested(a: Path, _: Path) -> None:
    write_raw(a / ADAPTER_WEIGHTS, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"")


@case("st-entry-not-object", "a tensor entry is a number", key=Q_A)
def _st_entry_not_object(a: Path, _: Path) -> None:
    edit_header(a / ADAPTER_WEIGHTS, lambda h: h.__setitem__(Q_A, 7))


@case("st-offsets-overlap", "a tensor's data_offsets overlap the previous tensor", key=Q_B)
def _st_offsets_overlap(a: Path, _: Path) -> None:
    def overlap(h: dict) -> None:
        begin, end = h[Q_B]["data_offsets"]
        h[Q_B]["data_offsets"] = [h[Q_A]["data_offsets"][0], h[Q_A]["data_offsets"][0] + end - begin]

    edit_header(a / ADAPTER_WEIGHTS, overlap)


@case("st-offsets-out-of-range", "the last tensor's data_offsets end past the buffer")
def _st_offsets_out_of_range(a: Path, _: Path) -> None:
    def past_end(h: dict) -> None:
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        begin, end = h[last]["data_offsets"]
        h[last]["data_offsets"] = [begin + 4096, end + 4096]

    edit_header(a / ADAPTER_WEIGHTS, past_end)


@case("st-offsets-reversed", "data_offsets [end, begin]", key=Q_A)
def _st_offsets_reversed(a: Path, _: Path) -> None:
    edit_header(a / ADAPTER_WEIGHTS, lambda h: h[Q_A].__setitem__("data_offsets", h[Q_A]["data_offsets"][::-1]))


@case("st-offsets-negative", "negative data_offsets", key=Q_A)
def _st_offsets_negative(a: Path, _: Path) -> None:
    edit_header(a / ADAPTER_WEIGHTS, lambda h: h[Q_A].__setitem__("data_offsets", [-8, h[Q_A]["data_offsets"][1]]))


@case("st-trailing-bytes", "4 KiB after the last tensor that no header entry covers")
def _st_trailing_bytes(a: Path, _: Path) -> None:
    p = a / ADAPTER_WEIGHTS
    p.write_bytes(p.read_bytes() + b"\0" * 4096)


@case("st-unknown-dtype", "dtype 'F17'", key=Q_A)
def _st_unknown_dtype(a: Path, _: Path) -> None:
    edit_header(a / ADAPTER_WEIGHTS, lambda h: h[Q_A].__setitem__("dtype", "F17"))


@case("st-shape-bytes-mismatch", "shape x dtype does not equal the byte length", key=Q_A)
def _st_shape_bytes_mismatch(a: Path, _: Path) -> None:
    edit_header(a / ADAPTER_WEIGHTS, lambda h: h[Q_A].__setitem__("shape", [8, 65]))


@case("st-shape-not-ints", "shape holds a string", key=Q_A)
def _st_shape_not_ints(a: Path, _: Path) -> None:
    edit_header(a / ADAPTER_WEIGHTS, lambda h: h[Q_A].__setitem__("shape", [8, "64"]))


@case("st-huge-shape", "shape [2**40, 2**40] with matching 4 YiB offsets (nothing may allocate it)")
def _st_huge_shape(a: Path, _: Path) -> None:
    def huge(h: dict) -> None:
        begin = h[Q_A]["data_offsets"][0]
        h[Q_A].update(shape=[2**40, 2**40], data_offsets=[begin, begin + 2**80 * 4])

    edit_header(a / ADAPTER_WEIGHTS, huge)


@case("st-duplicate-key", "the same key twice in the header", key=Q_A)
def _st_duplicate_key(a: Path, _: Path) -> None:
    p = a / ADAPTER_WEIGHTS
    header, data = read_raw(p)
    text = json.dumps(header, separators=(",", ":"))
    entry = json.dumps({Q_A: header[Q_A]}, separators=(",", ":"))[1:-1]
    write_raw(p, (text[:-1] + "," + entry + "}").encode(), data)


@case("st-metadata-not-strings", "__metadata__ maps a string to a number", key="__metadata__")
def _st_metadata_not_strings(a: Path, _: Path) -> None:
    edit_header(a / ADAPTER_WEIGHTS, lambda h: h.__setitem__("__metadata__", {"format": 1}))


@case(
    "st-fifo",
    "adapter_model.safetensors is a named pipe (opening it would block)",
    file="st-fifo/adapter",
    expect={**UNREADABLE_ADAPTER, "verify": 2},
)
def _st_fifo(a: Path, _: Path) -> None:
    (a / ADAPTER_WEIGHTS).unlink()
    os.mkfifo(a / ADAPTER_WEIGHTS)


@case("shard-truncated", "second base shard cut short", side="base", file=SHARD2)
def _shard_truncated(base: Path, _: Path) -> None:
    p = base / SHARD2
    p.write_bytes(p.read_bytes()[:-100])


@case("shard-header-not-json", "first base shard's header is not JSON", side="base", file=SHARD1)
def _shard_header_not_json(base: Path, _: Path) -> None:
    p = base / SHARD1
    header, data = read_raw(p)
    write_raw(p, b"{" + b"\x00" * (len(json.dumps(header, separators=(",", ":"))) - 1), data)


# ---------------------------------------------------------------------------------------------
# TENSORS THAT DO NOT FIT TOGETHER OR DO NOT FIT THE BASE
# ---------------------------------------------------------------------------------------------


@case("lora-rank-disagree", "lora_A has rank 8, lora_B rank 6", key=Q, finding="rank-mismatch", expect=INCONSISTENT)
def _lora_rank_disagree(a: Path, _: Path) -> None:
    def rank6(t: dict) -> None:
        dtype, shape, raw = t[Q_B]
        t[Q_B] = (dtype, [shape[0], 6], b"".join(raw[r * 32 : r * 32 + 24] for r in range(shape[0])))

    edit_tensors(a / ADAPTER_WEIGHTS, rank6)


@case("lora-orphan-a", "lora_A without its lora_B", key=Q, finding="orphan-lora", expect=INCONSISTENT)
def _lora_orphan_a(a: Path, _: Path) -> None:
    edit_tensors(a / ADAPTER_WEIGHTS, lambda t: t.pop(Q_B))


@case(
    "lora-shape-vs-base",
    "k_proj lora_A has 32 input features; the base k_proj has 64",
    key=K,
    expect={**INCONSISTENT, "verify": 0},
)
def _lora_shape_vs_base(a: Path, _: Path) -> None:
    def narrow(t: dict) -> None:
        dtype, shape, raw = t[K_A]
        t[K_A] = (dtype, [shape[0], 32], b"".join(raw[r * 256 : r * 256 + 128] for r in range(shape[0])))

    edit_tensors(a / ADAPTER_WEIGHTS, narrow)


@case(
    "full-copy-shape-vs-base",
    "lm_head full copy has 255 rows; the base lm_head has 256",
    key="lm_head",
    expect={**INCONSISTENT, "verify": 0},
)
def _full_copy_shape_vs_base(a: Path, _: Path) -> None:
    def shorter(t: dict) -> None:
        dtype, shape, raw = t[LM_HEAD]
        t[LM_HEAD] = (dtype, [shape[0] - 1, shape[1]], raw[: (shape[0] - 1) * shape[1] * 4])

    edit_tensors(a / ADAPTER_WEIGHTS, shorter)


UNKNOWN_KEY = f"{PFX}{Q}.lora_C.weight"


@case("key-unknown", "a tensor no rule of the key grammar explains (lora_C)", key=UNKNOWN_KEY, finding="unknown-key", expect=INCONSISTENT)
def _key_unknown(a: Path, _: Path) -> None:
    edit_tensors(a / ADAPTER_WEIGHTS, lambda t: t.__setitem__(UNKNOWN_KEY, t[Q_A]))


EMPTY_SEGMENT_KEY = f"{PFX}model..layers.0.lora_A.weight"


@case("key-empty-segment", "a key with an empty dotted segment", key=EMPTY_SEGMENT_KEY)
def _key_empty_segment(a: Path, _: Path) -> None:
    edit_tensors(a / ADAPTER_WEIGHTS, lambda t: t.__setitem__(EMPTY_SEGMENT_KEY, t[Q_A]))


@case(
    "non-finite",
    "NaN and +inf in q_proj lora_B (inspect --scan reports them; merge and load refuse them)",
    key=Q_B,
    finding="non-finite",
    scan=True,
    error="NonFiniteValuesError",
    expect={"inspect": 0, "check": 0, "merge": 2, "load": "error", "verify": 0},
)
def _non_finite(a: Path, _: Path) -> None:
    def nan(t: dict) -> None:
        dtype, shape, raw = t[Q_B]
        t[Q_B] = (dtype, shape, struct.pack("<ff", float("nan"), float("inf")) + raw[8:])

    edit_tensors(a / ADAPTER_WEIGHTS, nan)


@case(
    "lora-exotic-dtype",
    "q_proj lora_A stored as F4 (a valid safetensors dtype torch cannot compute with); inspect --scan reads it",
    key=Q_A,
    scan=True,
    error="UnsupportedFeatureError",
    expect={"inspect": 2, "check": 0, "merge": 2, "load": "error", "verify": 0},
)
def _lora_exotic_dtype(a: Path, _: Path) -> None:
    def f4(t: dict) -> None:
        _, shape, raw = t[Q_A]
        t[Q_A] = ("F4", shape, raw[: shape[0] * shape[1] // 2])

    edit_tensors(a / ADAPTER_WEIGHTS, f4)


@case("empty-adapter", "weights file with no tensors at all")
def _empty_adapter(a: Path, _: Path) -> None:
    pack(a / ADAPTER_WEIGHTS, {})


# ---------------------------------------------------------------------------------------------
# ADAPTER CONFIG
# ---------------------------------------------------------------------------------------------


@case("method-adalora-over-lora", "peft_type ADALORA over plain lora_A.weight / lora_B.weight (no lora_E)", key="lora_E")
def _method_adalora_over_lora(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("peft_type", "ADALORA"))


@case("method-loha-over-lora", "peft_type LOHA over LoRA tensors", key="peft_type")
def _method_loha_over_lora(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("peft_type", "LOHA"))


@case("method-lokr-over-lora", "peft_type LOKR over LoRA tensors", key="peft_type")
def _method_lokr_over_lora(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("peft_type", "LOKR"))


@case("method-lora-with-adalora-e", "peft_type LORA, and an AdaLoRA lora_E among the tensors", key="lora_E")
def _method_lora_with_adalora_e(a: Path, _: Path) -> None:
    def add_e(t: dict) -> None:
        dtype, shape, _raw = t[Q_A]
        t[f"{PFX}{Q}.lora_E"] = (dtype, [shape[0], 1], bytes(4 * shape[0]))

    edit_tensors(a / ADAPTER_WEIGHTS, add_e)


@case("config-not-json", "config is not JSON", file=ADAPTER_CONFIG)
def _config_not_json(a: Path, _: Path) -> None:
    (a / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": 8,')


@case("config-not-object", "config is a JSON list", file=ADAPTER_CONFIG)
def _config_not_object(a: Path, _: Path) -> None:
    (a / ADAPTER_CONFIG).write_text("[1, 2]")


@case("config-no-peft-type", "config lacks peft_type", file=ADAPTER_CONFIG, key="peft_type")
def _config_no_peft_type(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.pop("peft_type"))


@case("config-not-lora", "peft_type IA3", file=ADAPTER_CONFIG, key="peft_type")
def _config_not_lora(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("peft_type", "IA3"))


@case("config-r-zero", "r = 0", file=ADAPTER_CONFIG, key="'r'")
def _config_r_zero(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("r", 0))


@case("config-r-negative", "r = -8", file=ADAPTER_CONFIG, key="'r'")
def _config_r_negative(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("r", -8))


@case("config-alpha-negative", "lora_alpha = -16", file=ADAPTER_CONFIG, key="lora_alpha")
def _config_alpha_negative(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("lora_alpha", -16))


@case("config-alpha-nan", "lora_alpha = NaN (Python's json accepts it)", file=ADAPTER_CONFIG, key="lora_alpha")
def _config_alpha_nan(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("lora_alpha", float("nan")))


@case("config-alpha-infinity", "lora_alpha = Infinity", file=ADAPTER_CONFIG, key="lora_alpha")
def _config_alpha_infinity(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("lora_alpha", float("inf")))


@case("config-r-huge", "r = 10**400 (too large for a float)", file=ADAPTER_CONFIG, key="'r'")
def _config_r_huge(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("r", 10**400))


@case("config-rank-pattern-nan", "rank_pattern value NaN", file=ADAPTER_CONFIG, key="rank_pattern.down_proj")
def _config_rank_pattern_nan(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("rank_pattern", {"down_proj": float("nan")}))


@case("config-bad-regex", "target_modules is the regex '(q_proj'", file=ADAPTER_CONFIG, key="target_modules")
def _config_bad_regex(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("target_modules", "(q_proj"))


@case("config-bad-rank-pattern", "rank_pattern value -4", file=ADAPTER_CONFIG, key="rank_pattern.down_proj")
def _config_bad_rank_pattern(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__("rank_pattern", {"down_proj": -4}))


# the line names the missing config, never "unknown format" over one of the keys (issue 22)
@case("config-missing", "no adapter_config.json (weights only)", file="config-missing/adapter", key=ADAPTER_CONFIG)
def _config_missing(a: Path, _: Path) -> None:
    (a / ADAPTER_CONFIG).unlink()


@case(
    "weights-missing",
    "config but no weights file",
    file="weights-missing/adapter",
    expect={**UNREADABLE_ADAPTER, "verify": 2},
)
def _weights_missing(a: Path, _: Path) -> None:
    (a / ADAPTER_WEIGHTS).unlink()


# ---------------------------------------------------------------------------------------------
# CONFIG FIELDS OF THE WRONG JSON TYPE (PEFT's LoraConfig declares each; truthiness never decides)
# ---------------------------------------------------------------------------------------------

#: case name -> (field, wrong value, the key the error names)
WRONG_TYPES: dict[str, tuple[str, object, str]] = {
    "config-type-fan-in-fan-out-string": ("fan_in_fan_out", "false", "fan_in_fan_out"),
    "config-type-layers-pattern-int": ("layers_pattern", 3, "layers_pattern"),
    "config-type-use-dora-string": ("use_dora", "true", "use_dora"),
    "config-type-use-rslora-int": ("use_rslora", 1, "use_rslora"),
    "config-type-lora-bias-string": ("lora_bias", "false", "lora_bias"),
    "config-type-r-float": ("r", 8.0, "'r'"),
    "config-type-alpha-string": ("lora_alpha", "16", "lora_alpha"),
    "config-type-target-modules-number": ("target_modules", 5, "target_modules"),
    "config-type-modules-to-save-string": ("modules_to_save", "lm_head", "modules_to_save"),
    "config-type-layers-to-transform-string": ("layers_to_transform", "0", "layers_to_transform"),
    "config-type-rank-pattern-value-string": ("rank_pattern", {"down_proj": "4"}, "rank_pattern.down_proj"),
    "config-type-init-weights-number": ("init_lora_weights", 1, "init_lora_weights"),
    "config-type-token-indices-string": ("trainable_token_indices", "1,2", "trainable_token_indices"),
    "config-type-layer-replication-strings": ("layer_replication", [["0", "2"]], "layer_replication"),
}


def _register_wrong_type(name: str, fieldname: str, value: object, key: str) -> None:
    @case(name, f"{fieldname} = {value!r} (wrong JSON type)", file=ADAPTER_CONFIG, key=key)
    def _break(a: Path, _: Path) -> None:
        edit_json(a / ADAPTER_CONFIG, lambda d: d.__setitem__(fieldname, value))


for _name, (_field, _value, _key) in WRONG_TYPES.items():
    _register_wrong_type(_name, _field, _value, _key)


# ---------------------------------------------------------------------------------------------
# HOSTILE PATTERNS: regexes that would backtrack for ever are refused in one line, never run
# ---------------------------------------------------------------------------------------------

#: case name -> (field, value, the key the error names)
HOSTILE_PATTERNS: dict[str, tuple[str, object, str]] = {
    "pattern-target-nested-quantifier": ("target_modules", "(a+)+b", "target_modules"),
    "pattern-exclude-nested-quantifier": ("exclude_modules", "(.*a){20}", "exclude_modules"),
    "pattern-rank-key-nested": ("rank_pattern", {r"(\w+\.)*q_proj": 4}, "rank_pattern."),
    "pattern-alpha-key-alternation": ("alpha_pattern", {"(a|ab)*c": 4}, "alpha_pattern."),
    "pattern-layers-backreference": ("layers_pattern", r"(l)\1", "layers_pattern"),
    "pattern-modules-to-save-nested": ("modules_to_save", ["(lm_+)+head"], "modules_to_save"),
    "pattern-target-polynomial": ("target_modules", ".*" * 12 + "x", "target_modules"),
    "pattern-rank-key-polynomial": ("rank_pattern", {".*" * 12 + "_proj": 4}, "rank_pattern."),
}


def _register_hostile(name: str, fieldname: str, value: object, key: str) -> None:
    @case(name, f"{fieldname} = {value!r} (catastrophic backtracking)", file=ADAPTER_CONFIG, key=key)
    def _break(a: Path, _: Path) -> None:
        def change(d: dict) -> None:
            d[fieldname] = value
            if fieldname == "layers_pattern":
                d["layers_to_transform"] = [0]

        edit_json(a / ADAPTER_CONFIG, change)


for _name, (_field, _value, _key) in HOSTILE_PATTERNS.items():
    _register_hostile(_name, _field, _value, _key)


@case(
    "config-selects-nothing",
    "layers_to_transform [5] with layers_pattern 'layers': the selection matches none of the 14 LoRA modules",
    file=ADAPTER_CONFIG,
    finding="config-tensor-mismatch",
    expect={"inspect": 0, "check": 0, "merge": 0, "verify": 0},
)
def _config_selects_nothing(a: Path, _: Path) -> None:
    edit_json(a / ADAPTER_CONFIG, lambda d: d.update(layers_to_transform=[5], layers_pattern="layers"))


# ---------------------------------------------------------------------------------------------
# SHARD INDEX AND PATHS ESCAPING THE MODEL DIRECTORY
# ---------------------------------------------------------------------------------------------

GATE = "model.layers.0.mlp.gate_proj.weight"  # held by shard 1


@case("index-not-json", "index is not JSON", side="base", file=INDEX)
def _index_not_json(base: Path, _: Path) -> None:
    (base / INDEX).write_text('{"weight_map": ')


@case("index-no-weight-map", "index has no weight_map", side="base", file=INDEX, key="weight_map")
def _index_no_weight_map(base: Path, _: Path) -> None:
    edit_json(base / INDEX, lambda d: d.pop("weight_map"))


@case("index-shard-dotdot", "index names '../x.safetensors' (which exists)", side="base", file=INDEX, key="../x.safetensors")
def _index_shard_dotdot(base: Path, folder: Path) -> None:
    (folder / "x.safetensors").write_bytes((base / SHARD1).read_bytes())
    edit_json(base / INDEX, lambda d: d["weight_map"].__setitem__(GATE, "../x.safetensors"))


@case("index-shard-absolute", "index names an absolute path (which exists)", side="base", file=INDEX, key="outside.safetensors")
def _index_shard_absolute(base: Path, folder: Path) -> None:
    outside = folder / "outside.safetensors"
    outside.write_bytes((base / SHARD1).read_bytes())
    edit_json(base / INDEX, lambda d: d["weight_map"].__setitem__(GATE, str(outside.resolve())))


MISSING_SHARD = "model-00004-of-00003.safetensors"


@case("index-missing-shard", "index names a shard that does not exist", side="base", file=INDEX, key=MISSING_SHARD)
def _index_missing_shard(base: Path, _: Path) -> None:
    edit_json(base / INDEX, lambda d: d["weight_map"].__setitem__(GATE, MISSING_SHARD))


@case("index-key-not-in-shard", "index maps a key to a shard that does not hold it", side="base", file=INDEX, key=GATE)
def _index_key_not_in_shard(base: Path, _: Path) -> None:
    edit_json(base / INDEX, lambda d: d["weight_map"].__setitem__(GATE, SHARD2))


ABSENT_KEY = "model.layers.9.mlp.up_proj.weight"


@case("index-key-absent", "index names a key no shard holds", side="base", file=INDEX, key=ABSENT_KEY)
def _index_key_absent(base: Path, _: Path) -> None:
    edit_json(base / INDEX, lambda d: d["weight_map"].__setitem__(ABSENT_KEY, SHARD1))


@case("shard-symlink-escape", "a shard is a symlink to a file outside the model directory", side="base", file=SHARD2)
def _shard_symlink_escape(base: Path, folder: Path) -> None:
    outside = folder / "elsewhere" / SHARD2
    outside.parent.mkdir()
    (base / SHARD2).rename(outside)
    (base / SHARD2).symlink_to(os.path.relpath(outside, base))


@case(
    "single-file-symlink-escape",
    "the adapter's weights file is a symlink to a file outside the adapter directory",
    error="UnsafeFileError",
)
def _single_file_symlink_escape(a: Path, folder: Path) -> None:
    outside = folder / "elsewhere" / ADAPTER_WEIGHTS
    outside.parent.mkdir()
    (a / ADAPTER_WEIGHTS).rename(outside)
    (a / ADAPTER_WEIGHTS).symlink_to(os.path.relpath(outside, a))


@case(
    "base-file-symlink-escape",
    "the base's tokenizer.json is a symlink to a private file outside the model directory (merge copies non-weight files)",
    side="base",
    file="tokenizer.json",
    expect={"check": 0, "merge": 2, "verify": 1},
)
def _base_file_symlink_escape(base: Path, folder: Path) -> None:
    secret = folder / "home" / ".netrc"
    secret.parent.mkdir()
    secret.write_text("machine huggingface.co login me password hunter2\n")
    (base / "tokenizer.json").symlink_to(os.path.relpath(secret, base))


@case("base-config-not-json", "base config.json is not JSON", side="base", file="config.json")
def _base_config_not_json(base: Path, _: Path) -> None:
    (base / "config.json").write_text("{architectures: [")


@case(
    "base-no-weights",
    "base directory without any safetensors",
    side="base",
    file="base-no-weights/base",
    expect={"check": 2, "merge": 2, "verify": 2},
)
def _base_no_weights(base: Path, _: Path) -> None:
    for f in base.glob("*.safetensors*"):
        f.unlink()


# ---------------------------------------------------------------------------------------------
# PICKLE .bin ADAPTERS
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: unpickling it without restriction creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _save_bin(a: Path, obj: object, *, legacy: bool = False) -> None:
    """Replace the adapter's safetensors file by ``adapter_model.bin`` holding ``obj``."""
    import pickle

    import torch

    (a / ADAPTER_WEIGHTS).unlink()
    if legacy:
        with open(a / ADAPTER_BIN, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, a / ADAPTER_BIN)


def _state(a: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(a / ADAPTER_WEIGHTS))


ADAPTER_BIN = "adapter_model.bin"


@case("pickle-bin", "a .bin adapter without --allow-pickle", file=ADAPTER_BIN, error="UnsafeFileError")
def _pickle_bin(a: Path, _: Path) -> None:
    _save_bin(a, _state(a))


@case(
    "pickle-bin-allowed",
    "the same .bin with --allow-pickle: read with weights_only=True and accepted (positive control)",
    file=ADAPTER_BIN,
    allow_pickle=True,
    # verify never unpickles: it reports a .bin as a problem it cannot check (exit 1).
    expect={"inspect": 0, "check": 0, "merge": 0, "load": "ok", "verify": 1},
)
def _pickle_bin_allowed(a: Path, _: Path) -> None:
    _save_bin(a, _state(a))


@case(
    "pickle-malicious",
    "a torch.save pickle whose __reduce__ would create a file, with --allow-pickle",
    file=ADAPTER_BIN,
    allow_pickle=True,
    error="UnsafeFileError",
    marker="PWNED",
)
def _pickle_malicious(a: Path, folder: Path) -> None:
    _save_bin(a, {Q_A: _state(a)[Q_A], "payload": _Payload(folder / "PWNED")})


@case(
    "pickle-malicious-legacy",
    "a plain (non-zip) pickle whose __reduce__ would create a file, with --allow-pickle",
    file=ADAPTER_BIN,
    allow_pickle=True,
    error="UnsafeFileError",
    marker="PWNED",
)
def _pickle_malicious_legacy(a: Path, folder: Path) -> None:
    _save_bin(a, {Q_A: _state(a)[Q_A], "payload": _Payload(folder / "PWNED")}, legacy=True)


@case("pickle-garbage", "a .bin that is not a pickle at all, with --allow-pickle", file=ADAPTER_BIN, allow_pickle=True)
def _pickle_garbage(a: Path, _: Path) -> None:
    (a / ADAPTER_WEIGHTS).unlink()
    (a / ADAPTER_BIN).write_bytes(b"PK\x03\x04 not really a zip" * 10)


# ---------------------------------------------------------------------------------------------
# OUTPUT FILESYSTEM FAULTS: pristine inputs, a hostile place to write OUT (real filesystems)
# ---------------------------------------------------------------------------------------------


@dataclass
class OutputSetup:
    """Where a fault case writes: ``out``, extra CLI args, a file-size limit, and what to undo."""

    out: Path
    args: tuple[str, ...] = ()
    fsize_limit: Optional[int] = None  #: RLIMIT_FSIZE of the merge process (bytes)
    created_parents: tuple[Path, ...] = ()  #: folders the run creates and must remove on failure
    undo: list = field(default_factory=list)  #: callables run after the case (unmount, ...)


@dataclass(frozen=True)
class OutputFault:
    """A merge into a broken place: the exit code and what the one error line must contain.

    ``mounts``: the case mounts filesystems (root on Linux); skipped with the reason elsewhere.
    ``ok_files``: on success, files OUT must hold.
    """

    name: str
    fault: str
    setup: Callable[[Path], OutputSetup]
    exit_code: int = 2
    line_has: tuple[str, ...] = ()
    mounts: bool = True
    ok_files: tuple[str, ...] = ()


OUTPUT_FAULTS: dict[str, OutputFault] = {}


def output_fault(name: str, fault: str, **kw: object) -> Callable[[Callable[[Path], OutputSetup]], Callable[[Path], OutputSetup]]:
    def register(setup: Callable[[Path], OutputSetup]) -> Callable[[Path], OutputSetup]:
        assert name not in OUTPUT_FAULTS, name
        OUTPUT_FAULTS[name] = OutputFault(name, fault, setup, **kw)  # type: ignore[arg-type]
        return setup

    return register


def _run(*cmd: str) -> None:
    import subprocess

    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def mount_tmpfs(path: Path, options: str, undo: list) -> Path:
    """Mount a tmpfs at ``path`` (created); its unmount is appended to ``undo``."""
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path))
    undo.append(lambda: _run("umount", "-l", str(path)))
    return path


def remount_read_only(path: Path, *, bind: bool = False) -> None:
    _run("mount", "-o", "remount,bind,ro" if bind else "remount,ro", str(path))


MERGED_FILES = ("config.json", INDEX, SHARD1, SHARD2, "model-00003-of-00003.safetensors")


@output_fault("fs-readonly-fs", "OUT on a tmpfs remounted read-only", line_has=("Read-only file system", "EROFS", "ro"))
def _fs_readonly(folder: Path) -> OutputSetup:
    s = OutputSetup(folder / "ro" / "OUT")
    mount_tmpfs(folder / "ro", "size=64m", s.undo)
    remount_read_only(folder / "ro")
    return s


@output_fault("fs-readonly-bind", "OUT inside a read-only bind mount of a writable folder", line_has=("Read-only file system", "EROFS"))
def _fs_readonly_bind(folder: Path) -> OutputSetup:
    real, view = folder / "real", folder / "view"
    real.mkdir()
    view.mkdir()
    s = OutputSetup(view / "OUT")
    _run("mount", "--bind", str(real), str(view))
    s.undo.append(lambda: _run("umount", "-l", str(view)))
    remount_read_only(view, bind=True)
    return s


@output_fault(
    "fs-readonly-missing-parents",
    "OUT's missing parents would be created on a read-only filesystem",
    line_has=("Read-only file system", "EROFS"),
)
def _fs_readonly_missing_parents(folder: Path) -> OutputSetup:
    s = OutputSetup(folder / "ro" / "a" / "b" / "OUT")
    mount_tmpfs(folder / "ro", "size=64m", s.undo)
    remount_read_only(folder / "ro")
    return s


@output_fault("fs-no-space", "OUT on a 200 KiB tmpfs: refused before writing", line_has=("needs", "space"))
def _fs_no_space(folder: Path) -> OutputSetup:
    s = OutputSetup(folder / "small" / "OUT")
    mount_tmpfs(folder / "small", "size=200k", s.undo)
    return s


@output_fault("fs-no-inodes", "OUT on a tmpfs with room for one more inode (the staging folder)", line_has=("no free inodes", "ENOSPC"))
def _fs_no_inodes(folder: Path) -> OutputSetup:
    s = OutputSetup(folder / "few" / "OUT")
    mount_tmpfs(folder / "few", "size=64m,nr_inodes=2", s.undo)
    return s


@output_fault(
    "fs-file-size-limit",
    "a 64 KiB file-size limit (RLIMIT_FSIZE, like a quota per file): the first shard cannot be written",
    line_has=("File too large", "EFBIG"),
    mounts=False,
)
def _fs_file_size_limit(folder: Path) -> OutputSetup:
    return OutputSetup(folder / "OUT", fsize_limit=64 << 10)


@output_fault(
    "fs-missing-parents-removed",
    "OUT's parents a/b/c do not exist and the merge fails (file-size limit): the folders it made are removed",
    line_has=("File too large", "EFBIG"),
    mounts=False,
)
def _fs_missing_parents_removed(folder: Path) -> OutputSetup:
    return OutputSetup(folder / "a" / "b" / "c" / "OUT", fsize_limit=64 << 10, created_parents=(folder / "a",))


@output_fault(
    "fs-missing-parents-created",
    "OUT's parents a/b do not exist: created, and kept once the merge succeeds",
    exit_code=0,
    mounts=False,
    ok_files=MERGED_FILES,
)
def _fs_missing_parents_created(folder: Path) -> OutputSetup:
    return OutputSetup(folder / "a" / "b" / "OUT")


@output_fault("fs-parent-is-file", "OUT's parent is a regular file", line_has=("Not a directory", "ENOTDIR", "afile"), mounts=False)
def _fs_parent_is_file(folder: Path) -> OutputSetup:
    (folder / "afile").write_text("x")
    return OutputSetup(folder / "afile" / "sub" / "OUT")


@output_fault(
    "fs-name-too-long",
    "OUT's own name is 300 bytes (longer than a file name may be): refused before writing",
    line_has=("File name too long", "ENAMETOOLONG"),
    mounts=False,
)
def _fs_name_too_long(folder: Path) -> OutputSetup:
    return OutputSetup(folder / ("o" * 300))


@output_fault(
    "fs-name-250",
    "OUT's name is 250 bytes: valid, though '.OUT.adapterfmt-tmp-PID' would not be (the stage name is shortened)",
    exit_code=0,
    mounts=False,
    ok_files=MERGED_FILES,
)
def _fs_name_250(folder: Path) -> OutputSetup:
    return OutputSetup(folder / ("o" * 250))


@output_fault(
    "fs-mount-point-out",
    "OUT is an empty mount point (a container volume): written in place, file by file, and said so",
    exit_code=0,
    ok_files=MERGED_FILES,
)
def _fs_mount_point_out(folder: Path) -> OutputSetup:
    s = OutputSetup(folder / "volume")
    mount_tmpfs(folder / "volume", "size=64m", s.undo)
    return s


@output_fault(
    "fs-mount-point-out-overwrite",
    "OUT is a mount point holding an older model, with --overwrite: replaced in place",
    exit_code=0,
    ok_files=MERGED_FILES,
)
def _fs_mount_point_out_overwrite(folder: Path) -> OutputSetup:
    s = OutputSetup(folder / "volume", args=("--overwrite",))
    mount_tmpfs(folder / "volume", "size=64m", s.undo)
    (folder / "volume" / "stale-weights.safetensors").write_bytes(b"old")
    return s


@output_fault(
    "fs-mount-point-out-not-empty",
    "OUT is a mount point holding files, without --overwrite: refused",
    line_has=("not empty", "--overwrite"),
)
def _fs_mount_point_out_not_empty(folder: Path) -> OutputSetup:
    s = OutputSetup(folder / "volume")
    mount_tmpfs(folder / "volume", "size=64m", s.undo)
    (folder / "volume" / "keep.txt").write_text("mine")
    return s


# ---------------------------------------------------------------------------------------------
# SIGNALS: a merge stopped at its pause points (tests/_pause_cli.py) the way process managers do
# ---------------------------------------------------------------------------------------------

#: case name -> (signal name, pause point): SIGTERM (docker stop, systemd, job schedulers) and
#: SIGHUP (a closed terminal) at every step a merge goes through.
SIGNAL_CASES: dict[str, tuple[str, str]] = {
    f"signal-{sig.lower()[3:]}-{point.replace(':', '')}": (sig, point)
    for sig in ("SIGTERM", "SIGHUP")
    for point in ("start", "write:1", "write:2", "files", "rename")
}


# ---------------------------------------------------------------------------------------------
# BUILD
# ---------------------------------------------------------------------------------------------


def build_corpus(root: "str | os.PathLike[str]", names: Optional[list[str]] = None) -> list[Case]:
    """Build the cases (all, or ``names``) under ``root``; return them with their paths filled in.

    Layout: ``root/_pristine/{tiny-llama,tiny-llama-lora}`` (the unbroken side of every case) and
    ``root/<case>/{adapter|base}`` (the broken copy), plus whatever a case puts beside it.
    """
    root = Path(root)
    pristine = {name: root / "_pristine" / name for name in (BASE, ADAPTER)}
    for name, dst in pristine.items():
        shutil.copytree(TESTDATA / name, dst)
    out = []
    for name in names or list(CASES):
        spec, breaker = CASES[name]
        folder = root / name
        broken = folder / spec.side
        shutil.copytree(TESTDATA / (ADAPTER if spec.side == "adapter" else BASE), broken)
        breaker(broken, folder)
        adapter, base = (broken, pristine[BASE]) if spec.side == "adapter" else (pristine[ADAPTER], broken)
        marker = str(folder / spec.marker) if spec.marker else None
        out.append(replace(spec, adapter=str(adapter), base=str(base), marker=marker))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/make_bad_inputs.py OUT_DIR")
    for c in build_corpus(sys.argv[1]):
        print(f"{c.name:26} {c.fault}")
