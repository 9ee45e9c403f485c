"""The package's layout: no import cycle, no private name imported across modules, no module over 500 lines.

The imports are read with :mod:`ast` (nothing is imported), all of them: at module level, inside functions and
under ``if TYPE_CHECKING:`` (a typing-only cycle is still a cycle for the reader). An import of a name from a
package (``from lightning_kedit.editing import EditDelta``) is resolved through the package's ``__init__``
re-exports to the submodule that defines the name; a name the ``__init__`` defines itself makes the package's
``__init__`` the node. A submodule's import does not count as an import of its parent packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "lightning_kedit"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 500


@dataclass
class ModuleInfo:
    """One module of the package as the layout test reads it."""

    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    # name bound at module level by an import -> (module it came from, name there); for re-export resolution.
    reexports: dict[str, tuple[str, str]] = field(default_factory=dict)


def module_name(path: Path, root: Path = ROOT) -> str:
    """``lightning_kedit/editing/delta.py`` -> ``lightning_kedit.editing.delta``; an ``__init__`` names its package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(root: Path = ROOT) -> dict[str, ModuleInfo]:
    """Every module under ``root`` by dotted name, parsed."""
    modules: dict[str, ModuleInfo] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        modules[name] = ModuleInfo(name, path, path.name == "__init__.py", tree)
    for info in modules.values():
        for node in info.tree.body:
            if isinstance(node, ast.ImportFrom):
                source = import_base(info, node)
                if source is None:
                    continue
                for alias in node.names:
                    info.reexports[alias.asname or alias.name] = (source, alias.name)
    return modules


def import_base(info: ModuleInfo, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module
    package = info.name.split(".") if info.is_package else info.name.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    base = ".".join(package)
    return f"{base}.{node.module}" if node.module else base


def resolve_name(modules: Mapping[str, ModuleInfo], source: str, name: str, seen: frozenset[str] = frozenset()) -> str:
    """The module that defines ``name`` imported from ``source``: a submodule, or through ``__init__`` re-exports."""
    if f"{source}.{name}" in modules:
        return f"{source}.{name}"
    info = modules[source]
    if info.is_package and name in info.reexports and source not in seen:
        origin, original = info.reexports[name]
        if origin in modules:
            return resolve_name(modules, origin, original, seen | {source})
    return source


def package_module(modules: Mapping[str, ModuleInfo], dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the package, or None for an outside module."""
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


@dataclass(frozen=True)
class PrivateImport:
    """A private name one module reads from another."""

    importer: str
    source: str
    name: str
    line: int


def import_edges(modules: Mapping[str, ModuleInfo]) -> tuple[dict[str, set[str]], list[PrivateImport]]:
    """The import graph (module -> modules it imports) and the private names imported across modules."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    private: list[PrivateImport] = []
    for info in modules.values():
        aliases: dict[str, str] = {}  # local name -> package module (import X [as y], from P import m)
        for node in ast.walk(info.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = package_module(modules, alias.name)
                    if target is None:
                        continue
                    graph[info.name].add(target)
                    if alias.asname:
                        aliases[alias.asname] = target
                    elif target == alias.name:
                        aliases[alias.name] = target
            elif isinstance(node, ast.ImportFrom):
                source = import_base(info, node)
                if source is None or source not in modules:
                    continue
                for alias in node.names:
                    if alias.name == "*":
                        graph[info.name].add(source)
                        continue
                    target = resolve_name(modules, source, alias.name)
                    graph[info.name].add(target)
                    if target == f"{source}.{alias.name}":
                        aliases[alias.asname or alias.name] = target
                    if is_private(alias.name):
                        private.append(PrivateImport(info.name, source, alias.name, node.lineno))
        for node in ast.walk(info.tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and is_private(node.attr)
                and aliases[node.value.id] != info.name
            ):
                private.append(PrivateImport(info.name, aliases[node.value.id], node.attr, node.lineno))
    for edges in graph.values():
        edges.discard("")
    for name, edges in graph.items():
        edges.discard(name)
    return graph, private


def is_private(name: str) -> bool:
    """``_helper`` is private; ``__version__`` and other dunders are not."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle path (first node repeated at the end) for each strongly connected component with a cycle.

    Tarjan's algorithm, iterative; then a breadth-first search inside each component for the shortest cycle
    through its smallest node, so that the report is stable.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            next_frontier = []
            for node in frontier:
                for child in sorted(graph.get(node, ())):
                    if child not in members:
                        continue
                    if child == start:
                        found = node
                        break
                    if child not in previous:
                        previous[child] = node
                        next_frontier.append(child)
                if found is not None:
                    break
            frontier = next_frontier
        assert found is not None
        path = [found]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def test_cycle_finder_catches_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"g"}, "g": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_reader_resolves_reexports_relative_and_typing_only_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.sub import Thing\n")
    (package / "sub" / "__init__.py").write_text("from .thing import Thing\n")
    (package / "sub" / "thing.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.user import use\n"
    )
    (package / "user.py").write_text(
        "import pkg.sub.thing as t\n\ndef use():\n    from pkg import Thing\n    from pkg.sub.thing import _hidden\n"
        "    return t._other\n"
    )
    modules = read_package(package)
    graph, private = import_edges(modules)
    assert graph["pkg.user"] == {"pkg.sub.thing"}
    assert graph["pkg.sub"] == {"pkg.sub.thing"}
    assert find_cycles(graph) == [["pkg.sub.thing", "pkg.user", "pkg.sub.thing"]]
    assert sorted((p.importer, p.name) for p in private) == [("pkg.user", "_hidden"), ("pkg.user", "_other")]


def test_no_import_cycles() -> None:
    graph, _ = import_edges(read_package())
    cycles = find_cycles(graph)
    report = []
    for cycle in cycles:
        # the cycle's strongly connected component: every module that sits on some cycle with its first module
        component = sorted(n for n in graph if reaches(graph, cycle[0], n) and reaches(graph, n, cycle[0]))
        report.append(" -> ".join(cycle) + f"   (all modules in this knot: {', '.join(component)})")
    assert not cycles, "import cycles:\n" + "\n".join(report)


def reaches(graph: Mapping[str, Iterable[str]], start: str, goal: str) -> bool:
    """Whether ``goal`` is reachable from ``start`` (``start`` reaches itself)."""
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        for child in graph.get(node, ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return False


def test_no_private_names_imported_across_modules() -> None:
    _, private = import_edges(read_package())
    lines = [f"{p.importer}:{p.line} reads {p.source}.{p.name}" for p in private]
    assert not lines, "private names imported across modules:\n" + "\n".join(lines)


def test_modules_are_at_most_500_lines() -> None:
    long = {
        str(path.relative_to(ROOT.parent)): count
        for path in sorted(ROOT.rglob("*.py"))
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
