"""The import contract (.importlinter) holds, and imports sit at module level.

Layers point one way: bench.core <- editors | tasks | reports <- bench.regression <- bench.session
<- bench.runner <- bench.cli. An import inside a function hides a dependency (and a cycle) from
readers and from the contract, so it is allowed only for a heavy optional dependency loaded late
on purpose, marked by a comment containing "late:" on the import line or just above it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "editors", "tasks", "reports")


def test_import_contract_is_kept():
    script = Path(sys.executable).with_name("lint-imports")
    if not script.exists():
        pytest.fail("lint-imports (import-linter) is not installed; it is in the test extra")
    # the config file as a positional argument (`--config` is deprecated); no time limit: a busy
    # machine is slow, not wrong (pytest-timeout's guard catches a hang)
    res = subprocess.run([str(script), str(REPO / ".importlinter")], cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout
    assert "deprecat" not in (res.stdout + res.stderr).lower(), res.stderr


def _function_level_imports(path: Path) -> list[tuple[int, str]]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                line = child.lineno
                nearby = lines[max(0, line - 3): line]  # the import line and the two above it
                if not any("late:" in text for text in nearby):
                    found.append((line, lines[line - 1].strip()))
            visit(child, inner)

    visit(ast.parse(source), False)
    return found


def test_no_unmarked_function_level_imports():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for line, text in _function_level_imports(path):
                offenders.append(f"{path.relative_to(REPO)}:{line}: {text}")
    assert not offenders, "imports inside functions (mark deliberate late imports with 'late:'):\n" + \
        "\n".join(offenders)


def test_the_check_finds_an_unmarked_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n\n\ndef f():\n    import json\n    # late: heavy\n    import csv\n"
                      "    return json, csv\n")
    assert _function_level_imports(sample) == [(5, "import json")]
