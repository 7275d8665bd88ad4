import numpy as np
import pandas as pd
import pytest

from scdoloris.datasets._synthetic import synthetic_perturbations


@pytest.fixture(scope="module")
def adata():
    return synthetic_perturbations(seed=0)


def test_deterministic_given_seed(adata):
    again = synthetic_perturbations(seed=0)
    np.testing.assert_array_equal(adata.X, again.X)
    pd.testing.assert_frame_equal(adata.obs, again.obs)
    pd.testing.assert_frame_equal(adata.uns["synthetic"]["effects"], again.uns["synthetic"]["effects"])
    pd.testing.assert_frame_equal(adata.uns["synthetic"]["edges"], again.uns["synthetic"]["edges"])


def test_different_seed_differs(adata):
    other = synthetic_perturbations(seed=1)
    assert other.shape[1] == adata.shape[1]
    assert not np.array_equal(adata.X[:100], other.X[:100])
    assert not adata.uns["synthetic"]["edges"].equals(other.uns["synthetic"]["edges"])


def test_shapes_and_condition_counts(adata):
    n_unmeasured = 3  # round(12 / 4)
    n_conditions = 1 + 12 + n_unmeasured + 6
    assert adata.shape == (300 + (12 + n_unmeasured + 6) * 80, 60)
    assert list(adata.var_names[:3]) == ["G000", "G001", "G002"]
    counts = adata.obs["perturbation"].value_counts()
    assert len(counts) == n_conditions
    assert counts["control"] == 300
    assert (counts.drop("control") == 80).all()
    kinds = adata.obs["condition_type"].value_counts()
    assert kinds["control"] == 300
    assert kinds["single"] == (12 + n_unmeasured) * 80
    assert kinds["double"] == 6 * 80
    for col in ("perturbation", "cell_type", "condition_type"):
        assert isinstance(adata.obs[col].dtype, pd.CategoricalDtype)
    doubles = adata.obs.loc[adata.obs["condition_type"] == "double", "perturbation"].unique()
    for name in doubles:
        parts = name.split("+")
        assert len(parts) == 2 and parts == sorted(parts)
        assert set(parts) <= set(adata.uns["synthetic"]["effects"].index)


def test_values_look_log_normalised(adata):
    x = adata.X
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert x.min() >= 0.0
    assert 1.0 < x.max() < 8.0
    assert (x == 0).mean() > 0.2
    nonzero = x[x > 0]
    assert not np.allclose(nonzero, np.round(nonzero))


def test_unmeasured_perturbed_genes_in_graph(adata):
    truth = adata.uns["synthetic"]
    edges, effects = truth["edges"], truth["effects"]
    assert truth["seed"] == 0
    assert list(edges.columns) == ["source", "target", "weight"]
    unmeasured = [g for g in effects.index if g not in adata.var_names]
    assert unmeasured and all(g.startswith("U") for g in unmeasured)
    assert set(unmeasured) <= set(edges["source"]) and set(unmeasured) <= set(edges["target"])
    for g in unmeasured:
        targets = edges.loc[edges["source"] == g, "target"]
        assert len(targets) == 3 and targets.isin(adata.var_names).all()
        assert (adata.obs["perturbation"] == g).sum() == 80
    # Every edge appears in both directions.
    forward = set(zip(edges["source"], edges["target"], strict=True))
    assert forward == {(t, s) for s, t in forward}
    assert list(effects.columns) == list(adata.var_names)
    # Mean degree of measured genes is small (sparse graph).
    degree = edges.groupby("source").size()
    assert 2.5 < degree.mean() < 6


def test_effects_spread_along_graph(adata):
    effects = adata.uns["synthetic"]["effects"]
    edges = adata.uns["synthetic"]["edges"]
    assert effects.loc["G000", "G000"] == pytest.approx(-1.0)
    neighbours = edges.loc[edges["source"] == "G000", "target"]
    measured = [g for g in neighbours if g in effects.columns]
    assert (effects.loc["G000", measured].abs() > 0.2).all()
    # Sparse: far from every gene being affected.
    assert ((effects.abs() > 1e-12).mean(axis=1) < 0.95).all()


def test_copy_works(adata):
    copied = adata.copy()
    pd.testing.assert_frame_equal(copied.uns["synthetic"]["effects"], adata.uns["synthetic"]["effects"])


def test_shift_matches_ground_truth_and_doubles_are_additive():
    adata = synthetic_perturbations(dropout=0.0, n_cells_per_condition=200, n_control_cells=400, seed=3)
    effects = adata.uns["synthetic"]["effects"]
    pert = adata.obs["perturbation"]
    control = adata.X[(pert == "control").to_numpy()].mean(axis=0)
    singles = adata.obs.loc[adata.obs["condition_type"] == "single", "perturbation"].unique()
    for name in singles:
        shift = adata.X[(pert == name).to_numpy()].mean(axis=0) - control
        assert np.corrcoef(shift, effects.loc[name])[0, 1] > 0.75
    doubles = adata.obs.loc[adata.obs["condition_type"] == "double", "perturbation"].unique()
    assert len(doubles) == 6
    for name in doubles:
        a, b = name.split("+")
        shift = adata.X[(pert == name).to_numpy()].mean(axis=0) - control
        assert np.corrcoef(shift, effects.loc[a] + effects.loc[b])[0, 1] > 0.8


def test_multiple_cell_types():
    adata = synthetic_perturbations(n_genes=30, n_perturbed_genes=4, n_doubles=2, n_cell_types=3, seed=5)
    per_type = adata.obs.groupby("cell_type", observed=True)["perturbation"].value_counts().unstack()
    assert list(per_type.index) == ["ct0", "ct1", "ct2"]
    assert (per_type["control"] == 300).all()
    assert (per_type.drop(columns="control") == 80).all().all()
    ct = adata.obs["cell_type"].to_numpy()
    ctrl = (adata.obs["perturbation"] == "control").to_numpy()
    means = [adata.X[ctrl & (ct == f"ct{i}")].mean(axis=0) for i in range(3)]
    assert np.abs(means[0] - means[1]).mean() > 0.3


def test_fast_enough():
    import time

    start = time.perf_counter()
    synthetic_perturbations()
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "kwargs",
    [{"n_perturbed_genes": 0}, {"n_perturbed_genes": 100}, {"dropout": 1.0}, {"n_doubles": 10_000}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_perturbations(**kwargs)
