"""Export of predictions in cell-eval's layout, and scoring with cell-eval when it is installed."""

import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scdoloris as sd
from scdoloris.benchmark._celleval import score_cell_eval, to_cell_eval


@pytest.fixture(scope="module")
def data():
    """Strong effects and little dropout: every perturbation has significant DE genes."""
    adata = sd.datasets.synthetic_perturbations(
        n_genes=40,
        n_perturbed_genes=6,
        n_doubles=2,
        n_cells_per_condition=60,
        n_control_cells=150,
        effect_size=2.0,
        dropout=0.1,
        seed=0,
    )
    is_control = (adata.obs["perturbation"] == "control").to_numpy()
    return adata[~is_control].copy(), adata[is_control].copy()


@pytest.fixture(scope="module")
def prediction(data):
    real, control = data
    fitted = sd.baselines.MeanShift().fit(ad.concat([real, control]), cell_type_key="cell_type")
    return fitted.predict(["G001", "G000+G003", "U000"], n_cells=20)


# ------------------------------------------------------------------ the layout (no cell-eval needed)
def test_layout(data, prediction):
    real, control = data
    genes = list(prediction.var_names)
    # Real and control with their genes in another order, and one more gene: reordered and dropped.
    real_shuffled = real[:, genes[::-1]].copy()
    extra = ad.AnnData(np.ones((real.n_obs, 1), dtype=np.float32), obs=real.obs, var=pd.DataFrame(index=["EXTRA"]))
    real_shuffled = ad.concat([real_shuffled, extra], axis=1, merge="first")
    control_shuffled = control[:, np.random.default_rng(0).permutation(genes)].copy()
    pred_ce, real_ce = to_cell_eval(prediction, real_shuffled, control_shuffled)

    for out in (pred_ce, real_ce):
        assert list(out.var_names) == genes and list(out.var.columns) == []
        assert out.X.dtype == np.float32 and isinstance(out.X, np.ndarray)
        assert list(out.obs.columns) == ["target_gene"]
        assert list(out.obs["target_gene"].cat.categories) == ["non-targeting", "G001", "G000+G003", "U000"]
        assert out.obs_names.is_unique
        # The same control cells, last, in both.
        tail = out[out.n_obs - control.n_obs :]
        assert (tail.obs["target_gene"] == "non-targeting").all()
        np.testing.assert_array_equal(tail.X, control[:, genes].X)
    assert (pred_ce.obs["target_gene"] == "non-targeting").sum() == control.n_obs
    # Predicted cells first, as given.
    np.testing.assert_array_equal(pred_ce.X[: prediction.n_obs], prediction.X)
    head = pred_ce.obs["target_gene"].astype(str).to_numpy()[: prediction.n_obs]
    np.testing.assert_array_equal(head, prediction.obs["perturbation"].astype(str).to_numpy())
    # Real cells: only the predicted perturbations, on the predicted genes.
    counts = real_ce.obs["target_gene"].value_counts()
    assert counts.to_dict() == {"non-targeting": control.n_obs, "G001": 60, "G000+G003": 60, "U000": 60}
    keep = real.obs["perturbation"].isin(["G001", "G000+G003", "U000"]).to_numpy()
    np.testing.assert_array_equal(real_ce.X[: keep.sum()], real[keep][:, genes].X)
    # The inputs are untouched.
    assert "target_gene" not in prediction.obs and real_shuffled.n_vars == len(genes) + 1


