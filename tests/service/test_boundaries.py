"""The service package imports only ``detector`` of this project, never ``training`` or
torchattacks (checked on the source, without importing anything)."""

from __future__ import annotations

import ast
from pathlib import Path

import service

FORBIDDEN = ("training", "torchattacks")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_service_does_not_import_training_or_torchattacks():
    files = sorted(Path(service.__file__).parent.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{path.name} imports {sorted(bad)}"
