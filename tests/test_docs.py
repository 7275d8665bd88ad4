"""The Sphinx documentation builds without a single warning, offline."""

import os
import re
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


@pytest.mark.slow
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
    page = (tmp_path / "html" / "generated" / "scdoloris.Doloris.html").read_text()
    # Returns sections written as prose render as prose: no literal double backticks left over.
    assert "``" not in page
    assert "AnnData of predicted cells" in page
    # The model's verbs are documented on its page, whichever file of the model room defines them.
    for verb in ("train", "predict_perturbation", "get_latent_representation", "save", "load"):
        assert f'id="scdoloris.Doloris.{verb}"' in page, verb


def _conf() -> dict:
    """The names docs/conf.py defines (offline: no network check)."""
    import runpy

    os.environ.setdefault("SCDOLORIS_DOCS_OFFLINE", "1")
    return runpy.run_path(str(DOCS / "conf.py"))


def _public_callables():
    import importlib
    import inspect

    for module in ["scdoloris", *sorted(NAMESPACES)]:
        namespace = importlib.import_module(module)
        for name in getattr(namespace, "__all__", []):
            obj = getattr(namespace, name)
            yield f"{module}.{name}", obj
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if not member.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                        yield f"{module}.{name}.{member}", value


def _result_fields(rendered: str) -> list[str]:
    """The ``:returns:`` and ``:rtype:`` fields of napoleon's output, each with its continuation lines."""
    fields: list[str] = []
    for line in rendered.splitlines():
        if line.startswith((":returns:", ":rtype:")):
            fields.append(line)
        elif fields and fields[-1].startswith((":returns:", ":rtype:")) and line.startswith(" "):
            fields[-1] += "\n" + line
        elif line.strip():
            fields.append("")  # another field or text: the result fields ended
    return [field for field in fields if field]


def _garbled(field: str) -> bool:
    """Whether a rendered result field shows prose read as entries.

    That is: a bullet that is not a ``name (type) -- description`` entry (a line of a sentence), a
    literal inside bold or italics (its backticks shown), or prose as the return type.
    """
    bullets = re.findall(r"^(?::returns:)?\s*\* (.*)$", field, flags=re.MULTILINE)
    in_emphasis = re.search(r"\*\*[^*]*``[^*]*\*\*|(^|\s)\*[^*\s][^*]*``[^*]*\*", field)
    prose_type = field.startswith(":rtype:") and ("``" in field or len(field.split()) > 8)
    return any(" -- " not in bullet for bullet in bullets) or bool(in_emphasis) or prose_type


def test_returns_sections_render_as_written():
    """numpydoc reads each unindented line of Returns as ``name : type``: prose became one bullet per line
    with literal backticks in bold or italics. The docs' hook makes such prose one untyped paragraph."""
    import inspect

    pytest.importorskip("sphinx")
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import NumpyDocstring

    prose_returns = _conf()["prose_returns"]
    config = Config(napoleon_use_rtype=True, napoleon_use_param=True)
    import scdoloris as sd

    rendered = str(NumpyDocstring(prose_returns(inspect.getdoc(sd.Doloris.predict_perturbation).splitlines()), config))
    field = rendered[rendered.index(":returns:") :].split("\n\n")[0]
    assert field.startswith(":returns: AnnData of predicted cells (``None`` in place): ``X`` on the input scale,")
    assert not re.search(r"^\s*(:returns:\s*)?\* ", field, flags=re.MULTILINE), field  # no bullets
    assert "**" not in field and ":rtype:" not in field  # no bold name; the type comes from the annotation
    checked = 0
    for name, obj in _public_callables():
        doc = inspect.getdoc(obj)
        if not doc or "\nReturns\n-------" not in doc:
            continue
        rendered = str(NumpyDocstring(prose_returns(doc.splitlines()), config))
        for field in _result_fields(rendered):
            assert not _garbled(field), (name, field)
        checked += 1
    assert checked > 30


def test_prose_returns_leaves_typed_entries_alone():
    prose_returns = _conf()["prose_returns"]
    typed = ["Sum.", "", "Returns", "-------", "float", "    The sum.", "", "Examples", "--------", ">>> 1"]
    assert prose_returns(typed) == typed
    prose = ["Sum.", "", "Returns", "-------", "The ``sum``;", "else None.", "", "Examples", "--------", ">>> 1"]
    assert prose_returns(prose) == [
        "Sum.", "", "Returns", "-------", ":", "    The ``sum``;", "    else None.", "", "Examples", "--------", ">>> 1"
    ]  # fmt: skip


def test_index_example_holds_out_what_it_predicts(tmp_path, monkeypatch):
    """The landing page's example runs (at small settings) and predicts only perturbations it never trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    (code,) = re.findall(r"```python\n(.*?)```", (DOCS / "index.md").read_text(), flags=re.DOTALL)
    for pattern, replacement in [(r"max_steps=\d+", "max_steps=3"), (r"n_cells=\d+", "n_cells=5")]:
        code = re.sub(pattern, replacement, code)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    autoshow, sc.settings.autoshow = sc.settings.autoshow, False
    try:
        exec(compile(code, "docs/index.md", "exec"), namespace)  # noqa: S102
    finally:
        sc.settings.autoshow = autoshow
    pred, model = namespace["pred"], namespace["model"]
    predicted = set(pred.obs.loc[pred.obs["is_predicted"].to_numpy(), "perturbation"].astype(str))
    trained = set(model.adata.obs["perturbation"].astype(str))
    assert predicted == {"KLF1+MAP2K6", "CBL+CNN1"} and not predicted & trained
