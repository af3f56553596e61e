"""Find import cycles between the kit's modules: `python tools/import_cycles.py` prints each, exits 1 if any.

Reads every mos_lightning/**/*.py (and callbacks/*.py, installed as mos_lightning.callbacks) with ast,
resolving relative imports and counting imports inside functions too: a lazy import hides a circle from
Python, not from the reader. `from pkg import name` is an edge to pkg.name when that is a module, else to pkg.
Importing a submodule runs its package's __init__, but that implicit edge is not counted: a package
re-exporting its submodules is no circle. A submodule importing from its own package's __init__ is.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"mos_lightning": ROOT / "mos_lightning", "mos_lightning.callbacks": ROOT / "callbacks"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The module a `from ... import` names, its dots resolved against the importing module `name`."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that module `name` imports, anywhere in its body."""
    is_package, edges = path.name == "__init__.py", set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, name, is_package)
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module c: its nearest module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_loop(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest closed path through the component's first module, for the report."""
    start, inside = component[0], set(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & inside):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return component


def main() -> int:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    found = cycles(graph)
    for component in found:
        print(f"cycle among {', '.join(component)}\n  e.g. " + " -> ".join(one_loop(graph, component)))
    print(f"{len(known)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
