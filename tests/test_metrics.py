import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.stats import wasserstein_distance

import scdoloris as sd
import scdoloris.metrics._distances as dist_mod
from scdoloris.metrics import de_genes, e_distance, emd, evaluate, mean_rmse, pearson_delta


def _brute_e_distance(x, y):
    """Paper Eq. 20 with explicit loops over all pairs (i == j included)."""

    def mean_dist(a, b):
        total = 0.0
        for i in range(a.shape[0]):
            for j in range(b.shape[0]):
                total += np.sqrt(np.sum((a[i] - b[j]) ** 2))
        return total / (a.shape[0] * b.shape[0])

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def _scipy_emd(x, y):
    return np.mean([wasserstein_distance(x[:, j], y[:, j]) for j in range(x.shape[1])])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_public_api():
    assert set(sd.metrics.__all__) == {
        "e_distance",
        "e_distance_floor",
        "emd",
        "mean_rmse",
        "pearson_delta",
        "de_genes",
        "differential_expression",
        "evaluate",
        "cosine_delta",
        "top_expressed_l2",
        "zero_fraction_error",
        "spread_ratio",
        "de_agreement",
        "rank_metric",
    }
    assert not hasattr(sd.metrics, "edistance")
    assert not hasattr(sd.metrics, "rmse_mean")


# --- E-distance ---------------------------------------------------------------------------------


def test_e_distance_self_is_zero(rng):
    x = rng.normal(size=(40, 8))
    assert e_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert e_distance(x, x, sqrt=True) == pytest.approx(0.0, abs=1e-6)


def test_e_distance_symmetric_and_matches_brute_force(rng):
    x = rng.normal(size=(23, 7))
    y = rng.normal(0.3, 1.2, size=(31, 7))
    expected = _brute_e_distance(x, y)
    assert expected > 0
    assert e_distance(x, y) == pytest.approx(expected, rel=1e-12)
    assert e_distance(y, x) == pytest.approx(e_distance(x, y), rel=1e-12)


def test_e_distance_sqrt_option(rng):
    x = rng.normal(size=(17, 5))
    y = rng.normal(0.5, size=(12, 5))
    expected = _brute_e_distance(x, y)
    assert e_distance(x, y, sqrt=False) == pytest.approx(expected, rel=1e-12)
    assert e_distance(x, y, sqrt=True) == pytest.approx(np.sqrt(expected), rel=1e-12)
    # Default is the paper's Eq. 20, not the square root.
    assert e_distance(x, y) == e_distance(x, y, sqrt=False)


def test_e_distance_single_cells_is_twice_the_distance():
    # One cell each: the within terms vanish, E = 2 ||x - y||.
    assert e_distance([[0.0, 0.0]], [[3.0, 4.0]]) == pytest.approx(10.0)


