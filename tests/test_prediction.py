"""predict_perturbation's contract (DESIGN section 1): schema, scale, sources, latents, masks, in place, determinism."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi

import scdoloris as sd

N_STEPS = 10  # DDIM steps where the number does not matter


def _controls(model):
    """A copy of some of the model's control cells (both cell types)."""
    train = model.adata
    rows = np.flatnonzero((train.obs["perturbation"] == "control").to_numpy())[::10]
    return train[rows].copy()


# ---------------------------------------------------------------------------------------- output schema
@pytest.fixture(scope="module")
def prediction(trained_model, held_out_doubles, predict):
    perturbations = held_out_doubles[:2] + ["G001"]
    return perturbations, predict(trained_model, perturbations, n_cells=15)


def test_prediction_schema(trained_model, prediction):
    perturbations, pred = prediction
    n_genes = trained_model.adata.n_vars
    cell_types = trained_model.cell_types
    assert cell_types == ["ct0", "ct1"]
    assert isinstance(pred, ad.AnnData)
    assert pred.shape == (len(perturbations) * len(cell_types) * 15, n_genes)
    assert isinstance(pred.X, np.ndarray) and pred.X.dtype == np.float32
    assert list(pred.var_names) == list(trained_model.adata.var_names)
    assert pred.obs_names.is_unique

    continuous = pred.layers["doloris_continuous"]
    mask = pred.layers["doloris_mask"]
    latent = pred.obsm["doloris_latent"]
    probs = pred.obsm["doloris_activation_prob"]
    assert continuous.shape == mask.shape == probs.shape == pred.shape
    assert latent.shape[0] == pred.n_obs and latent.ndim == 2
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.mean() < 1
    assert ((probs >= 0) & (probs <= 1)).all()
    # Eq. 17: the generated cells (X itself under preset='paper'; the default anchors X, see test_anchored.py).
    np.testing.assert_array_equal(pred.layers["doloris_generated"], mask * continuous)
    for values in (pred.X, continuous, latent, probs):
        assert np.isfinite(values).all()
    assert (pred.X >= 0).all()

    obs = pred.obs
    assert {"perturbation", "cell_type", "dose", "control_cell", "is_predicted"} <= set(obs.columns)
    assert obs["is_predicted"].dtype == bool and obs["is_predicted"].all()
    counts = obs.groupby(["perturbation", "cell_type"], observed=True).size()
    assert len(counts) == len(perturbations) * len(cell_types) and (counts == 15).all()
    assert set(obs["perturbation"].astype(str)) == set(perturbations)
    assert set(obs["cell_type"].astype(str)) == set(cell_types)


def test_prediction_is_on_input_scale(trained_model, prediction):
    """X is log1p expression like the input, not the model's internal [0, 1] scale."""
    _, pred = prediction
    train = trained_model.adata
    x_max = float(np.max(train.X))
    assert trained_model.summary_["x_max"] == pytest.approx(x_max)
    expressed = pred.X[pred.layers["doloris_mask"] == 1]
    real = np.asarray(train.X)[np.asarray(train.X) > 0]
    assert 0.5 < np.median(expressed) / np.median(real) < 2.0
    assert pred.X.max() < 3 * x_max


def test_prediction_control_cells(trained_model, prediction):
    _, pred = prediction
    train = trained_model.adata
    sources = pred.obs["control_cell"].astype(str)
    assert sources.isin(train.obs_names).all()
    assert (train.obs.loc[sources, "perturbation"] == "control").all()
    np.testing.assert_array_equal(train.obs.loc[sources, "cell_type"].astype(str), pred.obs["cell_type"].astype(str))


