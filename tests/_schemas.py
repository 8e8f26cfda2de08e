"""The published JSON Schema of each command's ``--json`` output (``docs/schemas/<command>.schema.json``).

``tests/conftest.py``'s ``run_cli`` validates every ``--json`` document any test produces against
its command's schema, so each format's real output is checked, not a sample of it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"


@functools.lru_cache(maxsize=None)
def _registry() -> Registry:
    """Every published schema by its ``$id``, so one may refer to another (inspect -> serving)."""
    schemas = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(SCHEMAS.glob("*.schema.json"))]
    return Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)


@functools.lru_cache(maxsize=None)
def validator(command: str) -> jsonschema.protocols.Validator:
    path = SCHEMAS / f"{command}.schema.json"
    assert path.is_file(), f"`adapterfmt {command} --json` has no published schema: write {path}"
    schema = json.loads(path.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=_registry())


def validate_json(command: str, doc: Any) -> None:
    """Raise ``jsonschema.ValidationError`` (the best match, with its path) when ``doc`` breaks the schema."""
    error = jsonschema.exceptions.best_match(validator(command).iter_errors(doc))
    if error is not None:
        raise error