def test_e_distance_grows_with_shift(rng):
    x = rng.normal(size=(60, 10))
    noise = rng.normal(size=(60, 10))
    values = [e_distance(x, noise + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values[0] > 0
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_matches_unchunked(rng, monkeypatch, sparse):
    x = rng.normal(size=(50, 6)) * (rng.random((50, 6)) > 0.3)
    y = rng.normal(1.0, size=(45, 6)) * (rng.random((45, 6)) > 0.3)
    if sparse:
        x, y = sp.csr_matrix(x), sp.csc_matrix(y)
    full_e, full_emd = e_distance(x, y), emd(x, y)
    # Tiny blocks: 3 cells per distance block, 1 gene per EMD block.
    monkeypatch.setattr(dist_mod, "_BLOCK_ENTRIES", 10)
    assert dist_mod._rows_per_block(6) == 1
    monkeypatch.setattr(dist_mod, "_BLOCK_ENTRIES", 20)
    assert dist_mod._rows_per_block(6) == 3
    assert e_distance(x, y) == pytest.approx(full_e, rel=1e-12)
    assert emd(x, y) == pytest.approx(full_emd, abs=1e-12)


def test_pairwise_distances_are_never_materialised_in_full(rng, monkeypatch):
    """Every distance block computed stays within the block budget, far below n x m."""
    sizes = []
    real_cdist, real_pdist = dist_mod.cdist, dist_mod.pdist

    def spy_cdist(a, b, **kwargs):
        sizes.append(a.shape[0] * b.shape[0])
        assert a.dtype == b.dtype == np.float64
        return real_cdist(a, b, **kwargs)

    def spy_pdist(a, **kwargs):
        sizes.append(a.shape[0] ** 2)
        return real_pdist(a, **kwargs)

    monkeypatch.setattr(dist_mod, "cdist", spy_cdist)
    monkeypatch.setattr(dist_mod, "pdist", spy_pdist)
    monkeypatch.setattr(dist_mod, "_BLOCK_ENTRIES", 400)
    x = rng.normal(size=(130, 4)).astype(np.float32)
    y = sp.csr_matrix(rng.normal(size=(90, 4)))
    value = e_distance(x, y)
    assert max(sizes) <= 400
    assert value == pytest.approx(_brute_e_distance(x.astype(float), y.toarray()), rel=1e-10)


# --- EMD ----------------------------------------------------------------------------------------


def test_emd_matches_scipy(rng):
    x = rng.normal(size=(200, 50))
    y = rng.gamma(2.0, size=(150, 50))
    assert emd(x, y) == pytest.approx(_scipy_emd(x, y), abs=1e-10)


def test_emd_with_ties_matches_scipy(rng):
    # Zero-inflated, rounded values produce many ties within and across sets.
    x = np.round(rng.exponential(size=(80, 20)) * (rng.random((80, 20)) > 0.5), 1)
    y = np.round(rng.exponential(1.5, size=(60, 20)) * (rng.random((60, 20)) > 0.3), 1)
    assert emd(x, y) == pytest.approx(_scipy_emd(x, y), abs=1e-10)
    assert emd(x, x) == 0.0


def test_emd_pure_shift(rng):
    x = rng.normal(size=(100, 12))
    assert emd(x, x + 0.7) == pytest.approx(0.7, abs=1e-10)
    assert emd(x + 0.7, x) == pytest.approx(0.7, abs=1e-10)


# --- mean RMSE and Pearson delta ----------------------------------------------------------------


def test_mean_rmse(rng):
    x = rng.normal(size=(30, 5))
    y = rng.normal(size=(20, 5))
    expected = np.sqrt(np.mean((x.mean(0) - y.mean(0)) ** 2))
    assert mean_rmse(x, y) == pytest.approx(expected, rel=1e-12)
    assert mean_rmse(x, x + 1.5) == pytest.approx(1.5)


def test_pearson_delta(rng):
    control = rng.normal(size=(40, 30))
    real = rng.normal(size=(25, 30)) + rng.normal(size=30)
    pred = rng.normal(size=(35, 30)) + rng.normal(size=30)
    expected = np.corrcoef(pred.mean(0) - control.mean(0), real.mean(0) - control.mean(0))[0, 1]
    assert pearson_delta(pred, real, control) == pytest.approx(expected, rel=1e-12)
    # Scale-free and signed.
    shift = rng.normal(size=30)
    assert pearson_delta(control + 3 * shift, control + shift, control) == pytest.approx(1.0)
    assert pearson_delta(control - shift, control + shift, control) == pytest.approx(-1.0)
    # Undefined when the predicted change is constant over genes.
    assert np.isnan(pearson_delta(control + 1.0, real, control))


# --- input kinds and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_sparse_input_equals_dense(rng, fmt):
    x = rng.exponential(size=(40, 9)) * (rng.random((40, 9)) > 0.6)
    y = rng.exponential(size=(35, 9)) * (rng.random((35, 9)) > 0.4)
    c = rng.exponential(size=(20, 9)) * (rng.random((20, 9)) > 0.5)
    xs, ys, cs = sp.csr_matrix(x).asformat(fmt), sp.csr_array(y).asformat(fmt), sp.csr_matrix(c).asformat(fmt)
    assert e_distance(xs, ys) == pytest.approx(e_distance(x, y), rel=1e-12)
    assert e_distance(xs, y) == pytest.approx(e_distance(x, y), rel=1e-12)
    assert emd(xs, ys) == pytest.approx(emd(x, y), abs=1e-12)
    assert mean_rmse(xs, ys) == pytest.approx(mean_rmse(x, y), rel=1e-12)
    assert pearson_delta(xs, ys, cs) == pytest.approx(pearson_delta(x, y, c), rel=1e-12)


def test_anndata_input(rng):
    x = rng.normal(size=(20, 6))
    y = rng.normal(size=(15, 6))
    c = rng.normal(size=(10, 6))
    ax, ay, ac = ad.AnnData(x), ad.AnnData(sp.csr_matrix(y)), ad.AnnData(c)
    assert e_distance(ax, ay) == pytest.approx(e_distance(x, y), rel=1e-12)
    assert e_distance(ax.X, ay.X) == pytest.approx(e_distance(x, y), rel=1e-12)
    assert emd(ax, ay) == pytest.approx(emd(x, y), abs=1e-12)
    assert mean_rmse(ax, ay) == pytest.approx(mean_rmse(x, y), rel=1e-12)
    assert pearson_delta(ax, ay, ac) == pytest.approx(pearson_delta(x, y, c), rel=1e-12)


def test_float32_input(rng):
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.normal(size=(30, 4)).astype(np.float32)
    assert e_distance(x, y) == pytest.approx(_brute_e_distance(x.astype(float), y.astype(float)), rel=1e-10)
    assert emd(x, y) == pytest.approx(_scipy_emd(x.astype(float), y.astype(float)), abs=1e-10)


@pytest.mark.parametrize("func", [e_distance, emd, mean_rmse, lambda a, b: pearson_delta(a, b, b)])
def test_errors(rng, func):
    x = rng.normal(size=(10, 5))
    with pytest.raises(ValueError, match="same number of genes"):
        func(x, rng.normal(size=(10, 6)))
    with pytest.raises(ValueError, match="empty"):
        func(x, np.zeros((0, 5)))
    with pytest.raises(ValueError, match="empty"):
        func(np.zeros((0, 5)), x)
    with pytest.raises(ValueError, match="2-D"):
        func(x[0], x)


def test_pearson_delta_checks_control_genes(rng):
    x = rng.normal(size=(10, 5))
    with pytest.raises(ValueError, match="same number of genes"):
        pearson_delta(x, x, rng.normal(size=(10, 4)))


# --- property tests -----------------------------------------------------------------------------

_values = st.floats(-10, 10, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def _cell_sets(draw):
    """Two sets of cells sharing the gene axis, and a random row permutation of each."""
    n_genes = draw(st.integers(1, 5))
    x = draw(hnp.arrays(np.float64, (draw(st.integers(1, 8)), n_genes), elements=_values))
    y = draw(hnp.arrays(np.float64, (draw(st.integers(1, 8)), n_genes), elements=_values))
    perm_x = draw(st.permutations(range(x.shape[0])))
    perm_y = draw(st.permutations(range(y.shape[0])))
    return x, y, np.asarray(perm_x), np.asarray(perm_y)


_prop = settings(max_examples=60, deadline=None)


@_prop
@given(_cell_sets())
def test_property_e_distance(sets):
    x, y, perm_x, perm_y = sets
    value = e_distance(x, y)
    assert value >= 0.0
    assert value == pytest.approx(_brute_e_distance(x, y), rel=1e-9, abs=1e-9)
    assert e_distance(y, x) == pytest.approx(value, rel=1e-9, abs=1e-9)
    assert e_distance(x[perm_x], y[perm_y]) == pytest.approx(value, rel=1e-9, abs=1e-9)
    assert e_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-9)
    assert e_distance(x, y, sqrt=True) == pytest.approx(np.sqrt(value), rel=1e-9, abs=1e-6)


@_prop
@given(_cell_sets())
def test_property_emd(sets):
    x, y, perm_x, perm_y = sets
    value = emd(x, y)
    assert value >= 0.0
    assert value == pytest.approx(_scipy_emd(x, y), rel=1e-9, abs=1e-9)
    assert emd(y, x) == pytest.approx(value, rel=1e-9, abs=1e-9)
    assert emd(x[perm_x], y[perm_y]) == pytest.approx(value, rel=1e-9, abs=1e-9)
    assert emd(x, x.copy()) == 0.0


@_prop
@given(_cell_sets())
def test_property_mean_rmse(sets):
    x, y, perm_x, perm_y = sets
    value = mean_rmse(x, y)
    assert value >= 0.0
    assert mean_rmse(y, x) == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert mean_rmse(x[perm_x], y[perm_y]) == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert mean_rmse(x, x.copy()) == 0.0


# --- DE genes -----------------------------------------------------------------------------------

N_GENES = 60
UP = {"ct0": [3, 11, 17, 25, 40], "ct1": [5, 8, 30, 44, 59]}
DOWN = {"ct0": [1, 50], "ct1": [2, 51]}


def _synthetic(seed=0, n=40, sparse=False):
    """Log1p counts: control and KO cells of two cell types; KO raises UP and silences DOWN genes."""
    rng = np.random.default_rng(seed)
    blocks, obs = [], []
    for ct in ("ct0", "ct1"):
        for label in ("control", "KO"):
            counts = rng.poisson(3.0, size=(n, N_GENES)).astype(float)
            if label == "KO":
                counts[:, UP[ct]] += rng.poisson(12.0, size=(n, len(UP[ct])))
                counts[:, DOWN[ct]] = 0.0
            blocks.append(np.log1p(counts))
            obs += [(label, ct)] * n
    x = np.vstack(blocks)
    obs = pd.DataFrame(obs, columns=["perturbation", "cell_type"], index=[f"cell{i}" for i in range(len(obs))])
    var = pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)])
    return ad.AnnData(sp.csr_matrix(x) if sparse else x, obs=obs, var=var)


