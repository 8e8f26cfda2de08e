"""Keep docs/FORMAT.md (the spec) and docs/BEHAVIOUR.md honest against the code.

FORMAT: its key table and refused fields match the code, its section numbers stay put, and it
states the ``format_version`` the CLI's JSON carries. BEHAVIOUR: its warning codes and error
classes are the code's. Every section citation, in every form the code and docs use, names a
section that exists in the document it names.

The key table (§3.8) is checked twice: every template cell against ``keys.ROLE_TEMPLATES`` and
every example row through ``adapterfmt.checkpoint.keys`` in both directions, and every example key against
the names real PEFT models produce (the oracle).
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path
from typing import Optional

import pytest

import adapterfmt
from adapterfmt import errors
from adapterfmt.checkpoint import keys
from adapterfmt.checkpoint.config import UNSUPPORTED_FIELDS
from adapterfmt.constants import PEFT_PREFIX
from adapterfmt.checkpoint.keys import ROLE_TEMPLATES, Role

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8")
BEHAVIOUR = (ROOT / "docs" / "BEHAVIOUR.md").read_text(encoding="utf-8")
PACKAGE = Path(adapterfmt.__file__).resolve().parent

SECTIONS = {
    1: "Files",
    2: "Namespaces",
    3: "Key grammar",
    4: "Config fields",
    5: "Matching rules",
    6: "Merge math",
    7: "Warning codes",
    8: "Errors",
    9: "Wrapped checkpoints",
    10: "Diffusion ecosystem files",
}


BEHAVIOUR_SECTIONS = {
    1: "Reading",
    2: "Warning codes",
    3: "Errors and exit codes",
    4: "Commands and JSON output",
    5: "Python API",
    6: "Wrapped checkpoints",
    7: "Diffusion ecosystem files",
    8: "Export for serving",
    9: "Adapter algebra",
    10: "`adapterfmt extract`",
    11: "`adapterfmt verify-merge`",
}


def _section(n: int, doc: str = DOC) -> str:
    m = re.search(rf"^## {n}\. .*?(?=^## \d+\. |\Z)", doc, flags=re.M | re.S)
    assert m, f"no section {n}"
    return m.group(0)


def _table_rows(text: str) -> list[list[str]]:
    """Body rows of every Markdown table in ``text`` (header and rule rows dropped)."""
    rows, prev_was_table = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            prev_was_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not prev_was_table:  # header row
            prev_was_table = True
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        rows.append(cells)
    return rows


def _code(cell: str) -> Optional[str]:
    """The cell's backticked text; ``None`` for ``—``."""
    if cell == "—":
        return None
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"not a single code span: {cell!r}"
    return m.group(1)


def _first_code(cell: str) -> str:
    m = re.search(r"`([^`]+)`", cell)
    assert m, f"no code span in {cell!r}"
    return m.group(1)


def _key_table() -> tuple[dict[Role, tuple], list[tuple]]:
    block = re.search(r"<!-- key-table:start -->(.*?)<!-- key-table:end -->", DOC, flags=re.S)
    assert block, "FORMAT.md lost its key table markers"
    templates: dict[Role, tuple] = {}
    examples: list[tuple] = []
    role = None
    for cells in _table_rows(block.group(1)):
        assert len(cells) == 4, cells
        if cells[0] == "e.g.":
            assert role is not None, "an example row before any role row"
            examples.append((role, *(_code(c) for c in cells[1:])))
        else:
            role = Role(_code(cells[0]))
            assert role not in templates, f"role {role.value} listed twice"
            templates[role] = tuple(_code(c) for c in cells[1:])
    return templates, examples


TEMPLATES, EXAMPLES = _key_table()


def test_sections_keep_their_numbers():
    headings = re.findall(r"^## (\d+)\. (.*)$", DOC, flags=re.M)
    assert [int(n) for n, _ in headings] == list(SECTIONS)
    for n, title in headings:
        assert title.startswith(SECTIONS[int(n)]), (n, title)
    # keys.py cites §3.5 for wrapper leftovers.
    assert re.search(r"^### 3\.5 .*wrapper leftovers", DOC, flags=re.M | re.I)


def _headings(doc: str) -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", doc, flags=re.M))


#: Citable documents by the name a citation uses (``FORMAT``, ``FORMAT.md``, ``docs/FORMAT.md`` ...).
CITABLE = {"FORMAT": DOC, "BEHAVIOUR": BEHAVIOUR}
#: A word right before ``§`` written like a document name: upper case, optional folder and ``.md``.
_DOC_WORD = re.compile(r"(?:[\w.-]+/)*([A-Z][A-Z0-9_-]*)(?:\.md)?$")


