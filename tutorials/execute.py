"""Execute the tutorials at real settings and store them with their outputs: ``python tutorials/execute.py``.

The sources are the jupytext percent scripts ``tutorials/NN_*.py`` (edit those, review them as code);
this writes ``tutorials/NN_*.ipynb`` next to each, executed top to bottom in a fresh kernel without
``SCDOLORIS_TUTORIAL_FAST``, with the commit, date and run time in the notebook's metadata
(``metadata["scdoloris"]``). The docs render the stored notebooks; the test suite checks that they match
their sources and runs each source in fast mode.

Options: notebook stems to run only those (``python tutorials/execute.py 03_drugs_and_doses``).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
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


def _as_terminal_shows(text: str) -> str:
    """Progress bars redraw their line with carriage returns: keep what the last redraw shows."""
    return "\n".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line for line in text.split("\n"))


def execute(source: Path) -> Path:
    """Execute the percent script ``source`` at real settings and write ``source.with_suffix(".ipynb")``."""
    notebook = jupytext.read(source)
    for i, cell in enumerate(notebook.cells):  # stable ids keep re-executed files diff-small
        cell["id"] = f"{source.stem[:2]}-{i:02d}"
    os.environ.pop("SCDOLORIS_TUTORIAL_FAST", None)
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    start = time.perf_counter()
    nbclient.NotebookClient(
        notebook, timeout=TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    notebook.metadata["scdoloris"] = {
        "fast": False,
        "commit": _commit(),
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.perf_counter() - start),
    }
    notebook.metadata.pop("jupytext", None)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                output["text"] = _as_terminal_shows(output["text"])
    target = source.with_suffix(".ipynb")
    nbformat.write(notebook, target)
    return target


def main(stems: list[str]) -> None:
    """Execute every tutorial source (or those named by ``stems``)."""
    sources = sorted(p for p in HERE.glob("[0-9][0-9]_*.py") if not stems or p.stem in stems)
    for source in sources:
        target = execute(source)
        print(f"{target.name}: {nbformat.read(target, as_version=4).metadata['scdoloris']['seconds']} s")


if __name__ == "__main__":
    main(sys.argv[1:])
