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


def _imported_names(node, module: str, is_package: bool, modules) -> list[str]:
    """The dotted names an ``import`` / ``from ... import`` statement of ``module`` brings in
    (``from pkg import name``: ``pkg.name`` where that is a module, else ``pkg``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    target = _resolve(node, module, is_package)
    if target is None:
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """``{module: {nsiter modules it imports}}`` over the modules that exist."""
    modules = _modules() if modules is None else modules
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in _import_nodes(tree):
            for t in _imported_names(node, mod, is_package, modules):
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


# ----------------------------------------------------------------------------- what ``import nsiter`` runs

#: Packages that load on first use only: ``import nsiter`` must not run an import of them.
LAZY_PACKAGES = ("numba", "scipy", "matplotlib", "torch", "dask", "distributed", "PIL", "threadpoolctl")


def _guarded_by_sys_modules(test: ast.expr) -> bool:
    """``if "x" in sys.modules:``: an import that runs only when the package is loaded already."""
    return (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.In)
            and isinstance(test.comparators[0], ast.Attribute) and test.comparators[0].attr == "modules")


def _module_level_imports(tree: ast.Module):
    """The Import / ImportFrom nodes that run when the module is imported: its top-level statements
    and the blocks of top-level ``if``/``try``/``with`` (not function or class bodies, not
    ``if TYPE_CHECKING:`` nor ``if "x" in sys.modules:``)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (_is_type_checking(node.test) or _guarded_by_sys_modules(node.test)):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
        elif isinstance(node, ast.With):
            stack.extend(node.body)


def eager_imports(modules: dict[str, Path] | None = None) -> dict[str, tuple[set[str], set[str]]]:
    """``{module: (nsiter modules, top-level packages)}`` imported when the module is imported."""
    modules = _modules() if modules is None else modules
    out = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        internal, external = set(), set()
        for node in _module_level_imports(tree):
            for t in _imported_names(node, mod, is_package, modules):
                if t == PACKAGE or t.startswith(PACKAGE + "."):
                    while t and t not in modules:
                        t = t.rpartition(".")[0]
                    if t and t != mod:
                        internal.add(t)
                        # ``import nsiter.a.b`` runs nsiter.a's __init__ too
                        parent = t.rpartition(".")[0]
                        while parent and parent != PACKAGE:
                            internal.add(parent)
                            parent = parent.rpartition(".")[0]
                else:
                    external.add(t.partition(".")[0])
        out[mod] = (internal, external)
    return out


def test_import_nsiter_runs_no_import_of_the_lazy_packages():
    """The static twin of ``tests/test_startup.py``: following only the imports that run at module
    level from ``nsiter/__init__.py``, no module imports Numba, SciPy, matplotlib, torch or Dask,
    and no kernel module (``nsiter._numba``, ``nsiter._torch``) is reached."""
    eager = eager_imports()
    seen, todo = {PACKAGE}, [PACKAGE]
    while todo:
        for dep in eager[todo.pop()][0]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    kernels = sorted(m for m in seen if m.startswith((f"{PACKAGE}._numba", f"{PACKAGE}._torch")))
    assert not kernels, f"import nsiter runs the kernel modules {kernels}: import them inside the function"
    offenders = {m: sorted(eager[m][1] & set(LAZY_PACKAGES)) for m in sorted(seen)}
    offenders = {m: v for m, v in offenders.items() if v}
    assert not offenders, ("modules run by `import nsiter` import packages that must load on first use "
                           f"(move the import into the function that needs it): {offenders}")


def test_the_eager_import_scan_skips_functions_and_loaded_package_guards(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import sys\nfrom . import a\nif 'numba' in sys.modules:\n    from . import b\n")
    (pkg / "a.py").write_text("import numpy\ntry:\n    import scipy\nexcept ImportError:\n    pass\n"
                              "def f():\n    import numba\n    from . import b\n")
    (pkg / "b.py").write_text("import numba\n")
    modules = {".".join((PACKAGE,) + p.relative_to(pkg).with_suffix("").parts).removesuffix(".__init__"): p
               for p in pkg.rglob("*.py")}
    eager = eager_imports(modules)
    assert eager["nsiter"] == ({"nsiter.a"}, {"sys"})
    assert eager["nsiter.a"] == (set(), {"numpy", "scipy"})
    assert eager["nsiter.b"] == (set(), {"numba"})
