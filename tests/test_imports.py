"""The import map of service/, training/ and loadtest/ has no circle, counting imports inside functions and under
TYPE_CHECKING too: each module can be read, tested and changed from the ones it names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "training", "loadtest")


def imports_of(path: Path) -> set[str]:
    """The modules of PACKAGES that ``path`` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in PACKAGES:  # from service import errors
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif node.module.split(".")[0] in PACKAGES:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    return found


def import_map() -> dict[str, set[str]]:
    modules = {f"{pkg}.{path.stem}": path for pkg in PACKAGES for path in (ROOT / pkg).glob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append([*path[path.index(dep):], node, dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_circle_finder_finds_one() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = import_map()
    assert {"service.app", "service.server", "service.workers"} <= graph.keys()
    assert "service.app" in graph["service.workers"]  # the worker builds the app: the edge the circle used to close
    assert circles(graph) == []
