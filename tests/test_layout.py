"""The package layout: no import cycles, core apart from capabilities, modules of a readable size.

Imports are read from the source (ast), so this needs no running service. Every import counts,
also one inside a function (a deferred import hides a cycle, it does not remove it); only
``if TYPE_CHECKING:`` blocks are left out, since they never run.
"""
from __future__ import annotations

import ast
from pathlib import Path

import kvmagent

PACKAGE = Path(kvmagent.__file__).parent
PLUGINS = PACKAGE.parent / "plugins"
MAX_LINES = 500  # longer modules say why at their top ("Long on purpose: ...")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The kvmagent modules ``path`` imports (a package import counts as its __init__)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    prefix = ".".join(base + ([child.module] if child.module else []))
                else:
                    prefix = child.module or ""
                for alias in child.names:  # "from .x import y": y may be a module itself
                    full = f"{prefix}.{alias.name}"
                    resolve(full if full in modules else prefix)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_no_import_cycle_in_kvmagent():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_deferred_import_cycle(tmp_path):
    graph = {"kvmagent.a": {"kvmagent.b"}, "kvmagent.b": {"kvmagent.c"},
             "kvmagent.c": {"kvmagent.a"}, "kvmagent.d": {"kvmagent.a"}}
    assert cycles(graph) == [["kvmagent.a", "kvmagent.b", "kvmagent.c"]]
    # and the reader counts a function-local import, but not a TYPE_CHECKING one
    mod = PACKAGE / "core" / "state.py"
    src = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .server import x\n"
           "def f():\n    from ..virtiofs import service\n")
    fake = tmp_path / "kvmagent" / "core" / "state.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(src)
    modules = {"kvmagent.core.server", "kvmagent.virtiofs.service", "kvmagent.virtiofs"}
    assert mod.exists()
    assert imports_of_at(fake, tmp_path, modules) == {"kvmagent.virtiofs.service"}


def imports_of_at(path: Path, root: Path, modules: set[str]) -> set[str]:
    global PACKAGE
    saved, PACKAGE = PACKAGE, root / "kvmagent"
    try:
        return imports_of(path, modules)
    finally:
        PACKAGE = saved


def test_core_does_not_import_capabilities():
    """The framework (kvmagent.core) knows no capability: they plug into it. (The top
    package, which only holds the version, is not a capability.)"""
    bad = {m: sorted(d for d in deps if d != "kvmagent" and not d.startswith("kvmagent.core"))
           for m, deps in import_graph().items() if m.startswith("kvmagent.core")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_modules_are_short_or_say_why():
    long = []
    for path in sorted(list(PACKAGE.rglob("*.py")) + list(PLUGINS.glob("*.py"))):
        text = path.read_text()
        head = text[:3000]
        if text.count("\n") > MAX_LINES and "Long on purpose" not in head:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {text.count(chr(10))} lines")
    assert long == []