def test_latent_shared_across_perturbations(prediction):
    """A control cell is inverted once; every perturbation starts from the same latent (paper A.4)."""
    perturbations, pred = prediction
    latent = pd.DataFrame(pred.obsm["doloris_latent"], index=pred.obs_names)
    first = pred.obs["perturbation"] == perturbations[0]
    for p in perturbations[1:]:
        other = pred.obs["perturbation"] == p
        np.testing.assert_array_equal(pred.obs.loc[first, "control_cell"], pred.obs.loc[other, "control_cell"])
        np.testing.assert_array_equal(latent[first.to_numpy()].to_numpy(), latent[other.to_numpy()].to_numpy())
    # ... and a different perturbation gives a different cell from the same latent.
    a = pred.layers["doloris_continuous"][first.to_numpy()]
    b = pred.layers["doloris_continuous"][(pred.obs["perturbation"] == perturbations[1]).to_numpy()]
    assert np.abs(a - b).mean() > 1e-4


def test_prediction_does_not_depend_on_batching(trained_model, held_out_doubles, predict):
    p = held_out_doubles[0]
    alone = predict(trained_model, [p], cell_type="ct0")
    together = predict(trained_model, [p, "G002", "G003"], cell_type="ct0")
    small_batches = predict(trained_model, [p, "G002"], cell_type="ct0", batch_size=5)
    rows = (together.obs["perturbation"] == p).to_numpy()
    np.testing.assert_array_equal(alone.obs["control_cell"], together.obs["control_cell"][rows])
    np.testing.assert_allclose(alone.obsm["doloris_latent"], together.obsm["doloris_latent"][rows], atol=1e-5)
    np.testing.assert_allclose(
        alone.layers["doloris_continuous"], together.layers["doloris_continuous"][rows], atol=1e-4
    )
    rows = (small_batches.obs["perturbation"] == p).to_numpy()
    np.testing.assert_allclose(
        alone.layers["doloris_continuous"], small_batches.layers["doloris_continuous"][rows], atol=1e-4
    )


def test_matched_masks_are_near_training_patterns_at_predicted_frequencies(trained_model, held_out_doubles, predict):
    kwargs = {"cell_type": "ct0", "n_cells": 300}
    pred = predict(trained_model, held_out_doubles[:1], mask_strategy="matched", **kwargs)
    bernoulli = predict(trained_model, held_out_doubles[:1], mask_strategy="bernoulli", **kwargs)
    probs = pred.obsm["doloris_activation_prob"]
    free = (probs > 0.05) & (probs < 0.95)
    train = trained_model.adata
    patterns = np.asarray(train.X)[(train.obs["cell_type"] == "ct0").to_numpy()] != 0

    def distance_to_nearest_training_cell(prediction):
        mask = prediction.layers["doloris_mask"].astype(bool)
        differ = (mask[:, None, :] != patterns[None, :, :]) & free[:, None, :]
        return np.median(differ.sum(axis=2).min(axis=1))

    # Masks are (close to) real cells' patterns, unlike independent draws ...
    assert distance_to_nearest_training_cell(pred) < 0.5 * distance_to_nearest_training_cell(bernoulli)
    # ... at the frequencies the mask model predicts (sampling noise with 300 cells is about 0.03).
    genes = free.all(axis=0)
    assert genes.sum() > 10
    mask = pred.layers["doloris_mask"]
    assert np.abs(mask[:, genes].mean(0) - probs[:, genes].mean(0)).mean() < 0.04


def test_cell_type_selection(trained_model, predict):
    pred = predict(trained_model, ["G001"], cell_type="ct1", n_cells=7)
    assert pred.n_obs == 7 and (pred.obs["cell_type"] == "ct1").all()
    train = trained_model.adata
    assert (train.obs.loc[pred.obs["control_cell"].astype(str), "cell_type"] == "ct1").all()
    pred = predict(trained_model, "G001", cell_type=["ct1", "ct0"], n_cells=3)  # a plain string works too
    assert pred.n_obs == 6


