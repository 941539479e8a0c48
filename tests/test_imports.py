"""The package's import graph has no circles, and every module imports on its own.

A circle (a -> b -> a, even through an import inside a function or under
TYPE_CHECKING) means two modules that cannot be read or changed apart: the
engine behind mesh.Node is layered so that nothing imports mesh/node.py back.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("mesh", "transports", "discovery")


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Modules of the project that ``name`` imports anywhere in its text."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from mesh import wire" imports the module mesh.wire
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
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


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    # A package's __init__ that only re-exports is its face: an import of a name
    # from it is not a tie to its submodules' internals, but still an edge.
    return {name: imports_of(name, path, known) for name, path in found.items()}


def test_no_import_circles_among_the_project_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_below_the_node_face_imports_it_back():
    # Users of the API (the package face, the CLI) may import mesh.node; nothing it
    # is built from may: the engine, messages, channels, metrics, the cores.
    g = graph()
    below: set[str] = set()
    todo = ["mesh.node"]
    while todo:
        for dep in g[todo.pop()]:
            if dep not in below:
                below.add(dep)
                todo.append(dep)
    assert {"mesh.engine.loop", "mesh.message", "mesh.metrics"} <= below
    importers = sorted(n for n in below if "mesh.node" in g[n])
    assert not importers, importers


FIRST = ("mesh.engine.", "mesh.channels", "mesh.message", "mesh.metrics", "mesh.peers", "transports")


@pytest.mark.parametrize("name", sorted(m for m in modules() if m.startswith(FIRST)))
def test_engine_modules_import_first_in_a_fresh_interpreter(name):
    # Imported first, alone: an order dependency between modules shows up here.
    code = f"import importlib; importlib.import_module({name!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_modules_import_in_process():
    for name in modules():
        importlib.import_module(name)
