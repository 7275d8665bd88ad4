"""First contact: what a first user runs (the README's own calls) against what it promises.

The source cells of include_sources=True carry every array of the predictions, a layer can be compared with real
cells, asking for more cells than there are controls says so, and a notebook's thread choice holds.
"""

import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from anndata import AnnData

import scdoloris as sd


def _first_contact_data() -> AnnData:
    """Tiny synthetic data: 2 cell types of 30 controls each, 4 singles and 1 double (20 cells each)."""
    return sd.datasets.synthetic_perturbations(
        n_genes=20, n_perturbed_genes=4, n_doubles=1, n_cells_per_condition=20, n_control_cells=30, n_cell_types=2
    )


@pytest.fixture(scope="module", params=["anchored", "paper"])
def first_contact_model(request, train_kwargs, training_subset):
    """A Doloris of each preset trained 2 steps on the controls and singles (the double held out)."""
    adata = _first_contact_data()
    train = training_subset(adata)
    model = sd.Doloris(train, gene_graph=None, preset=request.param, n_hidden=16, n_hidden_mask=16, n_perturbation=8)
    model.train(max_steps=2, seed=0, **train_kwargs)
    double = next(p for p in adata.obs["perturbation"].astype(str).unique() if "+" in p)
    return model, adata, double


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def test_first_contact_sources_have_every_layer_and_obsm(first_contact_model, tmp_path):
    """include_sources=True: the sources have a row in every layer and obsm the predictions have."""
    model, _, double = first_contact_model
    kwargs = {"n_cells": 6, "n_steps": 2, "seed": 0}
    plain = model.predict_perturbation(["G001", double], **kwargs)
    pred = model.predict_perturbation(["G001", double], include_sources=True, **kwargs)
    n_sources = 6 * len(model.cell_types)
    is_source = ~pred.obs["is_predicted"].to_numpy()
    assert is_source[:n_sources].all() and not is_source[n_sources:].any()
    assert set(pred.layers) == set(plain.layers) and set(pred.obsm) == set(plain.obsm)
    generated = {"doloris_generated"} if model.preset == "anchored" else set()  # the paper's cells, anchored
    expected_layers = {"doloris_continuous", "doloris_mask"} | generated
    assert set(plain.layers) == expected_layers
    assert set(plain.obsm) == {"doloris_latent", "doloris_activation_prob"}

    # The predictions are those of include_sources=False.
    np.testing.assert_array_equal(pred.X[~is_source], plain.X)
    for slot in ("layers", "obsm"):
        for key, value in getattr(plain, slot).items():
            np.testing.assert_array_equal(getattr(pred, slot)[key][~is_source], value, err_msg=key)

    # A source cell is its own unperturbed outcome: its expression, its nonzero genes as mask, its latent.
    own = _dense(model.adata[pred.obs["control_cell"][is_source].to_numpy()].X)
    np.testing.assert_allclose(pred.X[is_source], own)
    for key in plain.layers:
        expected = (own != 0).astype(np.float32) if key == "doloris_mask" else own
        np.testing.assert_allclose(pred.layers[key][is_source], expected, err_msg=key)
    latent = pred.obsm["doloris_latent"]
    np.testing.assert_array_equal(latent[is_source], latent[n_sources : 2 * n_sources])  # what G001 started from
    # Activation probabilities belong to a perturbation: none for the sources.
    probabilities = pred.obsm["doloris_activation_prob"]
    assert np.isnan(probabilities[is_source]).all() and np.isfinite(probabilities[~is_source]).all()
    pred.write_h5ad(tmp_path / "pred.h5ad")  # NaN and all: it is written as it is
    assert set(ad.read_h5ad(tmp_path / "pred.h5ad").layers) == expected_layers


def test_first_contact_violins_of_a_layer_against_real_cells(first_contact_model):
    """The paper's cells (a layer of the prediction) are drawn against real cells, which have no such layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, adata, double = first_contact_model
    pred = model.predict_perturbation(double, n_cells=6, n_steps=2, seed=0, include_sources=True)
    layer = "doloris_generated" if model.preset == "anchored" else "doloris_continuous"
    real = adata[(adata.obs["perturbation"] == double).to_numpy()]
    control = model.adata[(model.adata.obs["perturbation"] == "control").to_numpy()]
    try:
        # One perturbation besides the sources' control label: no perturbation= needed.
        ax = sd.pl.de_gene_violins(pred, real, control=control, n_genes=4, layer=layer, show=False)
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == [
            f"control ({control.n_obs} cells, X)",
            f"real ({real.n_obs} cells, X)",
            f"predicted ({6 * len(model.cell_types)} cells)",  # the sources are not predictions
        ]
        assert ax.get_ylabel() == f"expression ({layer})"
    finally:
        plt.close("all")


def test_first_contact_more_cells_than_controls_warns(first_contact_model):
    """n_cells beyond a cell type's controls repeats cells: Doloris and the baselines say so, at the user's line."""
    model, _, _ = first_contact_model
    obs = model.adata.obs
    n = int(((obs["perturbation"] == "control") & (obs["cell_type"] == "ct1")).sum())
    message = rf"n_cells={n + 1} is more than the {n} control cells of cell type 'ct1'"
    with pytest.warns(UserWarning, match=message) as caught:
        pred = model.predict_perturbation("G001", cell_type="ct1", n_cells=n + 1, n_steps=2, seed=0)
    (warned,) = [w for w in caught if "n_cells=" in str(w.message)]
    distinct = pred.obs["control_cell"].nunique()
    assert distinct < n + 1 and f"({distinct} distinct of {n + 1})" in str(warned.message)
    assert warned.filename == __file__  # points at the call, not inside the package
    keys = {"perturbation_key": "perturbation", "control_value": "control", "cell_type_key": "cell_type"}
    for baseline in (sd.baselines.MeanShift(), sd.baselines.Anchor()):
        fitted = baseline.fit(model.adata, **keys)
        with pytest.warns(UserWarning, match=message) as caught:
            shifted = fitted.predict("G001", cell_type="ct1", n_cells=n + 1, seed=0)
        assert [w.filename for w in caught if "n_cells=" in str(w.message)] == [__file__]
        assert list(shifted.obs["control_cell"]) == list(pred.obs["control_cell"])  # the same draw
    # As many cells as controls: every control once, no warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="n_cells=")
        pred = model.predict_perturbation("G001", cell_type="ct1", n_cells=n, n_steps=2, seed=0)
        sd.baselines.MeanShift().fit(model.adata, **keys).predict("G001", cell_type="ct1", n_cells=n, seed=0)
    assert pred.obs["control_cell"].nunique() == n


def test_first_contact_a_notebooks_thread_choice_holds_through_training(monkeypatch, train_kwargs, training_subset):
    """The README's torch.set_num_threads(1) is not undone by training (Lightning resets threads only in
    multi-process launches, and only without OMP_NUM_THREADS)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    adata = training_subset(_first_contact_data())
    model = sd.Doloris(adata, gene_graph=None, n_hidden=16, n_hidden_mask=16, n_perturbation=8)
    try:
        torch.set_num_threads(1)
        model.train(max_steps=2, seed=0, **train_kwargs)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