def test_layout_sparse_names_cell_types_and_options(data, prediction):
    real, control = data
    real_sparse, control_sparse, pred_sparse = (x.copy() for x in (real, control, prediction))
    for x in (real_sparse, control_sparse, pred_sparse):
        x.X = sp.csr_matrix(x.X, dtype=np.float64)
    pred_ce, real_ce = to_cell_eval(pred_sparse, real_sparse, control_sparse)
    assert sp.issparse(pred_ce.X) and sp.issparse(real_ce.X) and pred_ce.X.dtype == np.float32
    # Dense prediction, sparse real: dense results.
    pred_ce, real_ce = to_cell_eval(prediction, real_sparse, control_sparse)
    assert isinstance(pred_ce.X, np.ndarray) and isinstance(real_ce.X, np.ndarray)

    # Cell names shared by the prediction and the controls are made unique; the columns and labels are options.
    renamed = prediction.copy()
    renamed.obs_names = control.obs_names[: renamed.n_obs]
    renamed.obs["cond"] = renamed.obs["perturbation"]
    real_cond = real.copy()
    real_cond.obs["cond"] = real_cond.obs["perturbation"]
    pred_ce, real_ce = to_cell_eval(
        renamed, real_cond, control, perturbation_key="cond", pert_col="target", control_label="ctrl",
        cell_type_key="cell_type",
    )  # fmt: skip
    assert pred_ce.obs_names.is_unique and pred_ce.obs_names[0] == control.obs_names[0]
    assert list(pred_ce.obs.columns) == ["target", "cell_type"] and set(pred_ce.obs["cell_type"]) == {"ct0"}
    assert (real_ce.obs["target"] == "ctrl").sum() == control.n_obs

    # A layer of real and control.
    real_layer, control_layer = real.copy(), control.copy()
    real_layer.layers["log1p"], control_layer.layers["log1p"] = real.X * 0 + 1.5, control.X * 0 + 0.5
    real_layer.X, control_layer.X = real.X * 100, control.X * 100
    pred_ce, real_ce = to_cell_eval(prediction, real_layer, control_layer, layer="log1p")
    assert set(np.unique(real_ce.X)) == {0.5, 1.5}


def test_layout_errors(data, prediction):
    real, control = data
    with pytest.raises(ValueError, match="must be an AnnData"):
        to_cell_eval(prediction.X, real, control)
    with pytest.raises(ValueError, match="lacks 1 of the predicted genes"):
        to_cell_eval(prediction, real[:, 1:], control)
    with pytest.raises(ValueError, match="lacks 1 of the predicted genes"):
        to_cell_eval(prediction, real, control[:, :-1])
    with pytest.raises(ValueError, match=r"no cells of the predicted perturbations \['G001'\]"):
        to_cell_eval(prediction, real[real.obs["perturbation"] != "G001"], control)
    with pytest.raises(ValueError, match="no column 'condition'"):
        to_cell_eval(prediction, real, control, perturbation_key="condition")
    with pytest.raises(ValueError, match="no column 'donor'"):
        to_cell_eval(prediction, real, control, cell_type_key="donor")
    with pytest.raises(ValueError, match="control label of the results"):
        to_cell_eval(prediction, real, control, control_label="G001")
    with pytest.raises(ValueError, match="no layer 'counts'"):
        to_cell_eval(prediction, real, control, layer="counts")
    negative = prediction.copy()
    negative.X[0, 0] = -0.5
    with pytest.raises(ValueError, match="negative expression values"):
        to_cell_eval(negative, real, control)
    missing = prediction.copy()
    missing.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        to_cell_eval(missing, real, control)
    with_sources = sd.baselines.MeanShift().fit(ad.concat([real, control]))
    with_sources = with_sources.predict(["G001"], n_cells=5, include_sources=True)
    with pytest.raises(ValueError, match="source control cells"):
        to_cell_eval(with_sources, real, control)
    with pytest.raises(ValueError, match="has no cells"):
        to_cell_eval(prediction[:0], real, control)


def test_score_without_cell_eval(data, prediction, monkeypatch):
    real, control = data
    monkeypatch.setitem(sys.modules, "cell_eval", None)  # import cell_eval now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "scdoloris\[celleval\]"'):
        score_cell_eval(prediction, real, control)


