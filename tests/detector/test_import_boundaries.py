"""The detector package (what inference needs) imports nothing of ``training``, ``service`` or
``benchmarks``, nor torchattacks (not in the serving install); checked on the source."""

from __future__ import annotations

from pathlib import Path

import detector
from tests.source_imports import imported_modules

FORBIDDEN = ("training", "service", "benchmarks", "torchattacks")


def test_detector_imports_no_other_package_of_the_project():
    files = sorted(Path(detector.__file__).parent.glob("*.py"))
    assert len(files) >= 10
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN}
        assert not bad, f"{path.name} imports {sorted(bad)}"
