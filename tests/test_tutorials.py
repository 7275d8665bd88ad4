"""Execute every tutorial notebook in fast mode (SCDOLORIS_TUTORIAL_FAST=1: tiny models, few steps)."""

import importlib.util
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
# Generous: each notebook takes about a minute on one thread of a quiet machine.
TIMEOUT = int(os.environ.get("SCDOLORIS_TUTORIAL_TIMEOUT", "600"))


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", TUTORIALS / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorials_are_committed_without_outputs_and_match_the_generator():
    generator = _generator()
    assert sorted(p.name for p in NOTEBOOKS) == sorted(generator.NOTEBOOKS)
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code_cells = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code_cells), path.name
        expected = [c["source"] for c in generator.NOTEBOOKS[path.name]]
        assert [c.source for c in notebook.cells] == expected, f"{path.name}: re-run tutorials/make_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs_in_fast_mode(path, monkeypatch, tmp_path):
    monkeypatch.setenv("SCDOLORIS_TUTORIAL_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on any cell's error (allow_errors is off)
    seconds = time.perf_counter() - start
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the tutorial drew no figure"
    print(f"{path.name}: {seconds:.0f} s")
