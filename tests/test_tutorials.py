"""The tutorials: stored executed at real settings, matching their sources, and runnable (fast mode here).

Sources are jupytext percent scripts (``tutorials/NN_*.py``); ``python tutorials/execute.py`` stores each
one executed as ``tutorials/NN_*.ipynb``, which the docs render. The default suite checks that the
stored notebooks match their sources; ``-m slow`` runs every source with ``SCDOLORIS_TUTORIAL_FAST=1``
(tiny models, few steps).
"""

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
SOURCES = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
# Generous: each notebook takes about a minute on one thread of a quiet machine.
TIMEOUT = int(os.environ.get("SCDOLORIS_TUTORIAL_TIMEOUT", "600"))


def test_tutorials_are_stored_executed_at_real_settings_and_match_their_sources():
    assert len(SOURCES) == 4
    assert sorted(p.stem for p in TUTORIALS.glob("*.ipynb")) == [p.stem for p in SOURCES]
    for source in SOURCES:
        expected = jupytext.read(source)
        stored = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
        assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in expected.cells], (
            f"{source.name} changed after its notebook was executed: run python tutorials/execute.py {source.stem}"
        )
        run = stored.metadata["scdoloris"]
        assert run["fast"] is False and run["commit"] and run["seconds"] > 0, source.name
        code_cells = [c for c in stored.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code_cells), source.name
        assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"], source.name
        images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
        assert images, f"{source.name} stored no figure"
        # A stored notebook is read on other machines: no path of the one it ran on.
        texts = [
            o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in code_cells for o in c.outputs
        ]
        assert not [t for t in texts if re.search(r"/(tmp|root|home|work|Users)/", t)], source.name


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES, ids=[p.stem for p in SOURCES])
def test_tutorial_runs_in_fast_mode(path, monkeypatch, tmp_path):
    monkeypatch.setenv("SCDOLORIS_TUTORIAL_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(
        notebook, timeout=TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on any cell's error (allow_errors is off)
    seconds = time.perf_counter() - start
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the tutorial drew no figure"
    print(f"{path.name}: {seconds:.0f} s")