# ---------------------------------------------------------------------------------------- perturbations
def test_double_with_unmeasured_gene(trained_model, synthetic_two_types, held_out_gene, predict):
    trained_unmeasured = sorted(g for g in trained_model.summary_["graph"]["nodes"] if g.startswith("U"))
    assert trained_unmeasured == ["U000"]  # a graph node, though not a measured gene
    assert "U000" not in trained_model.adata.var_names
    # U000 was trained as a single; the held-out gene was never seen, only the prior links it.
    assert held_out_gene not in trained_model.summary_["graph"]["nodes"]
    assert held_out_gene not in trained_model.summary_["categories"]
    perturbations = ["G000+U000", f"G001+{held_out_gene}", held_out_gene]
    pred = predict(trained_model, perturbations, cell_type="ct0")
    assert pred.n_obs == 3 * 12
    assert np.isfinite(pred.X).all() and (pred.X >= 0).all()
    assert list(pred.obs["perturbation"].cat.categories) == perturbations


def test_unknown_gene_raises(trained_model, predict):
    with pytest.raises(ValueError, match="NOTAGENE"):
        predict(trained_model, ["G000+NOTAGENE"])
    with pytest.raises(ValueError, match="NOTAGENE"):
        predict(trained_model, ["G001", "NOTAGENE"])


def test_control_is_not_a_perturbation(trained_model, predict):
    with pytest.raises(ValueError, match="control"):
        predict(trained_model, ["control"])


def test_unseen_cell_type_raises(trained_model, predict):
    with pytest.raises(ValueError, match="ct9"):
        predict(trained_model, ["G001"], cell_type="ct9")


def test_bad_n_cells_raises(trained_model, predict):
    with pytest.raises(ValueError):
        predict(trained_model, ["G001"], n_cells=0)


# ---------------------------------------------------------------------------------------- in place
def test_inplace_writes_counterfactuals(trained_model, held_out_doubles):
    p = held_out_doubles[0]
    controls = _controls(trained_model)
    X_before = controls.X.copy()
    obs_before = controls.obs.copy()
    result = trained_model.predict_perturbation([p], adata=controls, inplace=True, n_steps=N_STEPS, seed=0)
    assert result is None
    np.testing.assert_array_equal(controls.X, X_before)
    pd.testing.assert_frame_equal(controls.obs, obs_before)
    for key in (f"doloris_{p}", f"doloris_{p}_continuous", f"doloris_{p}_mask"):
        assert controls.layers[key].shape == controls.shape
    assert controls.obsm[f"doloris_{p}_activation_prob"].shape == controls.shape
    assert controls.obsm["doloris_latent"].shape[0] == controls.n_obs
    np.testing.assert_array_equal(  # Eq. 17: the generated cells (the default anchors the prediction itself)
        controls.layers[f"doloris_{p}_generated"],
        controls.layers[f"doloris_{p}_mask"] * controls.layers[f"doloris_{p}_continuous"],
    )
    # The same counterfactuals as an AnnData: one per given control cell, in order.
    pred = trained_model.predict_perturbation([p], adata=controls, n_steps=N_STEPS, seed=0)
    assert list(pred.obs["control_cell"]) == list(controls.obs_names)
    np.testing.assert_allclose(pred.X, controls.layers[f"doloris_{p}"], atol=1e-5)
    np.testing.assert_array_equal(pred.obs["cell_type"].astype(str), controls.obs["cell_type"].astype(str))

    # No silent overwrite.
    with pytest.raises(ValueError, match="overwrite"):
        trained_model.predict_perturbation([p], adata=controls, inplace=True, n_steps=N_STEPS, seed=0)
    with pytest.raises(ValueError):
        trained_model.predict_perturbation(["G001"], adata=controls, inplace=True, n_steps=N_STEPS)  # latent taken
    np.testing.assert_array_equal(controls.X, X_before)
    # Unless asked; a new seed then replaces the values.
    before = controls.layers[f"doloris_{p}_mask"].copy()
    trained_model.predict_perturbation([p], adata=controls, inplace=True, overwrite=True, n_steps=N_STEPS, seed=3)
    assert not np.array_equal(controls.layers[f"doloris_{p}_mask"], before)
    np.testing.assert_array_equal(controls.X, X_before)
    # Another prefix is free.
    trained_model.predict_perturbation(["G001"], adata=controls, inplace=True, key_added="other", n_steps=N_STEPS)
    assert "other_G001" in controls.layers and "other_latent" in controls.obsm


