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


def test_readme_asks_for_no_more_cells_than_there_are_controls():
    """An n_cells above a cell type's controls repeats source cells: the README's calls stay within them."""
    import scdoloris as sd

    counts = []
    for adata in (sd.datasets.norman2019_subset(k562_only=True), sd.datasets.synthetic_drug_perturbations()):
        controls = adata.obs[(adata.obs["perturbation"] == "control").to_numpy()]
        counts += controls["cell_type"].value_counts().tolist()
    asked = [int(n) for n in re.findall(r"n_cells=(\d+)", README.read_text())]
    assert asked and max(asked) <= min(counts) == 100, (asked, counts)


def test_readme_use_block_chooses_torch_threads():
    """Pasted into a notebook on a shared CPU, the Use block gives torch one thread, as the demo chooses its own."""
    use = _python_blocks()[0]
    assert "torch.set_num_threads(1)" in use
    assert use.index("torch.set_num_threads(1)") < use.index(".train(")  # before any training


def test_readme_says_what_the_demo_prints():
    """The README names the methods whose EMD the demo prints, and no other."""
    import inspect

    from scdoloris import cli

    printed = set(re.findall(r'"emd_(\w+)"', inspect.getsource(cli._demo)))
    assert printed == {"doloris", "anchor"}  # if this changes, so must the README's sentence
    zeros = set(re.findall(r'"zeros_(\w+)"', inspect.getsource(cli._demo)))
    assert zeros == {"doloris", "anchor", "real"}
    text = " ".join(README.read_text().split())
    assert "the EMD of Doloris and the Anchor only, their zero fractions and the real cells'" in text
