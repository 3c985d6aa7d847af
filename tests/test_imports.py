"""Imports go one way: alphaspin (the method, no Prefect) ← tasks ← flows (and the CLI above both),
and no module of the project takes part in an import circle.

The import graph is read from the source with the standard library's `ast`, every import
counted (module level or inside a function), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"alphaspin": "alphaspin", "tasks": "alphaspin.tasks", "flows": "alphaspin.flows"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` names (with ``from X import y``: X and X.y)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return names


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {n for n in imported_names(path) if n in known and n != name} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(edges.get(node, ())):
            if state.get(child) == 1:
                return stack[stack.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_covers_the_project():
    edges = graph()
    assert {"alphaspin.runner", "alphaspin.stages.train", "alphaspin.tasks.stages", "alphaspin.flows.cli"} <= set(edges)
    assert "alphaspin.dag" in edges["alphaspin.runner"]


def test_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_library_imports_neither_prefect_nor_the_orchestration_layers():
    for name, path in modules().items():
        if name.startswith(("alphaspin.tasks", "alphaspin.flows")):
            continue
        bad = sorted(
            n
            for n in imported_names(path)
            if n.split(".")[0] == "prefect" or n.startswith(("alphaspin.tasks", "alphaspin.flows"))
        )
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_tasks_do_not_import_flows():
    for name, path in modules().items():
        if name.startswith("alphaspin.tasks"):
            assert not [n for n in imported_names(path) if n.startswith("alphaspin.flows")], path


def test_nothing_installs_as_a_top_level_tasks_or_flows_package():
    import importlib.util

    assert importlib.util.find_spec("alphaspin.tasks").origin == str(ROOT / "tasks" / "__init__.py")
    assert importlib.util.find_spec("alphaspin.flows").origin == str(ROOT / "flows" / "__init__.py")
    text = (ROOT / "pyproject.toml").read_text()
    assert '"alphaspin.tasks" = "tasks"' in text and '"alphaspin.flows" = "flows"' in text
