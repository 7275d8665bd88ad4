"""The package's architecture: one-way floors, torch only on the model's floors, rooms a reader can hold."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "scdoloris"
# Above this many lines a module says at its top why it is one room (docs/contributing.md).
MAX_LINES = 600
REASON = "One room of more than 600 lines because"


def test_imports_keep_the_floors_and_torch_stays_on_the_model_floors():
    pytest.importorskip("importlinter")
    # In its own process: the contracts are in pyproject.toml, and the linter writes to the terminal.
    command = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    run = subprocess.run([sys.executable, "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "one-way floors KEPT" in report
    assert "torch only in the model's floors KEPT" in report


def test_a_long_module_says_why_it_is_one_room():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            long[path.relative_to(PACKAGE).as_posix()] = REASON in text[: text.find('"""', 3) + 3]
    assert long, "no module is long: the check would not fail on one"  # guards the walk itself
    unexplained = [name for name, explained in long.items() if not explained]
    assert not unexplained, f"Modules above {MAX_LINES} lines without '{REASON} ...' in their docstring: {unexplained}"
