"""Generate ``adapterfmt/tables/arch_tables.json`` from the pinned transformers: the facts the library needs
about architectures, so that the library itself never imports transformers.

Three tables, all keyed by names that appear in a model's ``config.json``:

* ``CONVERSIONS``: transformers' checkpoint conversion rules
  (``transformers.conversion_mapping._build_checkpoint_conversion_mapping()``), keyed by
  ``model_type`` or model class name, each rule as ``(kind, source patterns, target patterns,
  operations)``. The source side is the on-disk (checkpoint) name, the target side the in-memory
  name that PEFT adapters use.
* ``CLASSES``: for every model class of the auto mappings, its ``model_type``,
  ``base_model_prefix``, the class its base model is (``MODEL_MAPPING_NAMES[model_type]``) and its
  ``_tied_weights_keys`` (``{tied parameter: parameter it shares}``), read from the modeling
  sources with ``ast`` (resolving inheritance by class name), not by importing them.
* ``TIE_WORD_EMBEDDINGS``: the default of ``tie_word_embeddings`` per ``model_type`` (from the
  configuration sources), used when ``config.json`` does not say.

Run ``python scripts/gen_architecture_tables.py`` after changing the pinned transformers;
``tests/tables/test_arch_tables.py`` regenerates the tables and fails on any difference. The file is
JSON (package data), read once and only when a base model's facts are needed.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from typing import Any, Optional

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapterfmt", "tables", "arch_tables.json")

_OP_FIELDS = ("dim", "inverse", "dim0", "dim1", "stack_dim", "concat_dim")


def _op(op: Any) -> tuple:
    fields = tuple((k, getattr(op, k)) for k in _OP_FIELDS if isinstance(getattr(op, k, None), (int, bool)))
    return (type(op).__name__,) + fields


def conversions() -> dict[str, list[tuple]]:
    """Every conversion rule of the pinned transformers, by model_type or class name."""
    from transformers import conversion_mapping

    out: dict[str, list[tuple]] = {}
    for key, transforms in sorted(conversion_mapping._build_checkpoint_conversion_mapping().items()):
        rules = []
        for t in transforms:
            ops = tuple(_op(op) for op in getattr(t, "operations", None) or ())
            rules.append((type(t).__name__, tuple(t._original_source_patterns), tuple(t._original_target_patterns), ops))
        out[key] = rules
    return out


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_LITERAL


_NOT_LITERAL = object()
_CLASS_ATTRS = ("_tied_weights_keys", "base_model_prefix", "model_type", "tie_word_embeddings")


def _scan_sources(models_dir: str) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """class name -> (base class names, literal class attributes of interest), over modeling and configuration files."""
    classes: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for model in sorted(os.listdir(models_dir)):
        folder = os.path.join(models_dir, model)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if not (name.startswith(("modeling_", "configuration_")) and name.endswith(".py")) or name.startswith(("modeling_tf_", "modeling_flax_")):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in tree.body:
                if not isinstance(node, ast.ClassDef):
                    continue
                bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "" for b in node.bases]
                attrs: dict[str, Any] = {}
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                        target, value = stmt.targets[0].id, stmt.value
                    elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                        target, value = stmt.target.id, stmt.value
                    else:
                        continue
                    if target in _CLASS_ATTRS:
                        v = _literal(value)
                        if v is not _NOT_LITERAL:
                            attrs[target] = v
                classes.setdefault(node.name, (bases, attrs))
    return classes


def _attr(classes: dict, name: str, attr: str, seen: Optional[set] = None) -> Any:
    """``attr`` of class ``name`` through its bases (depth first, left to right, as the MRO mostly is)."""
    seen = seen if seen is not None else set()
    if name in seen or name not in classes:
        return _NOT_LITERAL
    seen.add(name)
    bases, attrs = classes[name]
    if attr in attrs:
        return attrs[attr]
    for base in bases:
        v = _attr(classes, base, attr, seen)
        if v is not _NOT_LITERAL:
            return v
    return _NOT_LITERAL


def class_tables() -> tuple[dict[str, dict[str, Any]], dict[str, bool]]:
    """``(CLASSES, TIE_WORD_EMBEDDINGS)`` from the modeling and configuration sources."""
    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    classes = _scan_sources(os.path.join(os.path.dirname(transformers.__file__), "models"))
    base_class: dict[str, str] = {}
    for model_type, names in modeling_auto.MODEL_MAPPING_NAMES.items():
        base_class[model_type] = names[0] if isinstance(names, (tuple, list)) else names
    owners: dict[str, str] = {}  # model class -> model_type, from every auto mapping
    for mapping_name in sorted(dir(modeling_auto)):
        if not (mapping_name.startswith("MODEL_") and mapping_name.endswith("_MAPPING_NAMES")):
            continue
        mapping = getattr(modeling_auto, mapping_name)
        if not isinstance(mapping, dict):
            continue
        for model_type, names in mapping.items():
            for cls in names if isinstance(names, (tuple, list)) else (names,):
                if isinstance(cls, str):
                    owners.setdefault(cls, model_type)
    table: dict[str, dict[str, Any]] = {}
    for cls in sorted(owners):
        if cls not in classes:
            continue
        model_type = owners[cls]
        tied = _attr(classes, cls, "_tied_weights_keys")
        prefix = _attr(classes, cls, "base_model_prefix")
        table[cls] = {
            "model_type": model_type,
            "base_model_prefix": prefix if isinstance(prefix, str) else "",
            "base_class": base_class.get(model_type, ""),
            "tied": dict(sorted(tied.items())) if isinstance(tied, dict) else {},
        }
    tie_default: dict[str, bool] = {}
    for model_type, config_cls in sorted(configuration_auto.CONFIG_MAPPING_NAMES.items()):
        v = _attr(classes, config_cls, "tie_word_embeddings")
        if isinstance(v, bool):
            tie_default[model_type] = v
    return table, tie_default


def reinterpreted_tie_flag() -> list[str]:
    """model_types whose config reads ``tie_word_embeddings`` as something else (T5: output scaling)
    and forces the tie: a merge must not write ``tie_word_embeddings: false`` into them."""
    import transformers
    from transformers.models.auto import configuration_auto

    models_dir = os.path.join(os.path.dirname(transformers.__file__), "models")
    out = []
    for model_type in sorted(configuration_auto.CONFIG_MAPPING_NAMES):
        path = os.path.join(models_dir, model_type, f"configuration_{model_type}.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if 'pop("tie_word_embeddings"' in f.read():
                    out.append(model_type)
    return out


def build() -> str:
    """The text of ``adapterfmt/tables/arch_tables.json`` (JSON: loads in milliseconds, never compiled)."""
    import transformers

    table, tie_default = class_tables()
    doc = {
        "_comment": "GENERATED by scripts/gen_architecture_tables.py from the pinned transformers: do not edit",
        "transformers_version": transformers.__version__,
        "conversions": conversions(),
        "classes": table,
        "tie_word_embeddings": tie_default,
        "tie_flag_reinterpreted": reinterpreted_tie_flag(),
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def main() -> int:
    text = build()
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"wrote {OUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