def _names(positions):
    return {f"g{j}" for j in positions}


@pytest.mark.parametrize("sparse", [False, True])
def test_de_genes_finds_planted_genes(sparse):
    adata = _synthetic(sparse=sparse)
    before_x = adata.X.copy()
    before_obs = adata.obs.copy()
    for ct in ("ct0", "ct1"):
        planted = _names(UP[ct] + DOWN[ct])
        top = de_genes(adata, "perturbation", "KO", "control", n=len(planted), cell_type_key="cell_type", cell_type=ct)
        assert set(top) == planted
        # Signed ranking (scanpy's default) puts the up-regulated genes first.
        up = de_genes(
            adata, "perturbation", "KO", "control", n=5, cell_type_key="cell_type", cell_type=ct, rankby_abs=False
        )
        assert set(up) == _names(UP[ct])
    # Without a cell type, both cell types' genes are DE vs the pooled controls.
    top20 = de_genes(adata, "perturbation", "KO", "control", n=20)
    top40 = de_genes(adata, "perturbation", "KO", "control", n=40)
    assert len(top20) == 20 and len(top40) == 40 and len(set(top40)) == 40
    assert top40[:20] == top20
    assert _names(UP["ct0"] + UP["ct1"]) <= set(top20)
    # The user's AnnData is untouched.
    assert "rank_genes_groups" not in adata.uns
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    after = adata.X.toarray() if sparse else adata.X
    np.testing.assert_array_equal(after, before_x.toarray() if sparse else before_x)