def citations(text: str, own: str, *, in_doc: bool = False) -> list[tuple[str, str]]:
    """``(document, section)`` for every ``§N[.M]`` in ``text``.

    A ``§`` right after a document-like word (``FORMAT §6.9``, ``FORMAT.md §3.7``,
    ``docs/FORMAT.md §5``, ``BEHAVIOUR §2``, and wrong ones such as ``FORMAT-REF §5.8``) cites that
    word. A bare ``§`` cites ``own``: inside a document (``in_doc``) always the document itself; in
    code it continues a document named within the 200 characters before it (``FORMAT.md §9.1 and
    §9.2``, ``§3.2–§3.4``), else it means the spec.
    """
    out: list[tuple[str, str]] = []
    last_named: tuple[int, str] | None = None
    for m in re.finditer(r"§\s?(\d+(?:\.\d+)?)", text):
        before = text[max(0, m.start() - 60) : m.start()]
        word = re.search(r"([\w./-]+)\s*$", before)
        named = _DOC_WORD.fullmatch(word.group(1)) if word and not re.search(r"[–—-]$", before) else None
        if named and any(c.isupper() for c in named.group(1)):
            doc = named.group(1)
            last_named = (m.start(), doc)
        elif not in_doc and last_named and m.start() - last_named[0] <= 200:
            doc = last_named[1]
        else:
            doc = own
        out.append((doc, m.group(1)))
    return out


def _cited_everywhere() -> dict[tuple[str, str], set[str]]:
    """``(document, section)`` -> files citing it, over code, tests, scripts and docs."""
    sources = [
        *PACKAGE.rglob("*.py"),
        *(ROOT / "cli").rglob("*.py"),
        *(ROOT / "scripts").rglob("*.py"),
        *(ROOT / "bench").rglob("*.py"),
        *(p for p in (ROOT / "tests").rglob("*.py") if p.name != Path(__file__).name),
        *(ROOT / "docs").glob("*.md"),
        ROOT / "README.md",
        ROOT / "DEVELOPERS.md",
    ]
    cited: dict[tuple[str, str], set[str]] = {}
    for path in sources:
        if not path.is_file():
            continue
        in_doc = path.parent.name == "docs"
        for c in citations(path.read_text(encoding="utf-8"), path.stem if in_doc else "FORMAT", in_doc=in_doc):
            cited.setdefault(c, set()).add(str(path.relative_to(ROOT)))
    return cited


def test_citation_forms_are_all_recognised():
    text = (
        "FORMAT §6.9, FORMAT-REF §5.8, FORMAT.md §3.7, docs/FORMAT.md §5 and §9.2; BEHAVIOUR §2, "
        "BEHAVIOUR.md §5.1, §3.2–§3.4"
    )
    assert citations(text, "FORMAT") == [
        ("FORMAT", "6.9"), ("FORMAT-REF", "5.8"), ("FORMAT", "3.7"), ("FORMAT", "5"), ("FORMAT", "9.2"),
        ("BEHAVIOUR", "2"), ("BEHAVIOUR", "5.1"), ("BEHAVIOUR", "3.2"), ("BEHAVIOUR", "3.4"),
    ]
    assert citations("a bare §3.7 in a comment", "FORMAT") == [("FORMAT", "3.7")]
    assert citations("x " * 200 + "§4 in BEHAVIOUR.md itself", "BEHAVIOUR") == [("BEHAVIOUR", "4")]
    assert citations("see FORMAT §1.1, then §4 here", "BEHAVIOUR", in_doc=True) == [("FORMAT", "1.1"), ("BEHAVIOUR", "4")]


def test_every_section_citation_exists_in_the_document_it_names():
    cited = _cited_everywhere()
    assert ("FORMAT", "3.5") in cited  # keys.py's wrapper leftovers: the scan is not vacuous
    wrong = {
        f"{doc} §{sec} (in {', '.join(sorted(files))})"
        for (doc, sec), files in cited.items()
        if doc not in CITABLE or sec not in _headings(CITABLE[doc])
    }
    assert not wrong, sorted(wrong)


def test_behaviour_sections_keep_their_numbers():
    headings = re.findall(r"^## (\d+)\. (.*)$", BEHAVIOUR, flags=re.M)
    assert [int(n) for n, _ in headings] == list(BEHAVIOUR_SECTIONS)
    for n, title in headings:
        assert title.startswith(BEHAVIOUR_SECTIONS[int(n)]), (n, title)


def test_spec_states_the_format_version_the_json_carries():
    from adapterfmt.constants import FORMAT_VERSION

    assert re.search(rf"^\*\*format_version: {FORMAT_VERSION}\*\*$", DOC, flags=re.M)
    assert f'"format_version": {FORMAT_VERSION}' in _section(4, BEHAVIOUR)


def test_spec_names_no_adapterfmt_api():
    """The spec is normative for any implementation: adapterfmt's error classes and flags live in BEHAVIOUR."""
    leaked = sorted(set(re.findall(r"`(\w+Error|--[a-z-]+)`", DOC)) - {"KeyError", "TypeError"})
    assert not leaked, leaked


def test_key_table_templates_are_role_templates():
    assert set(TEMPLATES) == set(Role)
    for role, (saved, wrapped, base) in TEMPLATES.items():
        t = ROLE_TEMPLATES[role]
        assert (saved, wrapped, base) == (t.saved, t.wrapped, t.base), role


def test_every_role_has_an_example():
    assert {r for r, *_ in EXAMPLES} == set(Role)


