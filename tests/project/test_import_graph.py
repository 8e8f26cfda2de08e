"""The ``adapterfmt`` package has no import cycle.

Every import of a package module counts: at module level, inside a function (a lazy import that
closes a cycle is still a cycle) and under ``TYPE_CHECKING`` (a type a module needs belongs to a
module below it). The graph is read from each module's AST, so nothing is imported to build it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "adapterfmt"
NAME = "adapterfmt"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, level: int, module: "str | None") -> str:
    """The absolute name a relative ``from ...module import`` in ``importer`` refers to."""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``adapterfmt.x``), from every import statement."""
    modules = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def known(name: str) -> "str | None":
        # ``from .x import y`` may name a submodule ``x.y`` or an attribute of ``x``
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_package, node.level, node.module) if node.level else (node.module or "")
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t == NAME or t.startswith(NAME + "."):
                    hit = known(t)
                    if hit and hit != mod and hit != NAME:
                        graph[mod].add(hit)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> "list[str] | None":
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> "list[str] | None":
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_lazy_and_type_checking_imports():
    graph = import_graph()
    # describe reads pickle files through torch_io inside a function, for example
    assert "adapterfmt.storage.torch_io" in graph["adapterfmt.formats.peft.reading"]
    assert len(graph) > 20


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
