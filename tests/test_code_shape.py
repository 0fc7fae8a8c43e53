"""The code's shape, as issue 26 left it: no function longer than a screen in the three packages."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "training", "loadtest")
MAX_FUNCTION_LINES = 60


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (lines)`` of every function or method over ``limit`` lines, nested ones included."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines})")
    return found


def test_no_function_is_over_sixty_lines() -> None:
    assert long_functions() == []


def test_the_measure_sees_a_long_function(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "service" / "long.py").write_text(f"def f() -> None:\n{body}\n")
    assert long_functions(tmp_path) == ["service/long.py:1 f (62)"]
