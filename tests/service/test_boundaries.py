"""The service package imports only ``detector`` of this project, never ``training`` or
torchattacks (checked on the source, without importing anything)."""

from __future__ import annotations

from pathlib import Path

import service
from tests.source_imports import imported_modules

FORBIDDEN = ("training", "torchattacks")


def test_service_does_not_import_training_or_torchattacks():
    files = sorted(Path(service.__file__).parent.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{path.name} imports {sorted(bad)}"
