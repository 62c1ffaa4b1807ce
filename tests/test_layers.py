"""Layers one way: the library (cts/) never imports the stages (stages/) but for its CLI,
and no two project modules import each other, directly or around a longer loop.

A `cts` module that imports `stages` ties the library to the DVC pipeline (a user of
`cts.load_model` would load params.yaml handling); an import cycle makes a module's
behaviour depend on which of the two was imported first, and neither can be understood or
tested alone. The graph is derived from the code: every import statement of cts/ and
stages/, module-level and inside functions (a lazy import is a dependency too).
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import PACKAGE_FOLDERS, REPO, module_name

# The one library package that may import the stages: the CLI binds commands to them.
STAGE_IMPORTERS = {"cts.cli"}


def _may_import_stages(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in STAGE_IMPORTERS)


def _nearest(name: str, modules: set[str]) -> str:
    """The module ``name`` or the nearest package above it that is a project module ("" if
    none): ``import cts.data.io`` imports ``cts.data.io``, ``cts.x.y`` of a missing ``y``
    its nearest existing module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """Project modules the file's import statements name: ``from m import x`` names the
    submodule ``m.x`` when there is one, else ``m``; relative imports are resolved against
    ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_nearest(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else _nearest(base, modules))
    return found - {"", name}


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    files = {
        module_name(p, root): p
        for folder in PACKAGE_FOLDERS.values()
        for p in (root / folder).rglob("*.py")
    }
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan),
    each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def library_stage_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """``cts`` modules (but :data:`STAGE_IMPORTERS`) -> the ``stages`` modules they import."""
    found = {
        name: sorted(t for t in targets if t.split(".")[0] == "cts_stages")
        for name, targets in graph.items()
        if name.split(".")[0] == "cts" and not _may_import_stages(name)
    }
    return {name: targets for name, targets in found.items() if targets}


def test_the_library_does_not_import_the_stages():
    wrong = library_stage_imports(import_graph())
    assert not wrong, f"cts modules import stages (only {sorted(STAGE_IMPORTERS)} may): {wrong}"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (modules that import each other, maybe through others): " + (
        "; ".join(" <-> ".join(cycle) for cycle in found)
    )


def test_the_walk_sees_lazy_and_relative_imports_and_finds_cycles(tmp_path):
    """A function-level import and a relative one are edges, ``from cts import b`` an edge
    to the submodule; a three-module loop is one cycle, reported with its members; a lazy
    import of a stage from the library is found, the CLI's is allowed."""
    package = tmp_path / "cts"
    package.mkdir()
    (package / "__init__.py").write_text("from cts.a import f\n")
    (package / "a.py").write_text("def f():\n    from cts import b\n")
    (package / "b.py").write_text("from .c import g\n")
    (package / "c.py").write_text("import cts.a\n\ndef g():\n    from cts_stages.x import y\n")
    (package / "cli.py").write_text("import cts_stages.x\n")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "x.py").write_text("y = 1\n")
    graph = import_graph(tmp_path)
    assert graph["cts"] == {"cts.a"} and graph["cts.a"] == {"cts.b"}
    assert graph["cts.b"] == {"cts.c"} and graph["cts.c"] == {"cts.a", "cts_stages.x"}
    assert cycles(graph) == [["cts.a", "cts.b", "cts.c"]]
    assert library_stage_imports(graph) == {"cts.c": ["cts_stages.x"]}  # cts.cli may
