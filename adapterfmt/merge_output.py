"""What the merged output directory holds besides the streamed shards: the shard files' headers
(:func:`shard_specs`), the size of every file (for the free-space check), the copied side files,
config.json (when the dtype changed) and the index, and the check of a staged output against the
plan (``--verify``). Which files, which shard layout and which config changes are decided by the
plan (:mod:`adapterfmt.merge_plan`); this module writes and checks them.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from .constants import MODEL_CONFIG_FILE, SAFETENSORS_INDEX_FILE
from .errors import AdapterFormatError, MergeError
from .header import read_header
from .merge_plan import MergePlan, PlannedTensor
from .safetensors_stream import TensorSpec, file_size
from .staging import copy_file, write_text

#: safetensors metadata of every merged shard (what ``save_pretrained`` writes).
METADATA = {"format": "pt"}


def shard_specs(tensors: Sequence[PlannedTensor]) -> list[TensorSpec]:
    return [TensorSpec(t.key, t.dtype, t.shape) for t in tensors]


def output_sizes(plan: MergePlan) -> list[int]:
    """Bytes of every output file (the index and a rewritten config.json are counted as copied)."""
    sizes = [file_size(shard_specs(s.tensors), METADATA) for s in plan.shards]
    sizes += [os.path.getsize(os.path.join(plan.base.directory, f)) for f in plan.files]
    return sizes + ([len(json.dumps(plan.index(), indent=2)) + 1] if plan.indexed else [])


def write_side_files(plan: MergePlan, directory: str) -> list[str]:
    """Copy the base's non-weight files, write config.json (if changed) and the index; fsync all."""
    written = [s.name for s in plan.shards]
    for name in plan.files:
        target = os.path.join(directory, name)
        if name == MODEL_CONFIG_FILE and plan.config is not None:
            write_text(target, json.dumps(plan.config, indent=2) + "\n")
        else:
            copy_file(os.path.join(plan.base.directory, name), target)
        written.append(name)
    if plan.indexed:
        write_text(os.path.join(directory, SAFETENSORS_INDEX_FILE), json.dumps(plan.index(), indent=2) + "\n")
        written.append(SAFETENSORS_INDEX_FILE)
    return sorted(written)


def verify_output(directory: str, plan: MergePlan, target: str) -> None:
    """:func:`adapterfmt.verify.verify_directory` on the staged output, then each shard's header
    against the plan (keys in order, dtypes, shapes, metadata).

    Raises:
        MergeError: the first problem (the staged output is then removed, ``out`` never appears).
    """
    from .verify import verify_directory

    problems = [f.message for f in verify_directory(directory)]
    for shard in plan.shards:
        try:
            header = read_header(os.path.join(directory, shard.name))
        except AdapterFormatError as e:
            problems.append(str(e))
            continue
        got = [(k, i.dtype, i.shape) for k, i in header.tensors.items()]
        want = [(t.key, t.dtype, t.shape) for t in shard.tensors]
        if got != want or dict(header.metadata) != METADATA:
            problems.append(f"{shard.name}: its header does not match the merge plan")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MergeError(f"the merged output failed verification: {problems[0]}{more}", path=target, hint="nothing was written; please report this")
