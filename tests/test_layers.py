"""The engine's floors: no import cycle in the package, and a handler for every node kind.

The cycle check reads the source with ``ast`` (nothing is imported): an edge A -> B is any
``import``/``from ... import`` in A of a module of ``durapipe`` B, at module level or inside
a function (a lazy import still ties the two modules together for a reader). Imports under
``if TYPE_CHECKING:`` are left out: they exist for the type checker only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import durapipe
from durapipe.ir import Node

SRC = Path(durapipe.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ("durapipe", *path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                # ``from pkg import sub`` imports the submodule; ``from mod import x`` the module.
                subs = {f"{target}.{a.name}" for a in child.names} & modules.keys()
                named = {a.name for a in child.names if f"{target}.{a.name}" in subs}
                if subs:
                    out.update(subs)
                if target in modules and (not subs or len(named) < len(child.names)):
                    out.add(target)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle_in_durapipe() -> None:
    graph = _graph()
    assert graph["durapipe.engine.interpreter"] >= {"durapipe.engine.context",
                                                    "durapipe.engine.basic"}
    assert _cycles(graph) == []


def test_the_checker_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_handlers_import_only_lower_floors() -> None:
    graph = _graph()
    engine = "durapipe.engine."
    handlers = {engine + m for m in
                ("basic", "agent", "bestof", "control", "dispatch", "flow", "gates", "limits", "patching")}
    above = {engine + m for m in ("interpreter", "runs", "runhandle", "listen", "app", "admin", "drain")}
    for module in handlers:
        upward = graph[module] & (handlers - {module} | above)
        assert not upward, (module, sorted(upward))
    assert not graph[engine + "context"] & (handlers | above)


def _node_classes() -> set[type[Node]]:
    import durapipe.planner  # noqa: F401  (Flow and Step are nodes too)

    seen: set[type[Node]] = set()
    todo = list(Node.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    return {c for c in seen if c.__module__.startswith("durapipe.")}


def test_every_node_class_has_a_handler() -> None:
    from durapipe.engine.interpreter import HANDLERS, TABLE

    classes = _node_classes()
    assert len(classes) >= 18
    assert sorted(c.__name__ for c in classes - HANDLERS.keys()) == []
    assert TABLE.handlers is HANDLERS