def test_inplace_without_adata_raises(trained_model):
    with pytest.raises(ValueError):
        trained_model.predict_perturbation(["G001"], inplace=True, n_steps=N_STEPS)


def test_adata_with_other_genes_raises(trained_model):
    controls = _controls(trained_model)
    with pytest.raises(ValueError):
        trained_model.predict_perturbation(["G001"], adata=controls[:, ::-1].copy(), n_steps=N_STEPS)
    with pytest.raises(ValueError):
        trained_model.predict_perturbation(["G001"], adata=controls[:, 1:].copy(), n_steps=N_STEPS)


# ---------------------------------------------------------------------------------------- determinism
def test_same_seed_same_prediction(trained_model, held_out_doubles, predict):
    a = predict(trained_model, held_out_doubles[:2], seed=11)
    b = predict(trained_model, held_out_doubles[:2], seed=11)
    c = predict(trained_model, held_out_doubles[:2], seed=12)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.layers["doloris_mask"], b.layers["doloris_mask"])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert not np.array_equal(a.X, c.X)
    assert list(a.obs["control_cell"]) != list(c.obs["control_cell"])


def test_default_seed_comes_from_scvi_settings(trained_model, monkeypatch, predict):
    monkeypatch.setattr(scvi.settings, "seed", 5)
    a = predict(trained_model, ["G001"], seed=None)
    b = predict(trained_model, ["G001"], seed=5)
    np.testing.assert_array_equal(a.X, b.X)


# ---------------------------------------------------------------------------------- latents and sources
def test_latent_representation_is_the_bridges_starting_point(trained_model):
    """get_latent_representation gives the latents prediction inverts to, for given rows or cells."""
    controls = trained_model.adata[trained_model.adata.obs["perturbation"] == "control"].copy()[:7]
    latent = trained_model.get_latent_representation(controls, n_steps=5)
    assert latent.shape == (7, trained_model.adata.n_vars) and latent.dtype == np.float32
    pred = trained_model.predict_perturbation(["G000"], adata=controls, n_steps=5, seed=0)
    np.testing.assert_allclose(pred.obsm["doloris_latent"], latent, rtol=1e-5, atol=1e-5)
    rows = trained_model.get_latent_representation(indices=[3, 0], n_steps=5)
    full = trained_model.get_latent_representation(trained_model.adata[[3, 0]].copy(), n_steps=5)
    np.testing.assert_allclose(rows, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_steps"):
        trained_model.get_latent_representation(n_steps=0)


def test_predictions_with_their_sources(trained_model):
    """include_sources: one AnnData, sources first as controls, ready for one scanpy plot."""
    kwargs = {"n_cells": 6, "n_steps": 5, "seed": 0, "cell_type": "ct0"}
    alone = trained_model.predict_perturbation(["G000", "G001"], **kwargs)
    both = trained_model.predict_perturbation(["G000", "G001"], include_sources=True, **kwargs)
    assert both.n_obs == 18 and both.obs_names.is_unique
    assert list(both.obs["perturbation"].cat.categories) == ["control", "G000", "G001"]
    assert both.obs["is_predicted"].tolist() == [False] * 6 + [True] * 12
    np.testing.assert_array_equal(both.X[6:], alone.X)
    sources = trained_model.adata[both.obs["control_cell"][:6].to_numpy()].X
    np.testing.assert_allclose(both.X[:6], np.asarray(sources.todense() if hasattr(sources, "todense") else sources))
    assert (both.obs["control_cell"][6:12].to_numpy() == both.obs["control_cell"][:6].to_numpy()).all()
    shifted = sd.baselines.MeanShift().fit(trained_model.adata, cell_type_key="cell_type")
    pred = shifted.predict(["G000"], include_sources=True, **{k: v for k, v in kwargs.items() if k != "n_steps"})
    assert pred.obs["is_predicted"].sum() == 6 and pred.n_obs == 12
    with pytest.raises(ValueError, match="include_sources"):
        trained_model.predict_perturbation(["G000"], adata=alone, inplace=True, include_sources=True)
