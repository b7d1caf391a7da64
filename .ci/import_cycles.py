"""Find import circles among the modules of src/polysense.

Walks the package, parses every module with ``ast`` and records an edge
A -> B for each import of a polysense module B in module A.  Module-level and
function-level imports both count (a function-level import still runs, it
only runs later).  ``from polysense.x import y`` resolves to ``polysense.x.y``
when that is a module, else to ``polysense.x``; relative imports are resolved
against the importing module's package.  A package's ``__init__`` importing
its own submodules is an ordinary edge (``polysense.a -> polysense.a.b``).

Imports under ``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``) are
ignored: they never run, so they cannot form a circle at run time.

Strongly connected components are found with Tarjan's algorithm; every
component of more than one module, or a module importing itself, is a circle.
Prints each circle and exits 1 if any, else prints "0 import circles" and
exits 0.

Usage: python .ci/import_cycles.py [SRC_ROOT] (default: src)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Map dotted module name -> file for every module under root/package."""
    mods: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(tree: ast.AST):
    """Yield Import/ImportFrom nodes, skipping TYPE_CHECKING-only blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies inside."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    mods = module_names(root, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    targets.append(full if full in mods else base)
            for t in targets:
                dep = _resolve(t, mods)
                if dep is not None:
                    graph[mod].add(dep)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); returns every component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    comps.append(sorted(comp))
    return comps


def find_cycles(root: Path, package: str = "polysense") -> list[list[str]]:
    graph = module_graph(Path(root), package)
    return sorted(c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]])


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent.parent / "src"
    cycles = find_cycles(root)
    for c in cycles:
        print("import circle: " + " <-> ".join(c))
    print(f"{len(cycles)} import circles")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
