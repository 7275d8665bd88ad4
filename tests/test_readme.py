"""The README's code runs as written (at small settings: a few training steps and cells)."""

import os
import re
from pathlib import Path

import matplotlib
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# What makes the examples cheap; nothing else is changed.
SMALL = [
    (r"max_steps=\d+", "max_steps=3"),
    (r"model\.train\(\)", "model.train(max_steps=3)"),
    (r"n_cells=\d+", "n_cells=5"),
]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    import scanpy as sc

    monkeypatch.chdir(tmp_path)
    code = "import scanpy as sc\nimport scdoloris as sd\n" + _python_blocks()[index]
    for pattern, replacement in SMALL:
        code = re.sub(pattern, replacement, code)
    namespace: dict = {}
    autoshow, sc.settings.autoshow = sc.settings.autoshow, False
    try:
        exec(compile(code, f"README.md block {index}", "exec"), namespace)  # noqa: S102
    finally:
        sc.settings.autoshow = autoshow
    pred = namespace.get("pred")
    assert pred is not None and pred.n_obs > 0
    if "include_sources=True" in code:
        assert set(pred.obs["is_predicted"]) == {True, False}
    assert os.getcwd() == str(tmp_path)
