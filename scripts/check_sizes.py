"""Fail listing every module above 500 lines and every function above 80 in cts/ and stages/.

A function's size runs from its first decorator to its last line, docstring included; a
nested function counts inside its parent and on its own. Run from the repository root
(``make lint``): ``python scripts/check_sizes.py [folder ...]``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
FOLDERS = ("cts", "stages")


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its first decorator to its end."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return (node.end_lineno or node.lineno) - first + 1


def oversized(path: Path) -> list[str]:
    """One line per limit ``path`` exceeds: the module, then each function in order."""
    text = path.read_text()
    found = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{path}: module of {lines} lines (max {MAX_MODULE_LINES})")
    functions = [
        node
        for node in ast.walk(ast.parse(text, str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    for node in sorted(functions, key=lambda node: node.lineno):
        size = function_lines(node)
        if size > MAX_FUNCTION_LINES:
            found.append(
                f"{path}:{node.lineno}: function {node.name} of {size} lines "
                f"(max {MAX_FUNCTION_LINES})"
            )
    return found


def main(folders: list[str]) -> int:
    """Print what is too large; 1 if anything is, else 0."""
    found = [
        line
        for folder in folders or FOLDERS
        for path in sorted(Path(folder).rglob("*.py"))
        for line in oversized(path)
    ]
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} too large: split them by concern", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