def test_de_genes_errors():
    adata = _synthetic(n=10)
    with pytest.raises(ValueError, match="cell types"):
        de_genes(adata, "perturbation", "KO", "control", cell_type_key="cell_type")
    with pytest.raises(ValueError, match="No cells"):
        de_genes(adata, "perturbation", "missing", "control")
    with pytest.raises(ValueError, match="only 60 genes"):
        de_genes(adata, "perturbation", "KO", "control", n=61)
    with pytest.raises(ValueError, match="same label"):
        de_genes(adata, "perturbation", "KO", "KO")
    with pytest.raises(KeyError, match="nope"):
        de_genes(adata, "nope", "KO", "control")


# --- evaluate -----------------------------------------------------------------------------------


def _eval_data(sparse=False):
    adata = _synthetic(seed=1, n=30, sparse=sparse)
    rng = np.random.default_rng(2)
    control = adata[adata.obs["perturbation"] == "control"].copy()
    real = adata[adata.obs["perturbation"] == "KO"].copy()
    # Predictions: real KO cells with noise, for two cell types; fewer cells than real.
    pred = real[::2].copy()
    noise = rng.normal(scale=0.3, size=pred.shape)
    pred.X = sp.csr_matrix(pred.X.toarray() + noise) if sparse else pred.X + noise
    pred.obs_names = [f"pred{i}" for i in range(pred.n_obs)]
    return pred, real, control


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def test_evaluate_rows_and_values():
    pred, real, control = _eval_data()
    copies = [a.copy() for a in (pred, real, control)]
    table = evaluate(pred, real, control, cell_type_key="cell_type")
    assert list(table.columns) == ["perturbation", "cell_type", "gene_set", "metric", "value"]
    assert len(table) == 1 * 2 * 3 * 4
    assert set(table["gene_set"]) == {"all", "DE20", "DE40"}
    assert set(table["metric"]) == {"e_distance", "emd", "mean_rmse", "pearson_delta"}
    assert not table.duplicated(["perturbation", "cell_type", "gene_set", "metric"]).any()
    assert table["value"].dtype == np.float64 and table["value"].notna().all()

    both = ad.concat([real, control])
    for ct in ("ct0", "ct1"):
        p = _dense(pred[pred.obs["cell_type"] == ct].X)
        r = _dense(real[real.obs["cell_type"] == ct].X)
        c = _dense(control[control.obs["cell_type"] == ct].X)
        top40 = de_genes(both, "perturbation", "KO", "control", n=40, cell_type_key="cell_type", cell_type=ct)
        sets = {"all": slice(None)}
        sets |= {f"DE{n}": pred.var_names.get_indexer(top40[:n]) for n in (20, 40)}
        for gene_set, cols in sets.items():
            got = table[(table["cell_type"] == ct) & (table["gene_set"] == gene_set)].set_index("metric")["value"]
            pc, rc, cc = p[:, cols], r[:, cols], c[:, cols]
            assert got["e_distance"] == pytest.approx(e_distance(pc, rc), rel=1e-12)
            assert got["emd"] == pytest.approx(emd(pc, rc), rel=1e-12)
            assert got["mean_rmse"] == pytest.approx(mean_rmse(pc, rc), rel=1e-12)
            assert got["pearson_delta"] == pytest.approx(pearson_delta(pc, rc, cc), rel=1e-12)
    # Predictions close to the truth: strong Pearson delta on the DE genes.
    assert (table.query("metric == 'pearson_delta' and gene_set == 'DE20'")["value"] > 0.9).all()
    # Inputs untouched.
    for before, after in zip(copies, (pred, real, control), strict=True):
        np.testing.assert_array_equal(_dense(before.X), _dense(after.X))
        pd.testing.assert_frame_equal(before.obs, after.obs)
        assert set(before.uns) == set(after.uns)