# ------------------------------------------------------------------ scoring (cell-eval installed)
def test_score_known_truth(data, prediction, capsys):
    pytest.importorskip("cell_eval")
    real, control = data
    labels = list(dict.fromkeys(real.obs["perturbation"].astype(str)))
    results, agg = score_cell_eval(real, real, control, profile="minimal")
    assert capsys.readouterr().err == ""  # quiet: no logs, no progress bars
    assert sorted(results.index) == sorted(labels) and results.index.name == "perturbation"
    assert {"pearson_delta", "mae", "discrimination_score_l1", "overlap_at_N"} <= set(results.columns)
    assert list(agg.index) == ["count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    # The real cells as their own prediction: perfect everywhere (every perturbation has DE genes here).
    assert (results["de_nsig_counts_real"] > 0).all()
    np.testing.assert_allclose(results["pearson_delta"], 1.0, atol=1e-5)
    np.testing.assert_allclose(results["mae"], 0.0, atol=1e-6)
    assert (results["discrimination_score_l1"] == 1.0).all() and (results["overlap_at_N"] == 1.0).all()
    assert agg.loc["mean", "overlap_at_N"] == 1.0 and agg.loc["count", "pearson_delta"] == len(labels)

    # Control cells as the prediction ("no change"): worse on every one of them.
    no_change = sd.baselines.NoChange().fit(ad.concat([real, control])).predict(labels, n_cells=60)
    worse, _ = score_cell_eval(no_change, real, control, profile="minimal")
    assert (worse["overlap_at_N"] == 0.0).all()
    assert worse["pearson_delta"].abs().mean() < 0.3
    assert worse["discrimination_score_l1"].mean() < 0.8
    assert (worse["mae"] > 0.05).all()

    # cell-eval's pearson_delta is scdoloris' (the same controls on both sides).
    scored, _ = score_cell_eval(prediction, real, control, profile="minimal")
    for label in ["G001", "G000+G003", "U000"]:
        ours = sd.metrics.pearson_delta(
            prediction[prediction.obs["perturbation"] == label], real[real.obs["perturbation"] == label], control
        )
        assert scored.loc[label, "pearson_delta"] == pytest.approx(ours, abs=1e-4)


def test_score_per_cell_type_and_outdir(tmp_path):
    pytest.importorskip("cell_eval")
    adata = sd.datasets.synthetic_perturbations(
        n_genes=30, n_perturbed_genes=4, n_doubles=1, n_cells_per_condition=30, n_control_cells=60, n_cell_types=2
    )
    is_control = (adata.obs["perturbation"] == "control").to_numpy()
    real, control = adata[~is_control], adata[is_control]
    results, agg = score_cell_eval(real, real, control, cell_type_key="cell_type", profile="pds", outdir=str(tmp_path))
    assert results.index.names == ["cell_type", "perturbation"] and list(results.columns) == ["discrimination_score_l1"]
    assert set(results.index.get_level_values("cell_type")) == {"ct0", "ct1"} and len(results) == 2 * 6
    assert (results["discrimination_score_l1"] == 1.0).all()
    assert agg.loc[("ct1", "mean"), "discrimination_score_l1"] == 1.0
    assert {p.name for p in tmp_path.iterdir()} == {
        "ct0_results.csv", "ct0_agg_results.csv", "ct1_results.csv", "ct1_agg_results.csv"
    }  # fmt: skip
    with pytest.raises(ValueError, match="no cells of cell type 'ct1'"):
        score_cell_eval(real, real, control[control.obs["cell_type"] == "ct0"], cell_type_key="cell_type")
    counts, control_counts = real.copy(), control.copy()
    counts.X, control_counts.X = np.round(counts.X * 10), np.round(control.X * 10)
    with pytest.raises(ValueError, match="whole numbers only"):
        score_cell_eval(counts, counts, control_counts, profile="pds")


def test_score_failing_metric_warns(data, monkeypatch):
    pytest.importorskip("cell_eval")
    from cell_eval import metrics_registry

    def broken(pair, **kwargs):
        raise RuntimeError("broken metric")

    monkeypatch.setattr(metrics_registry.get_metric("mae"), "func", broken)
    real, control = data
    with pytest.warns(RuntimeWarning, match="cell-eval: .*broken metric"):
        results, _ = score_cell_eval(real, real, control, profile="anndata", skip_metrics=["clustering_agreement"])
    assert "mae" not in results and "pearson_delta" in results
