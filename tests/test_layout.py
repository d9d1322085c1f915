"""The package's layout: no import circles between its parts (top-level modules and subpackages), and the
library never imports the launchers or the studies."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PACKAGE = Path(__file__).resolve().parents[1] / "custom" / "split_unet"
UPHILL = {"cli", "launch", "studies"}  # what only the command line and the studies may import


def part_of(module: str) -> str | None:
    """``split_unet.a.b`` -> ``a`` (a top-level module or subpackage); None outside the package."""
    parts = module.split(".")
    return parts[1] if parts[0] == PACKAGE.name and len(parts) > 1 else None


def imports() -> dict[str, set[str]]:
    """Part -> the other parts its modules import (at any depth: a function's import counts too)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join((PACKAGE.name, *path.relative_to(PACKAGE).with_suffix("").parts))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        source = part_of(module) or "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                names = [f"{base}.{node.module}" if base and node.module else base or node.module]
            else:
                continue
            graph.setdefault(source, set()).update(p for p in map(part_of, names) if p and p != source)
    return graph


def test_no_import_circles_between_parts():
    graph = imports()
    state: dict[str, str] = {}

    def visit(part: str, trail: list[str]) -> None:
        state[part] = "open"
        for other in sorted(graph.get(part, ())):
            if state.get(other) == "open":
                raise AssertionError(" -> ".join(trail[trail.index(other):] + [other]) if other in trail
                                     else f"{part} -> {other}")
            if other not in state:
                visit(other, trail + [other])
        state[part] = "done"

    for part in sorted(graph):
        if part not in state:
            visit(part, [part])


def test_library_imports_no_launcher_or_study():
    uphill = {part: sorted(others & UPHILL) for part, others in imports().items()
              if part not in UPHILL and others & UPHILL}
    assert not uphill, uphill
