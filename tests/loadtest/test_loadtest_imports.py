"""Imports point one way for what drives a server and for the scripts (checked on the source,
nothing is imported):

- ``loadtest`` imports ``detector`` and ``service`` (it starts and drives the server) but
  nothing of ``training``, ``evaluation`` or ``benchmarks``, nor torchattacks;
- ``benchmarks/*.py`` and ``tools/*.py`` are scripts over the installed packages: no ``sys.path``
  edits, no ``noqa: E402`` imports, and nothing of the project imports them, tests included.
"""

from __future__ import annotations

from pathlib import Path

import loadtest
from tests.source_imports import forbidden_imports

ROOT = Path(__file__).resolve().parents[2]
#: Where the project's Python code lives (``benchmarks/`` itself included: no script imports
#: another).
CODE = ("detector", "service", "training", "evaluation", "loadtest", "benchmarks", "tests",
        "tools")


def test_loadtest_imports_neither_training_nor_evaluation():
    files = sorted(Path(loadtest.__file__).parent.rglob("*.py"))
    assert len(files) >= 10
    bad = forbidden_imports(files, ("training", "evaluation", "benchmarks", "torchattacks"))
    assert not bad, {str(p.relative_to(ROOT)): sorted(m) for p, m in bad.items()}


def test_nothing_imports_the_benchmark_scripts():
    files = sorted(f for d in CODE for f in (ROOT / d).rglob("*.py"))
    assert any(f.parts[-3:] == ("tests", "service", "test_load.py") for f in files)
    bad = forbidden_imports(files, ("benchmarks",))
    assert not bad, {str(p.relative_to(ROOT)): sorted(m) for p, m in bad.items()}


def test_benchmark_scripts_do_not_edit_the_import_path():
    """benchmarks/ and tools/ scripts run against the installed package."""
    scripts = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "tools").glob("*.py"))
    assert len(scripts) >= 5
    for script in scripts:
        text = script.read_text()
        assert "sys.path" not in text, f"{script.name} edits sys.path"
        assert "noqa: E402" not in text, f"{script.name} imports after code (noqa: E402)"
