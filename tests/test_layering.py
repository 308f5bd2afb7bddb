"""Import layering: the nsiter modules import each other without cycles.

The graph is built from the source files as they are (modules come and go while the package
is refactored): every ``nsiter/**/*.py`` is parsed with :mod:`ast` and each import of an nsiter
module is an edge, wherever it sits (module level or inside a function: a lazy import that
closes a cycle is still a cycle in the layering).  Imports under ``if TYPE_CHECKING:`` never
run and are left out, as is the implicit import of a parent package (``import nsiter.a.b``
runs ``nsiter/__init__.py`` first, which would put every module on a cycle through it).
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

PACKAGE = "nsiter"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    if not base:
        return None
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """``{module: {nsiter modules it imports}}`` over the modules that exist."""
    modules = _modules() if modules is None else modules
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                target = _resolve(node, mod, is_package)
                if target is None:
                    continue
                # ``from pkg import name``: name is a submodule or an attribute of pkg
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                           for a in node.names]
            for t in targets:
                # ``import nsiter.a.b`` / ``from nsiter.a.b import f``: the deepest existing module
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in components:
        members = set(comp)
        start = comp[0]
        # breadth first inside the component: a shortest cycle through ``start``
        prev: dict[str, str | None] = {start: None}
        queue = deque([start])
        last = None
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                last = v
                break
            for w in sorted(graph[v] & members):
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = []
        while last is not None:
            path.append(last)
            last = prev[last]
        cycles.append(path[::-1] + [start])
    return cycles


def test_the_graph_sees_relative_absolute_and_function_level_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .sub.c import f\n")
    (pkg / "b.py").write_text("import nsiter.a\nfrom typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("def f():\n    from .. import b\n    from ..a import x\n")
    modules = {".".join((PACKAGE,) + p.relative_to(pkg).with_suffix("").parts).removesuffix(".__init__"): p
               for p in pkg.rglob("*.py")}
    graph = import_graph(modules)
    assert graph["nsiter"] == {"nsiter.a"}
    assert graph["nsiter.a"] == {"nsiter.sub.c"}
    assert graph["nsiter.b"] == {"nsiter.a"}  # the TYPE_CHECKING import is left out
    assert graph["nsiter.sub.c"] == {"nsiter.b", "nsiter.a"}
    cycles = find_cycles(graph)
    assert len(cycles) == 1 and cycles[0][0] == cycles[0][-1]
    assert set(cycles[0]) == {"nsiter.a", "nsiter.sub.c"}


def test_no_import_cycles_among_nsiter_modules():
    modules = _modules()
    graph = import_graph(modules)
    cycles = find_cycles(graph)
    if cycles:
        lines = [" -> ".join(c) for c in cycles]
        print("import cycles among nsiter modules:\n  " + "\n  ".join(lines))
        pytest.fail("nsiter modules import each other in a cycle (an import of one module from another, "
                    "at any level, closes it); move what both need into a lower module:\n  " + "\n  ".join(lines))


def test_cli_imports_run_one_way():
    graph = import_graph()
    if "nsiter._cli_common" not in graph:
        pytest.skip("no nsiter/_cli_common.py in this tree")
    assert not graph["nsiter._cli_common"], "the shared CLI module imports no nsiter module"
    assert "nsiter._verify_cli" in graph["nsiter.cli"]
    assert "nsiter.cli" not in graph.get("nsiter._verify_cli", set())