def test_evaluate_options():
    pred, real, control = _eval_data()
    one_type = [a[a.obs["cell_type"] == "ct0"].copy() for a in (pred, real, control)]
    # Without cell types: one row per (condition, gene set, metric), cell_type is None.
    table = evaluate(*one_type, n_de=(20,), metrics=("e_distance", "mean_rmse"), sqrt=True)
    assert len(table) == 2 * 2
    assert table["cell_type"].isna().all()
    assert list(table["gene_set"].unique()) == ["all", "DE20"]
    p, r = (_dense(a.X) for a in one_type[:2])
    got = table.query("gene_set == 'all' and metric == 'e_distance'")["value"].item()
    assert got == pytest.approx(e_distance(p, r, sqrt=True), rel=1e-12)
    # Precomputed DE genes are used as given (prefixes for each size).
    genes = [f"g{j}" for j in range(59, 19, -1)]
    given_table = evaluate(*one_type, de_genes={"KO": genes}, n_de=(20, 40), metrics="mean_rmse")
    got = given_table.set_index("gene_set")["value"]
    cols = pred.var_names.get_indexer(genes[:20])
    assert got["DE20"] == pytest.approx(mean_rmse(p[:, cols], r[:, cols]), rel=1e-12)
    # All genes only.
    assert list(evaluate(*one_type, n_de=())["gene_set"].unique()) == ["all"]


def test_evaluate_sparse_and_gene_order_invariant():
    dense = evaluate(*_eval_data(), cell_type_key="cell_type", n_de=(20,))
    pred, real, control = _eval_data(sparse=True)
    order = np.random.default_rng(3).permutation(real.n_vars)
    sparse = evaluate(pred, real[:, order].copy(), control, cell_type_key="cell_type", n_de=(20,))
    pd.testing.assert_frame_equal(dense[sparse.columns[:-1]], sparse[sparse.columns[:-1]])
    np.testing.assert_allclose(dense["value"], sparse["value"], rtol=1e-10)


