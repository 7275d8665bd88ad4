"""The Sphinx documentation builds without a single warning, offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"

# Where each namespace's ``__all__`` is listed in docs/api.md, as ``prefix.name``.
NAMESPACES = {
    "scdoloris.preprocessing": "pp",
    "scdoloris.metrics": "metrics",
    "scdoloris.baselines": "baselines",
    "scdoloris.benchmark": "benchmark",
    "scdoloris.datasets": "datasets",
    "scdoloris.plotting": "pl",
    "scdoloris.perturbation": "",
    "scdoloris.diffusion": "",
    "scdoloris.module": "",
    "scdoloris.prediction": "",
    "scdoloris.data": "data",
    "scdoloris.train": "train",
}


@pytest.mark.parametrize("module", sorted(NAMESPACES))
def test_api_reference_lists_every_public_name(module):
    """Every name in a subpackage's ``__all__`` has an entry in the API reference."""
    import importlib

    entries = {line.strip() for line in (DOCS / "api.md").read_text().splitlines()}
    prefix = NAMESPACES[module]
    missing = [
        name
        for name in importlib.import_module(module).__all__
        if (f"{prefix}.{name}" if prefix else name) not in entries
    ]
    assert not missing, f"docs/api.md lacks {module} names {missing}"


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    pytest.importorskip("sphinx_book_theme")

    env = dict(os.environ, SCDOLORIS_DOCS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
        "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html"),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout[-5000:]}\n{result.stderr[-20000:]}"
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "generated" / "scdoloris.Doloris.html").is_file()
