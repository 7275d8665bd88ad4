"""Sphinx configuration of the scdoloris documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html``. The build works offline:
intersphinx links to other projects' docs are only made when their sites can be reached (or never,
with ``SCDOLORIS_DOCS_OFFLINE=1``). Notebooks from ``tutorials/`` are copied into
``docs/tutorials/`` at build time and rendered as they are stored: executed at real settings by
``python tutorials/execute.py`` (never executed here; the test suite runs their sources in fast mode).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from datetime import date
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))  # a source checkout builds without installing the package

# -- Project -----------------------------------------------------------------------------------

project = "scdoloris"
author = "scdoloris developers"
copyright = f"{date.today().year}, {author}"  # noqa: A001
try:
    release = _version("scdoloris")
except PackageNotFoundError:  # pragma: no cover - docs of an uninstalled source tree
    release = "0.1.0"
version = release

# ``sd.pp`` and ``sd.pl`` are attributes of the package (``from . import preprocessing as pp``), not
# importable modules; autodoc imports ``scdoloris.pp``, so register the two names for the build.
import scdoloris  # noqa: E402

for _alias in ("pp", "pl"):
    sys.modules.setdefault(f"scdoloris.{_alias}", getattr(scdoloris, _alias))

# -- Extensions --------------------------------------------------------------------------------

extensions = [
    "myst_nb",  # MyST markdown pages and Jupyter notebooks (also enables myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpy docstrings
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"

# -- API reference -----------------------------------------------------------------------------

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"show-inheritance": False}


def _mixin_methods() -> dict[str, list[str]]:
    """Per class, the public methods it takes from its own ``*Mixin`` bases (Doloris' verbs live there).

    The class template lists a class's own methods and drops inherited ones (scvi-tools' base
    class has dozens); a model verb moved into a mixin file of the model is still the model's own.
    """
    import scdoloris

    out = {}
    for cls in (scdoloris.Doloris,):
        mixins = [base for base in cls.__mro__ if base.__name__.endswith("Mixin")]
        names = {name for base in mixins for name in vars(base) if not name.startswith("_")}
        out[f"scdoloris.{cls.__name__}"] = sorted(names)  # as docs/api.md names it
    return out


autosummary_context = {"mixin_methods": _mixin_methods()}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_custom_sections = [("Params", "params_style")]

# -- MyST / notebooks --------------------------------------------------------------------------

myst_enable_extensions = ["amsmath", "colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tutorials are rendered as stored; tests/ executes them
nb_merge_streams = True

# -- HTML --------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "scdoloris"
html_static_path: list[str] = []
html_theme_options = {"show_toc_level": 2}

# -- Intersphinx, only when the network is there -------------------------------------------------

_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "pandas": ("https://pandas.pydata.org/docs/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "mudata": ("https://mudata.readthedocs.io/en/latest/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "matplotlib": ("https://matplotlib.org/stable/", None),
}


def _online(host: str = "docs.python.org", timeout: float = 2.0) -> bool:
    """Whether the intersphinx inventories can be fetched (a quick TCP connection)."""
    if os.environ.get("SCDOLORIS_DOCS_OFFLINE", "").strip().lower() in {"1", "true", "yes"}:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


intersphinx_mapping = _INTERSPHINX if _online() else {}
intersphinx_timeout = 10

# -- Tutorials: copy tutorials/*.ipynb into docs/tutorials/ --------------------------------------

_TUTORIALS_SRC = ROOT / "tutorials"
_TUTORIALS_DST = HERE / "tutorials"
_TUTORIAL_ASSETS = (".ipynb", ".png", ".svg", ".jpg", ".jpeg", ".gif")


def _sync_tutorials() -> list[str]:
    """Mirror the notebooks (and their images) of ``tutorials/`` into ``docs/tutorials/``.

    Files are only rewritten when they changed, so incremental builds stay incremental; copies of
    notebooks removed from ``tutorials/`` are deleted. Returns the notebook names.
    """
    _TUTORIALS_DST.mkdir(exist_ok=True)
    wanted = {}
    if _TUTORIALS_SRC.is_dir():
        for path in sorted(_TUTORIALS_SRC.iterdir()):
            if path.is_file() and path.suffix.lower() in _TUTORIAL_ASSETS:
                wanted[path.name] = path
    for stale in _TUTORIALS_DST.iterdir():
        if stale.is_file() and stale.suffix.lower() in _TUTORIAL_ASSETS and stale.name not in wanted:
            stale.unlink()
    for name, src in wanted.items():
        dst = _TUTORIALS_DST / name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
    return [name for name in wanted if name.endswith(".ipynb")]


_notebooks = _sync_tutorials()

_NO_TUTORIALS = "No tutorial notebooks are in this build (the `tutorials/` folder is empty)."


def _drop_empty_tutorial_glob(app, docname: str, source: list[str]) -> None:
    """Without notebooks, replace the glob toctree of ``tutorials/index`` by a sentence.

    Sphinx warns about a glob that matches nothing, and that warning cannot be suppressed by type.
    """
    if docname != "tutorials/index" or _notebooks:
        return
    text = source[0]
    start = text.find("```{toctree}")
    end = text.find("```", start + len("```{toctree}"))
    if start >= 0 and end >= 0:
        source[0] = text[:start] + _NO_TUTORIALS + text[end + 3 :]


# -- Returns sections written as prose ------------------------------------------------------------

_RESULT_SECTIONS = ("Returns", "Yields")


def _section_end(lines: list[str], start: int) -> int:
    """Index of the first line after the numpy section whose body starts at ``start``."""
    for i in range(start, len(lines) - 1):
        underline = lines[i + 1].strip()
        if lines[i].strip() and underline and set(underline) == {"-"} and not lines[i].startswith(" "):
            return i
    return len(lines)


def prose_returns(lines: list[str]) -> list[str]:
    """Make a numpy Returns (Yields) section written as prose into one untyped entry.

    numpydoc reads every unindented line of the section as a new ``name : type`` entry: a sentence
    split over lines becomes one bullet per line, its first words set in bold or italics (where
    ``literals`` show their backticks). A section with no indented line (no ``type`` line followed by
    its description) is prose: it becomes ``":"`` (an entry without name or type) followed by the prose
    indented, which napoleon renders as one paragraph; autodoc adds the annotated return type.
    """
    lines = list(lines)
    i = 0
    while i < len(lines) - 1:
        underline = lines[i + 1].strip()
        if lines[i].strip() in _RESULT_SECTIONS and underline and set(underline) == {"-"}:
            start, end = i + 2, _section_end(lines, i + 2)
            body = lines[start:end]
            text = [line for line in body if line.strip()]
            if text and not any(line.startswith((" ", "\t")) for line in text):
                while body and not body[-1].strip():  # keep the blank lines before the next section
                    body.pop()
                rewritten = [":"] + ["    " + line if line.strip() else "" for line in body]
                lines[start : start + len(body)] = rewritten
                end += len(rewritten) - len(body)
            i = end
        else:
            i += 1
    return lines


def _prose_returns(app, what, name, obj, options, lines: list[str]) -> None:
    """``autodoc-process-docstring`` hook, before napoleon's: see :func:`prose_returns`."""
    lines[:] = prose_returns(lines)


def setup(app):  # noqa: D103
    app.connect("source-read", _drop_empty_tutorial_glob)
    # Napoleon connects at the default priority (500); a lower number runs first.
    app.connect("autodoc-process-docstring", _prose_returns, priority=400)