def test_evaluate_errors():
    pred, real, control = _eval_data()
    with pytest.raises(ValueError, match="has no cells"):
        evaluate(pred, real[real.obs["cell_type"] == "ct0"].copy(), control, cell_type_key="cell_type")
    with pytest.raises(ValueError, match="Unknown metric"):
        evaluate(pred, real, control, metrics=("rmse",))
    with pytest.raises(ValueError, match="same genes"):
        evaluate(pred, real[:, :50].copy(), control)
    with pytest.raises(KeyError, match="no entry"):
        evaluate(pred, real, control, de_genes={"other": ["g1"]})
    with pytest.raises(ValueError, match="smaller `n_de`"):
        evaluate(pred, real, control, de_genes={"KO": ["g1", "g2"]})
    with pytest.raises(TypeError, match="AnnData"):
        evaluate(pred.X, real, control)


def test_de_genes_leaves_torch_threads_alone():
    """scanpy's Wilcoxon test resets OpenMP threads; de_genes puts torch's count back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adata = sd.datasets.synthetic_perturbations(n_genes=20, n_cells_per_condition=20, n_control_cells=40, seed=0)
        group = str(adata.obs.loc[adata.obs["perturbation"] != "control", "perturbation"].iloc[0])
        de_genes(adata, "perturbation", group, "control", n=5)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- E-distance floor -----------------------------------------------------------------------------


def _gaussian_delta(d):
    """E||x - x'|| for independent standard normal x, x' in d dimensions: sqrt(2) times the chi_d mean."""
    from scipy.special import gammaln

    return 2.0 * np.exp(gammaln((d + 1) / 2) - gammaln(d / 2))


def test_e_distance_floor_is_the_u_statistic_formula(rng):
    real = rng.normal(size=(25, 4))
    pairs = [np.linalg.norm(real[i] - real[j]) for i in range(25) for j in range(25) if i != j]
    delta = np.mean(pairs)
    assert sd.metrics.e_distance_floor(real, n_predicted=10) == pytest.approx(delta * (1 / 10 + 1 / 25), rel=1e-12)
    assert sd.metrics.e_distance_floor(real, n_predicted=10, n_real=7) == pytest.approx(delta * (1 / 10 + 1 / 7))
    # Sparse and AnnData inputs, and blocks smaller than the data, give the same value.
    sparse = sp.csr_matrix(np.where(real > 0, real, 0.0))
    dense = sparse.toarray()
    expected = sd.metrics.e_distance_floor(dense, n_predicted=3)
    assert sd.metrics.e_distance_floor(sparse, n_predicted=3) == pytest.approx(expected, rel=1e-12)
    assert sd.metrics.e_distance_floor(ad.AnnData(dense), n_predicted=3) == pytest.approx(expected, rel=1e-12)


def test_e_distance_floor_small_blocks(rng, monkeypatch):
    real = rng.normal(size=(40, 6))
    expected = sd.metrics.e_distance_floor(real, n_predicted=20)
    monkeypatch.setattr(dist_mod, "_BLOCK_ENTRIES", 50)
    assert sd.metrics.e_distance_floor(real, n_predicted=20) == pytest.approx(expected, rel=1e-12)


def test_e_distance_floor_edge_cases():
    assert np.isnan(sd.metrics.e_distance_floor(np.ones((1, 3)), n_predicted=5))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            sd.metrics.e_distance_floor(np.ones((3, 3)), n_predicted=bad)
    with pytest.raises(ValueError, match="positive integer"):
        sd.metrics.e_distance_floor(np.ones((3, 3)), n_predicted=2, n_real=0)
    with pytest.raises(ValueError, match="no cells"):
        sd.metrics.e_distance_floor(np.ones((0, 3)), n_predicted=2)


def test_e_distance_floor_matches_monte_carlo_on_gaussians():
    """E[E(X, Y)] for two samples of one distribution is delta * (1/n + 1/m) (Eq. 20's V-statistic)."""
    rng = np.random.default_rng(1)
    n, m, d, reps = 30, 50, 5, 1500
    values, floors = [], []
    for _ in range(reps):
        x, y = rng.normal(size=(n, d)), rng.normal(size=(m, d))
        values.append(e_distance(x, y))
        floors.append(sd.metrics.e_distance_floor(y, n_predicted=n))
    exact = _gaussian_delta(d) * (1 / n + 1 / m)
    assert np.mean(values) == pytest.approx(exact, rel=0.03)  # Monte-Carlo standard error ~0.9 %
    assert np.mean(floors) == pytest.approx(exact, rel=0.01)  # the U-statistic estimate is unbiased
    # Scored against its own floor, a perfect generator's excess is 0 on average.
    assert abs(np.mean(np.subtract(values, floors))) < 0.03 * exact


def test_e_distance_split_half_matches_its_expectation():
    """Split-half check: E between two random halves of the real cells, on average, is delta * (1/h1 + 1/h2)."""
    rng = np.random.default_rng(2)
    real = rng.normal(size=(41, 5)) * np.linspace(0.5, 2.0, 5)  # anisotropic; halves of 20 and 21 cells
    halves = [np.array_split(rng.permutation(41), 2) for _ in range(2000)]
    split_half = [e_distance(real[a], real[b]) for a, b in halves]
    expected = sd.metrics.e_distance_floor(real, n_predicted=20, n_real=21)
    # Over random splits of fixed cells the identity is exact with the estimated delta.
    assert np.mean(split_half) == pytest.approx(expected, rel=0.05)
    # Over fresh samples too, against the true delta.
    fresh = []
    for _ in range(1000):
        cells = rng.normal(size=(40, 5))
        a, b = np.array_split(rng.permutation(40), 2)
        fresh.append(e_distance(cells[a], cells[b]))
    assert np.mean(fresh) == pytest.approx(_gaussian_delta(5) * (1 / 20 + 1 / 20), rel=0.03)


def test_differential_expression_of_predictions_in_scanpys_format():
    """Against the sources: the shifted genes come first; against real cells: nothing stands out."""
    adata = sd.datasets.synthetic_perturbations(n_genes=30, n_perturbed_genes=4, n_doubles=0, seed=0)
    shifted = sd.baselines.Additive().fit(adata)
    pred = shifted.predict(["G001", "G002"], n_cells=80, include_sources=True, seed=0)
    table = sd.metrics.differential_expression(pred)
    assert list(table.columns) == ["group", "names", "scores", "logfoldchanges", "pvals", "pvals_adj"]
    assert sorted(set(table["group"])) == ["G001", "G002"] and len(table) == 60
    shift = shifted.predict_shift(["G001"]).iloc[0]
    rows = table[table["group"] == "G001"].set_index("names").loc[shift.index]
    assert np.corrcoef(np.sign(rows["scores"]), np.sign(shift))[0, 1] > 0.8  # the direction of each shifted gene
    assert np.corrcoef(rows["logfoldchanges"], shift)[0, 1] > 0.8  # and its size
    versus_real = sd.metrics.differential_expression(pred[pred.obs["is_predicted"].to_numpy()].copy(), adata)
    assert set(versus_real["group"]) == {"G001", "G002"} and versus_real["pvals_adj"].min() > 1e-6
    with pytest.raises(ValueError, match="include_sources=True"):
        sd.metrics.differential_expression(pred[pred.obs["is_predicted"].to_numpy()].copy())


# --- AnnData inputs: genes matched by name; no genes or no cells refused -------------------------------

# Every metric of _distances.py and _change.py, as a function of (pred, real, control).
_BY_NAME = {
    "e_distance": lambda p, r, c: e_distance(p, r),
    "emd": lambda p, r, c: emd(p, r),
    "mean_rmse": lambda p, r, c: mean_rmse(p, r),
    "pearson_delta": pearson_delta,
    "cosine_delta": sd.metrics.cosine_delta,
    "top_expressed_l2": lambda p, r, c: sd.metrics.top_expressed_l2(p, r, c, n_genes=5),
}


def _conditions():
    """Control cells, cells of one perturbation and a prediction of them, as AnnData (20 genes)."""
    adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1, seed=0)
    labels = adata.obs["perturbation"].astype(str)
    control = adata[(labels == "control").to_numpy()].copy()
    real = adata[(labels == "G001").to_numpy()].copy()
    pred = adata[(labels == "G001+G002").to_numpy()].copy()
    return pred, real, control


