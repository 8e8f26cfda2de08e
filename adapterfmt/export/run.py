"""``export_adapter``: plan, check every input and output first, bake the serving base, write the adapter.

Order: read the adapter (and the base's config.json for llama.cpp), plan, refuse what cannot be
done (nothing written yet), check both output paths, then write the serving base through the
merge engine (staged, atomic), then the adapter (staged, atomic). If the adapter cannot be
written after the serving base was, the serving base is removed again: an export leaves both
outputs or neither.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import InvalidConfigError, UnsupportedFeatureError
from ..formats.peft.reading import read_adapter
from .engines import ENGINE_NAMES, ENGINES
from .plan import ExportPlan, plan_export


@dataclass
class ExportResult:
    """What :func:`export_adapter` wrote and decided (``as_dict`` is the CLI's ``--json``)."""

    engine: str
    output: str
    files: list[str]
    plan: ExportPlan
    serving_base: Optional[str] = None
    base_summary: Optional[dict[str, Any]] = None
    gguf: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        doc = {"engine": self.engine, "output": self.output, "files": self.files, "serving_base": self.serving_base, "notes": self.notes}
        doc.update(self.plan.as_dict())
        doc["engine"] = self.engine
        if self.gguf is not None:
            doc["gguf"] = {k: v for k, v in self.gguf.items() if k != "file"}
        if self.base_summary is not None:
            doc["serving_base_summary"] = self.base_summary
        return doc


def _copies_that_differ(ckpt: Any, base_model: Any) -> set[str]:
    """Base keys whose saved ``base_layer`` weight copy is not the base's tensor (shape or values)."""
    from ..storage.tensor_source import TensorReader
    from .plan import is_embedding_copy

    out: set[str] = set()
    with TensorReader(ckpt.tensors_in_memory) as mine, TensorReader(base_model.tensors_in_memory) as theirs:
        for key, info in ckpt.base_overrides.items():
            if not is_embedding_copy(ckpt.base_override_keys[key]):
                continue
            other = base_model.tensors.get(key)
            if other is None or tuple(other.shape) != tuple(info.shape) or other.dtype != info.dtype or not mine.get(info).equal(theirs.get(other)):
                out.add(key)
    return out


def _needs_base_message(plan: ExportPlan) -> str:
    return f"{plan.engine.name} cannot serve: {'; '.join(plan.blockers)}"


def export_adapter(
    adapter: str,
    engine: str,
    out: str,
    *,
    base: Optional[str] = None,
    base_out: Optional[str] = None,
    max_lora_rank: Optional[int] = None,
    outtype: str = "f32",
    overwrite: bool = False,
    revision: Optional[str] = None,
    base_revision: Optional[str] = None,
    allow_pickle: bool = False,
) -> ExportResult:
    """Export ``adapter`` for ``engine`` to ``out`` (a PEFT directory, or a ``.gguf`` file for llama.cpp).

    Args:
        adapter: adapter directory or Hub id.
        engine: ``vllm``, ``sglang``, ``llama.cpp`` or ``portable``.
        out: the output directory (file for llama.cpp).
        base: the base model (directory or Hub id). llama.cpp reads only its ``config.json``
            (defaults to the adapter's ``base_model_name_or_path``); a serving base needs its weights.
        base_out: where to write the serving base: a copy of ``base`` with what the engine cannot
            serve merged in, by :func:`~adapterfmt.merging.engine.merge_to_directory`.
        max_lora_rank: the engine's ``--max-lora-rank``; a higher rank is refused.
        outtype: GGUF tensor type (``f32``, ``f16``, ``bf16``, ``q8_0``).

    Raises:
        UnsupportedFeatureError: the engine cannot serve parts of the adapter and no ``base_out``
            was given (one line listing them), or a feature nothing can serve.
        InvalidConfigError, ShapeMismatchError, CheckpointNotFoundError, OutputPathError: bad input;
            nothing is written.
    """
    if engine not in ENGINES:
        raise InvalidConfigError(f"unknown engine {engine!r}", key="for", hint=f"use one of {', '.join(ENGINE_NAMES)}")
    ckpt = read_adapter(adapter, revision=revision, allow_pickle=allow_pickle)
    spec = ENGINES[engine]
    unservable: dict[str, str] = {}
    gguf_base: Optional[tuple[dict[str, Any], str, Optional[str]]] = None
    if spec.output == "gguf":
        from .gguf_file import read_base_config, require_gguf, unservable_modules

        require_gguf()
        config_source = base or ckpt.config.base_model_name_or_path
        if not config_source:
            raise InvalidConfigError(
                "names no base_model_name_or_path", path=ckpt.config.path, key="base_model_name_or_path", hint="pass --base (a directory holding the base's config.json, or a Hub id)"
            )
        gguf_base = read_base_config(config_source, revision=base_revision)
        unservable = unservable_modules(ckpt, gguf_base[0], os.path.join(gguf_base[1], "config.json"))
    base_model = None
    differs: Optional[set[str]] = None
    if base_out is not None:
        if base is None:
            raise InvalidConfigError("--base-out needs --base (the base model whose copy becomes the serving base)", key="base")
        from ..base.reading import read_base

        base_model = read_base(base, revision=base_revision, allow_pickle=allow_pickle, download=True)
        differs = _copies_that_differ(ckpt, base_model)
    plan = plan_export(ckpt, engine, max_lora_rank=max_lora_rank, unservable=unservable, differs_from_base=differs)
    if plan.needs_base and base_out is None:
        raise UnsupportedFeatureError(
            _needs_base_message(plan),
            path=ckpt.directory,
            hint="pass --base BASE --base-out BASE_OUT to merge these into a serving base (the rest stays in the adapter)",
        )
    # every output path is checked before anything is written
    from ..storage.staging import check_output_path, clean_stale

    if spec.output == "peft":
        clean_stale(out)
        check_output_path(out, [ckpt.directory], overwrite=overwrite)
    else:
        from .gguf_file import check_gguf_output

        check_gguf_output(out, [ckpt.directory], overwrite=overwrite)
    notes: list[str] = []
    summary = None
    wrote_base = None
    if base_out is not None and plan.needs_base:
        from ..merging.engine import merge_to_directory

        clean_stale(base_out)
        check_output_path(base_out, [ckpt.directory, base_model.directory if base_model is not None else base], overwrite=overwrite)
        merged = merge_to_directory(base_model if base_model is not None else base, plan.baked_checkpoint(), base_out, overwrite=overwrite)
        wrote_base = merged.output
        summary = {"tensors_merged": merged.tensors_merged, "tensors_replaced": merged.tensors_replaced, "tensors_copied": merged.tensors_copied, "bytes_written": merged.bytes_written}
        if spec.output == "gguf":
            notes.append(f"convert the serving base with llama.cpp's convert_hf_to_gguf.py {merged.output}")
    elif base_out is not None:
        notes.append(f"{engine} serves the whole adapter: no serving base was needed, nothing written to {base_out}")
    if plan.dropped and differs is None:
        notes.append(f"dropped {len(plan.dropped)} base_layer copies unchecked (pass --base with --base-out to compare them with the base)")
    if not plan.kept:
        notes.append("every module went into the serving base: the exported adapter is empty")
    try:
        gguf_info = None
        if spec.output == "gguf":
            from .gguf_file import write_gguf

            assert gguf_base is not None
            gguf_info = write_gguf(plan, out, config=gguf_base[0], base_folder=gguf_base[1], hub_id=gguf_base[2], outtype=outtype, overwrite=overwrite)
            files = [os.path.basename(gguf_info["file"])]
            output = gguf_info["file"]
        else:
            from .write import write_peft_dir

            files = write_peft_dir(plan, out, overwrite=overwrite)
            output = os.path.abspath(out)
    except BaseException:
        if wrote_base is not None:
            shutil.rmtree(wrote_base, ignore_errors=True)
        raise
    return ExportResult(engine, output, files, plan, serving_base=wrote_base, base_summary=summary, gguf=gguf_info, notes=notes)