@pytest.mark.parametrize("role,saved,wrapped,base", EXAMPLES, ids=[f"{e[0].value}:{e[2]}" for e in EXAMPLES])
def test_key_table_example_maps_as_documented(role, saved, wrapped, base):
    w = keys.parse_wrapped(wrapped)
    assert w.role is role and w.adapter in (None, "default")
    assert keys.render_base(w) == base
    assert keys.wrapped_to_base(PEFT_PREFIX + wrapped) == base
    if saved is None:
        with pytest.raises(errors.UnknownKeyError):
            keys.render_saved(w)
        return
    full = [w.module] if role is Role.FULL_COPY else []
    s = keys.parse_saved(saved, full_copy_modules=full)
    assert s.role is role and s.prefix == PEFT_PREFIX
    assert keys.render_saved(s) == saved
    assert keys.render_wrapped(s, prefix="") == wrapped
    assert keys.render_base(s) == base
    assert keys.saved_to_wrapped(saved, full_copy_modules=full) == PEFT_PREFIX + wrapped
    assert keys.saved_to_base(saved, full_copy_modules=full) == base
    assert keys.wrapped_to_saved(PEFT_PREFIX + wrapped) == saved


@pytest.fixture(scope="module")
def peft_names() -> dict[str, set[str]]:
    """Saved, wrapped (prefix removed) and base key names from real PEFT models built in code."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    llama = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
    )
    roberta = transformers.RobertaConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=40, num_labels=3,
    )
    cases = [
        (transformers.LlamaForCausalLM, llama, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])),
        (transformers.LlamaForCausalLM, llama, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)),
        (transformers.LlamaForCausalLM, llama, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 5, 3])),
        (
            transformers.RobertaForSequenceClassification,
            roberta,
            LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"], lora_bias=True, bias="all"),
        ),
    ]
    names: dict[str, set[str]] = {"saved": set(), "wrapped": set(), "base": set()}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # PEFT warns about saving embeddings, and mistakes the 1-D lora_B.bias for an unsharded tensor.
        warnings.simplefilter("ignore")
        for cls, cfg, lora in cases:
            model = cls(cfg)
            names["base"] |= set(model.state_dict())
            wrapped = get_peft_model(model, lora)
            names["saved"] |= set(get_peft_model_state_dict(wrapped))
            names["wrapped"] |= {k[len(PEFT_PREFIX) :] for k in wrapped.state_dict() if k.startswith(PEFT_PREFIX)}
    return names


@pytest.mark.parametrize("role,saved,wrapped,base", EXAMPLES, ids=[f"{e[0].value}:{e[2]}" for e in EXAMPLES])
def test_key_table_example_is_what_peft_produces(peft_names, role, saved, wrapped, base):
    if saved is not None:
        assert saved in peft_names["saved"]
    assert wrapped in peft_names["wrapped"]
    assert base in peft_names["base"]


def _package_codes() -> tuple[set[str], set[str]]:
    """``(listed, emitted)`` warning codes of the package.

    ``listed``: the double-backticked ``a-b`` words of every module docstring paragraph starting ``Codes``.
    ``emitted``: every string literal passed first to ``Finding(...)`` anywhere in the package.
    """
    listed: set[str] = set()
    emitted: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for para in (ast.get_docstring(tree) or "").split("\n\n"):
            if para.lstrip().startswith("Codes"):
                listed |= set(re.findall(r"``([a-z]+(?:-[a-z]+)+)``", para))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Finding"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                emitted.add(node.args[0].value)
    return listed, emitted


def test_every_warning_code_is_documented():
    from adapterfmt.checkpoint import findings

    documented = {_first_code(row[0]) for row in _table_rows(_section(2, BEHAVIOUR))}
    in_spec = set(re.findall(r"`([a-z]+(?:-[a-z]+)+)`", _section(7)))
    listed, emitted = _package_codes()
    assert documented <= in_spec | {"non-finite"} and in_spec <= documented, sorted(documented ^ in_spec)
    core = set(re.findall(r"``([a-z]+(?:-[a-z]+)+)``", findings.__doc__ or ""))
    assert core and core <= listed
    assert listed <= documented, sorted(listed - documented)
    assert emitted <= documented, sorted(emitted - documented)


def test_every_error_class_is_documented_with_its_builtin():
    rows = {_first_code(row[0]): row for row in _table_rows(_section(3, BEHAVIOUR)) if row[0].startswith("`") and row[0].endswith("Error`")}
    classes = set(errors.__all__) - {"AdapterFormatError"}
    assert set(rows) == classes
    for name, row in rows.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.AdapterFormatError)
        mixed_in = [b.__name__ for b in cls.__bases__ if b.__module__ == "builtins"]
        assert mixed_in == ([row[1].strip("`")] if row[1] else []), name


def test_every_refused_config_field_is_documented():
    refused = _section(4).split("### 4.4", 1)[1]
    documented = {_first_code(row[0]) for row in _table_rows(refused)}
    # target_parameters is read, merged and loaded (§3.9); only wrap() refuses it (BEHAVIOUR §5)
    assert set(UNSUPPORTED_FIELDS) | {"init_lora_weights"} <= documented