@pytest.mark.parametrize("name", list(_BY_NAME))
def test_anndata_inputs_are_matched_by_gene_name(name):
    metric = _BY_NAME[name]
    pred, real, control = _conditions()
    aligned = metric(pred, real, control)
    assert np.isfinite(aligned) and aligned != 0
    order = np.random.default_rng(1).permutation(pred.n_vars)
    # Any input with its genes in another order (alone, or all of them) scores the same.
    for args in (
        (pred, real[:, order].copy(), control),
        (pred[:, order].copy(), real, control),
        (pred, real, control[:, order].copy()),
        (pred[:, order].copy(), real[:, order].copy(), control[:, order[::-1]].copy()),
    ):
        assert metric(*args) == pytest.approx(aligned, rel=1e-12, abs=1e-12)
    # Sparse AnnData too (float32 data: sparse sums round differently from dense means).
    sparse_real = ad.AnnData(sp.csr_matrix(real.X), var=real.var)[:, order].copy()
    assert metric(pred, sparse_real, control) == pytest.approx(aligned, rel=1e-6)
    # Other genes with the same values are not the same cells: refused, whichever input it is.
    renamed = real.copy()
    renamed.var_names = [f"other{j}" for j in range(real.n_vars)]
    with pytest.raises(ValueError, match="same genes"):
        metric(pred, renamed, control)
    with pytest.raises(ValueError, match="same genes"):
        metric(pred, real[:, :10].copy(), control)  # a subset
    wrong_control = control.copy()
    wrong_control.var_names = [f"other{j}" for j in range(control.n_vars)]
    if name in ("pearson_delta", "cosine_delta", "top_expressed_l2"):
        with pytest.raises(ValueError, match="same genes"):
            metric(pred, real, wrong_control)
    # A plain array has no gene names: it is taken column by column, as before.
    assert metric(pred, real.X, control) == pytest.approx(aligned, rel=1e-12, abs=1e-12)


