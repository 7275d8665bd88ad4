"""Execute the tutorials at real settings and store them with their outputs: ``python tutorials/execute.py``.

The sources are the jupytext percent scripts ``tutorials/NN_*.py`` (edit those, review them as code);
this writes ``tutorials/NN_*.ipynb`` next to each, executed top to bottom in a fresh kernel without
``SCDOLORIS_TUTORIAL_FAST``, with the commit, date and run time in the notebook's metadata
(``metadata["scdoloris"]``). The docs render the stored notebooks; the test suite checks that they match
their sources and runs each source in fast mode.

Options: notebook stems to run only those (``python tutorials/execute.py 03_drugs_and_doses``);
``--jobs N`` runs N notebooks at once. Each kernel gets one torch thread unless ``OMP_NUM_THREADS`` is set:
kernels that share the cores each with torch's default of one thread per core slow each other down
many times over.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import jupytext
import nbclient
import nbformat

HERE = Path(__file__).resolve().parent
# A notebook at real settings trains for a few minutes on a CPU; leave room for a shared machine.
TIMEOUT = 3600


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# Paths of this machine that outputs can carry: a kernel's cell files (in warnings) and installed packages.
_MACHINE_PATHS = (
    (re.compile(r"/\S*/ipykernel_\d+/\d+\.py"), "<cell>"),
    (re.compile(r"/\S*/site-packages/"), ""),
)


def without_machine_paths(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook with this machine's paths taken out of its text outputs (a stored notebook is read elsewhere)."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                for pattern, replacement in _MACHINE_PATHS:
                    output["text"] = pattern.sub(replacement, output["text"])
    return notebook


def execute(source: Path) -> Path:
    """Execute the percent script ``source`` at real settings and write ``source.with_suffix(".ipynb")``."""
    notebook = jupytext.read(source)
    for i, cell in enumerate(notebook.cells):  # stable ids keep re-executed files diff-small
        cell["id"] = f"{source.stem[:2]}-{i:02d}"
    os.environ.pop("SCDOLORIS_TUTORIAL_FAST", None)
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # tqdm's note that ipywidgets is missing (its text bars are what a stored notebook can show anyway).
    os.environ.setdefault("PYTHONWARNINGS", "ignore:IProgress not found")
    start = time.perf_counter()
    # coalesce_streams: a progress bar's redraws become the one line a terminal shows.
    nbclient.NotebookClient(
        notebook,
        timeout=TIMEOUT,
        kernel_name="python3",
        coalesce_streams=True,
        resources={"metadata": {"path": str(HERE)}},
    ).execute()
    notebook.metadata["scdoloris"] = {
        "fast": False,
        "commit": _commit(),
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.perf_counter() - start),
    }
    notebook.metadata.pop("jupytext", None)
    without_machine_paths(notebook)
    target = source.with_suffix(".ipynb")
    nbformat.write(notebook, target)
    return target


def main() -> None:
    """Execute every tutorial source (or those named), ``--jobs`` at a time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stems", nargs="*", help="Notebook stems, e.g. 01_genetic_perturbations (default: all).")
    parser.add_argument("--jobs", type=int, default=1, help="Notebooks executed at once (default 1).")
    args = parser.parse_args()
    sources = sorted(p for p in HERE.glob("[0-9][0-9]_*.py") if not args.stems or p.stem in args.stems)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for target in pool.map(execute, sources):
            print(f"{target.name}: {nbformat.read(target, as_version=4).metadata['scdoloris']['seconds']} s")


if __name__ == "__main__":
    main()
