"""clip_tao has no import cycles, counting imports inside functions too (a lazy import is still a dependency).

The graph is read from the source with ``ast``: every ``import`` / ``from ... import`` of a clip_tao module,
at any depth, except under ``if TYPE_CHECKING:`` (never executed). ``from package import name`` is an edge to
``package.name`` when that is a module, else to the package itself. Importing ``a.b`` runs ``a/__init__.py``
first, but that implicit edge is not counted: every package that re-exports its submodules would close a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import clip_tao

PACKAGE = Path(clip_tao.__file__).parent


def _module_names() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """clip_tao modules that ``module`` imports anywhere in its body."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in modules:  # import a.b.c names module a.b.c (or the deepest one)
                    name = name.rpartition(".")[0]
                if name:
                    found.add(name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package the module sits in
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    found.add(f"{source}.{alias.name}")
                elif source in modules:
                    found.add(source)
        stack.extend(ast.iter_child_nodes(node))
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {
        name: _imports(
            ast.parse(path.read_text(encoding="utf-8"), str(path)), name, path.name == "__init__.py", modules
        )
        for name, path in modules.items()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def _path_between(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete circle through the component's first module, for the failure message."""
    members, start = set(component), component[0]
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for target in sorted(graph[path[-1]] & members):
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                paths.append([*path, target])
    return component


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # a module-level import, a package re-exporting a submodule, and (parsed below) imports inside a function
    assert "clip_tao.metrics" in graph["clip_tao.tasks.evaluate"]
    assert "clip_tao.models.registry" in graph["clip_tao.models"]
    lazy = ast.parse("def f():\n    from clip_tao.metrics import compute_retrieval\n    from . import base\n")
    assert _imports(lazy, "clip_tao.models.registry", False, _module_names()) == {
        "clip_tao.metrics",
        "clip_tao.models.base",
    }
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_clip_tao_has_no_import_cycles():
    graph = import_graph()
    circles = [" -> ".join(_path_between(graph, component)) for component in import_cycles(graph)]
    assert not circles, "import cycles in clip_tao:\n" + "\n".join(circles)