def test_reordered_genes_score_like_aligned_genes_not_like_other_cells():
    """The reported case: the same cells with their genes in another order scored 0.081, not 0."""
    _, real, _ = _conditions()
    shuffled = real[:, np.random.default_rng(0).permutation(real.n_vars)].copy()
    assert e_distance(real, shuffled) == pytest.approx(0.0, abs=1e-12)
    assert emd(real, shuffled) == pytest.approx(0.0, abs=1e-12)
    assert mean_rmse(real, shuffled) == pytest.approx(0.0, abs=1e-12)
    assert e_distance(real.X, shuffled.X) > 0.01  # what .X alone said


@pytest.mark.parametrize("name", list(_BY_NAME))
@pytest.mark.parametrize("kind", ["dense", "sparse", "anndata"])
def test_no_genes_or_no_cells_is_an_error_not_a_score(name, kind):
    metric = _BY_NAME[name]

    def cells(n_cells, n_genes):
        x = np.ones((n_cells, n_genes))
        if kind == "sparse":
            return sp.csr_matrix(x)
        return ad.AnnData(x) if kind == "anndata" else x

    with pytest.raises(ValueError, match="have no genes"):
        metric(cells(5, 0), cells(4, 0), cells(3, 0))
    with pytest.raises(ValueError, match="no cells"):
        metric(cells(0, 3), cells(4, 3), cells(3, 3))
    with pytest.raises(ValueError, match="no cells"):
        metric(cells(5, 3), cells(0, 3), cells(3, 3))
    if name in ("pearson_delta", "cosine_delta", "top_expressed_l2"):
        with pytest.raises(ValueError, match="no cells"):
            metric(cells(5, 3), cells(4, 3), cells(0, 3))


def test_e_distance_floor_refuses_no_genes_and_no_cells():
    with pytest.raises(ValueError, match="has no genes"):
        sd.metrics.e_distance_floor(np.zeros((5, 0)), n_predicted=3)
    with pytest.raises(ValueError, match="no cells"):
        sd.metrics.e_distance_floor(np.zeros((0, 4)), n_predicted=3)
