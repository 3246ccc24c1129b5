"""Imports point one way (checked on the source, nothing is imported):

- ``detector`` (what inference needs) imports nothing of ``training``, ``service``,
  ``evaluation``, ``loadtest`` or ``benchmarks``, nor torchattacks (not in the serving install);
- ``evaluation`` (the protocol as a library) imports ``detector`` but nothing of ``training``,
  ``service``, ``loadtest`` or ``benchmarks``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import detector
import evaluation
from tests.source_imports import imported_modules


@pytest.mark.parametrize(("package", "forbidden", "at_least"), [
    (detector, ("training", "service", "evaluation", "loadtest", "benchmarks", "torchattacks"),
     10),
    (evaluation, ("training", "service", "loadtest", "benchmarks"), 10),
], ids=["detector", "evaluation"])
def test_package_imports_no_forbidden_package(package, forbidden, at_least):
    root = Path(package.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) >= at_least
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in forbidden}
        assert not bad, f"{path.relative_to(root)} imports {sorted(bad)}"
