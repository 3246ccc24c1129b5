"""What a Python source file imports, read from its syntax tree (nothing is imported)."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path


def imported_modules(path: Path) -> set[str]:
    """Absolute module names of every ``import`` / ``from ... import`` in the file at ``path``
    (relative imports are left out)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def forbidden_imports(files: Iterable[Path], forbidden: Iterable[str]) -> dict[Path, set[str]]:
    """File -> the modules it imports from any top-level package in ``forbidden``, for each of
    ``files`` that imports one."""
    top = set(forbidden)
    found = {}
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in top}
        if bad:
            found[path] = bad
    return found
