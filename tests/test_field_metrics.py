"""The field's standard metrics: cosine delta, top-expressed L2, zero fraction, spread, DE agreement, rank."""

import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import false_discovery_control, mannwhitneyu

import scdoloris as sd
from scdoloris.metrics import (
    cosine_delta,
    de_agreement,
    e_distance,
    pearson_delta,
    rank_metric,
    spread_ratio,
    top_expressed_l2,
    zero_fraction_error,
)

NEW = ["cosine_delta", "de_agreement", "rank_metric", "spread_ratio", "top_expressed_l2", "zero_fraction_error"]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _zero_inflated(rng, n_cells, n_genes, rate=0.6):
    """log1p of Poisson counts: many tied zeros, as in real data."""
    return np.log1p(rng.poisson(rate, size=(n_cells, n_genes)).astype(float))


def test_exported():
    assert set(NEW) <= set(sd.metrics.__all__)
    for name in NEW:
        assert callable(getattr(sd.metrics, name))


# --- cosine_delta --------------------------------------------------------------------------------


def test_cosine_delta_hand_values():
    control = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean (2, 2, 2)
    real = control + np.array([1.0, 0.0, 0.0])
    assert cosine_delta(control + np.array([1.0, 1.0, 0.0]), real, control) == pytest.approx(1 / np.sqrt(2), abs=1e-15)
    assert cosine_delta(control + np.array([3.0, 0.0, 0.0]), real, control) == pytest.approx(1.0, abs=1e-15)
    assert cosine_delta(control - np.array([0.5, 0.0, 0.0]), real, control) == pytest.approx(-1.0, abs=1e-15)
    assert cosine_delta(control + np.array([0.0, 2.0, -1.0]), real, control) == pytest.approx(0.0, abs=1e-15)
    # (1, 2, 2) . (2, -1, 2) = 4; norms 3 and 3.
    real2 = control + np.array([1.0, 2.0, 2.0])
    assert cosine_delta(control + np.array([2.0, -1.0, 2.0]), real2, control) == pytest.approx(4 / 9, abs=1e-15)


def test_cosine_delta_not_centred_unlike_pearson():
    control = np.zeros((4, 3))
    shift = control + 1.0  # every gene up by one
    assert cosine_delta(shift, shift, control) == pytest.approx(1.0)
    assert np.isnan(pearson_delta(shift, shift, control))


def test_cosine_delta_nan_without_change(rng):
    control = rng.normal(size=(30, 6))
    real = control + rng.normal(size=6)
    assert np.isnan(cosine_delta(control, real, control))
    assert np.isnan(cosine_delta(control[::-1], real, control))  # zero change up to rounding
    assert np.isnan(cosine_delta(real, control, control))


def test_cosine_delta_input_kinds(rng):
    control, real, pred = (np.abs(rng.normal(size=(20, 5))) for _ in range(3))
    expected = cosine_delta(pred, real, control)
    got = cosine_delta(sp.csr_matrix(pred), ad.AnnData(real), sp.csc_array(control))
    assert got == pytest.approx(expected, rel=1e-13)
    with pytest.raises(ValueError, match="same number of genes"):
        cosine_delta(pred[:, :4], real, control)


# --- top_expressed_l2 ----------------------------------------------------------------------------


def test_top_expressed_l2_hand_value_and_control_ranking():
    control = np.array([[5.0, 0.0, 3.0, 1.0], [5.0, 0.0, 1.0, 1.0]])  # means 5, 0, 2, 1 -> order 0, 2, 3, 1
    real = control + np.array([0.0, 9.0, 1.0, 0.0])  # gene 1 is highest in the real cells, not in control
    pred = control + np.array([3.0, 0.0, -3.0, 0.0])
    # Top 2 by the control mean are genes 0 and 2: errors 3 and -4.
    assert top_expressed_l2(pred, real, control, n_genes=2) == pytest.approx(5.0, abs=1e-14)
    # Top 3 adds gene 3 (error 0); all 4 genes add gene 1 (error 9).
    assert top_expressed_l2(pred, real, control, n_genes=3) == pytest.approx(5.0, abs=1e-14)
    assert top_expressed_l2(pred, real, control, n_genes=4) == pytest.approx(np.sqrt(25 + 81), abs=1e-14)
    # Fewer genes than n_genes: all genes (the default of 1000).
    assert top_expressed_l2(pred, real, control) == pytest.approx(np.sqrt(25 + 81), abs=1e-14)


def test_top_expressed_l2_ties_first_in_gene_order():
    control = np.ones((2, 3))  # all genes tie
    real = control.copy()
    pred = control + np.array([1.0, 2.0, 4.0])
    assert top_expressed_l2(pred, real, control, n_genes=1) == pytest.approx(1.0)
    assert top_expressed_l2(pred, real, control, n_genes=2) == pytest.approx(np.sqrt(5.0))


def test_top_expressed_l2_matches_brute_force(rng):
    control = _zero_inflated(rng, 40, 60)
    real = _zero_inflated(rng, 35, 60, rate=0.9)
    pred = _zero_inflated(rng, 50, 60, rate=0.8)
    top = np.argsort(-control.mean(0), kind="stable")[:25]
    change_pred = pred.mean(0) - control.mean(0)
    change_real = real.mean(0) - control.mean(0)
    expected = np.linalg.norm(change_pred[top] - change_real[top])
    assert top_expressed_l2(pred, real, control, n_genes=25) == pytest.approx(expected, rel=1e-12)
    assert top_expressed_l2(sp.csr_matrix(pred), real, ad.AnnData(control), n_genes=25) == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_top_expressed_l2_rejects_bad_n(bad):
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="n_genes"):
        top_expressed_l2(x, x, x, n_genes=bad)


# --- zero_fraction_error -------------------------------------------------------------------------


def test_zero_fraction_error_hand_value():
    real = np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 3.0], [0.0, 0.0, 3.0], [0.0, 1.0, 1.0]])  # 1, 1/4, 1/4
    pred = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]])  # 1/2, 1/2, 0
    assert zero_fraction_error(pred, real) == pytest.approx((0.5 + 0.25 + 0.25) / 3, abs=1e-15)
    assert zero_fraction_error(real, real) == 0.0


def test_zero_fraction_error_sparse_stored_zeros():
    dense = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    stored = sp.csr_matrix((np.array([0.0, 1.0, 2.0]), np.array([0, 1, 0]), np.array([0, 2, 3, 3])), shape=(3, 2))
    assert stored.nnz == 3 and stored[0, 0] == 0  # an explicitly stored zero
    real = np.ones((2, 2))
    # Zero fractions 2/3 and 2/3 against none in the real cells.
    assert zero_fraction_error(stored, real) == zero_fraction_error(dense, real) == pytest.approx(2 / 3, abs=1e-15)
    assert zero_fraction_error(ad.AnnData(sp.csc_matrix(dense)), sp.csr_array(real)) == pytest.approx(2 / 3)


def test_zero_fraction_error_control_plus_shift(rng):
    """A small shift added to every gene of control cells leaves no zero: the error is the real zero fraction."""
    control = _zero_inflated(rng, 200, 50)
    real = _zero_inflated(rng, 200, 50)
    pred = control + 0.01
    expected = np.mean((real == 0).mean(axis=0))
    assert expected > 0.4
    assert zero_fraction_error(pred, real) == pytest.approx(expected, abs=1e-15)
    assert zero_fraction_error(control, real) < 0.1  # same distribution, no shift


# --- spread_ratio --------------------------------------------------------------------------------


def test_spread_ratio_hand_values(rng):
    real = rng.normal(size=(40, 8))
    assert spread_ratio(real, real) == pytest.approx(1.0, abs=1e-14)
    assert spread_ratio(2.0 * real + 3.0, real) == pytest.approx(2.0, rel=1e-13)
    assert spread_ratio(0.5 * real, real) == pytest.approx(0.5, rel=1e-13)
    # Half of the genes twice as wide, half half as wide: geometric mean 1.
    pred = real * np.array([2.0] * 4 + [0.5] * 4)
    assert spread_ratio(pred, real) == pytest.approx(1.0, rel=1e-13)
    # The mean profile repeated over cells has no spread at all.
    assert spread_ratio(np.tile(real.mean(0), (40, 1)), real) == 0.0


def test_spread_ratio_ddof_one_and_left_out_genes():
    real = np.array([[0.0, 7.0, 0.0], [2.0, 7.0, 3.0]])  # sd (ddof=1) of gene 0: sqrt(2); gene 1 constant
    pred = np.array([[0.0, 1.0, 0.0], [1.0, 5.0, 0.0], [2.0, 9.0, 0.0]])  # sd of gene 0: 1; gene 2 constant
    # Only gene 0 varies in both sets; genes 1 and 2 are left out.
    assert spread_ratio(pred, real) == pytest.approx(1 / np.sqrt(2), rel=1e-14)
    assert np.isnan(spread_ratio(pred, np.full((3, 3), 0.1)))  # no gene with real spread (0.1 is not exact)
    assert spread_ratio(np.full((3, 3), 0.1), real) == 0.0  # no predicted spread where the real cells vary
    assert np.isnan(spread_ratio(pred[:1], real))  # one cell: no spread to estimate
    dense_value = spread_ratio(pred, real)
    assert spread_ratio(sp.csr_matrix(pred), ad.AnnData(sp.csc_matrix(real))) == pytest.approx(dense_value, rel=1e-14)


def test_spread_ratio_split_halves_of_sparse_data_near_one(rng):
    """Rare genes whose non-zero values fall in one half only are left out instead of giving 0."""
    cells = np.log1p(rng.poisson(0.05, size=(100, 500)).astype(float))
    first, second = cells[::2], cells[1::2]
    one_sided = (first.std(0) > 0) != (second.std(0) > 0)
    assert one_sided.sum() > 20  # a geometric mean over all genes with real spread would be 0 or infinite
    assert spread_ratio(first, second) == pytest.approx(1.0, abs=0.1)


def test_spread_ratio_control_plus_shift_has_the_control_spread(rng):
    control = rng.normal(size=(300, 20))
    real = 1.8 * rng.normal(size=(300, 20)) + 2.0  # the perturbation widens every gene
    pred = control + (real.mean(0) - control.mean(0))  # control cells plus one shift vector
    assert spread_ratio(pred, real) == pytest.approx(spread_ratio(control, real), rel=1e-12)
    assert spread_ratio(pred, real) == pytest.approx(1 / 1.8, rel=0.05)


# --- de_agreement --------------------------------------------------------------------------------


def _scanpy_de(group, reference, alpha, tie_correct):
    import scanpy as sc

    x = np.vstack([group, reference])
    labels = pd.Categorical(["g"] * len(group) + ["r"] * len(reference))
    adata = ad.AnnData(x, obs=pd.DataFrame({"s": labels}, index=[str(i) for i in range(len(x))]))
    adata.var_names = [str(j) for j in range(x.shape[1])]
    sc.tl.rank_genes_groups(
        adata, "s", groups=["g"], reference="r", method="wilcoxon", tie_correct=tie_correct, n_genes=x.shape[1]
    )
    table = sc.get.rank_genes_groups_df(adata, group="g")
    return set(table.loc[table["pvals_adj"] < alpha, "names"].astype(int))


def _de_data(rng, n_genes=300):
    control = _zero_inflated(rng, 150, n_genes)
    real = _zero_inflated(rng, 120, n_genes)
    real[:, :30] = _zero_inflated(rng, 120, 30, rate=1.6)  # genes 0-29 go up
    pred = _zero_inflated(rng, 130, n_genes)
    pred[:, 15:45] = _zero_inflated(rng, 130, 30, rate=1.6)  # genes 15-44: half right, half wrong
    return control, real, pred


def test_de_agreement_matches_scanpy_with_tie_correction(rng):
    control, real, pred = _de_data(rng)
    got = de_agreement(pred, real, control, alpha=0.05)
    de_pred = _scanpy_de(pred, control, 0.05, tie_correct=True)
    de_real = _scanpy_de(real, control, 0.05, tie_correct=True)
    assert got["n_de_predicted"] == len(de_pred)
    assert got["n_de_real"] == len(de_real)
    assert got["de_overlap"] == pytest.approx(len(de_pred & de_real) / len(de_real), abs=1e-15)
    # The planted genes are found (and almost nothing else).
    assert set(range(30)) - de_real == set() and len(de_real) <= 33
    assert got["de_overlap"] == pytest.approx(0.5, abs=0.05)
    # scanpy's default (no tie correction) overestimates the variance of tied genes: a subset of the calls.
    default = _scanpy_de(real, control, 0.05, tie_correct=False)
    assert default <= de_real


def test_de_agreement_pvalues_equal_per_gene_scipy(rng):
    from scdoloris.metrics._de import wilcoxon_adjusted_pvalues

    control, real, _ = _de_data(rng, n_genes=60)
    real[:, 59] = 0.0
    control[:, 59] = 0.0  # constant gene: no test, p = 1
    raw = [mannwhitneyu(real[:, j], control[:, j], method="asymptotic", use_continuity=False).pvalue for j in range(59)]
    expected = false_discovery_control(np.array([*raw, 1.0]), method="bh")
    got = wilcoxon_adjusted_pvalues(sp.csc_matrix(real), sp.csc_matrix(control))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_de_agreement_control_plus_shift_calls_false_de_genes(rng):
    """A tiny shift added to control cells separates their zeros from the control's tied zeros."""
    control = _zero_inflated(rng, 200, 100)
    real = _zero_inflated(rng, 200, 100)  # no real effect
    pred = control + 0.01
    got = de_agreement(pred, real, control)
    assert got["n_de_real"] == 0
    assert np.isnan(got["de_overlap"])
    assert got["n_de_predicted"] == 100


def test_de_agreement_input_kinds_and_errors(rng):
    control, real, pred = _de_data(rng, n_genes=60)
    expected = de_agreement(pred, real, control)
    got = de_agreement(sp.csr_matrix(pred), ad.AnnData(real), sp.csc_array(control))
    assert got["n_de_predicted"] == expected["n_de_predicted"]
    assert got["n_de_real"] == expected["n_de_real"]
    assert got["de_overlap"] == pytest.approx(expected["de_overlap"])
    with pytest.raises(ValueError, match="alpha"):
        de_agreement(pred, real, control, alpha=1.5)
    with pytest.raises(ValueError, match="at least 2 cells"):
        de_agreement(pred[:1], real, control)
    with pytest.raises(ValueError, match="same number of genes"):
        de_agreement(pred[:, :5], real, control)


def test_de_agreement_is_fast(rng):
    control = _zero_inflated(rng, 1000, 2000)
    real = _zero_inflated(rng, 1000, 2000)
    start = time.perf_counter()
    de_agreement(sp.csr_matrix(real), real, control)
    assert time.perf_counter() - start < 30  # about 1-2 s on one shared core


# --- rank_metric ---------------------------------------------------------------------------------


def _conditions(rng, k=5, n_cells=30, n_genes=12):
    """Well-separated conditions: each its own random mean."""
    return {f"p{i}": rng.normal(size=(n_cells, n_genes)) + 3.0 * rng.normal(size=n_genes) for i in range(k)}


@pytest.mark.parametrize("distance", ["mse", "e_distance"])
def test_rank_metric_perfect_predictions_score_zero(rng, distance):
    real = _conditions(rng)
    pred = {c: x + rng.normal(scale=0.05, size=x.shape) for c, x in real.items()}
    ranks = rank_metric(pred, real, distance=distance)
    assert list(ranks.index) == list(real)
    assert ranks.name == "rank"
    assert (ranks == 0.0).all()


@pytest.mark.parametrize("distance", ["mse", "e_distance"])
def test_rank_metric_identical_predictions_tie_exactly(rng, distance):
    real = _conditions(rng, k=5)
    shared = rng.normal(size=(30, 12))
    ranks = rank_metric({c: shared for c in real}, real, distance=distance)
    # All distances tie: (N - 1) / (2N) = 0.4 for every condition, whatever the distances are.
    np.testing.assert_array_equal(ranks.to_numpy(), np.full(5, 0.4))
    # Copies (not the same object) tie too.
    ranks = rank_metric({c: shared.copy() for c in real}, real, distance=distance)
    np.testing.assert_array_equal(ranks.to_numpy(), np.full(5, 0.4))


def test_rank_metric_permutations_hand_values():
    line = {i: np.full((2, 1), float(i)) for i in range(4)}  # conditions at 0, 1, 2, 3 on one gene
    reversed_ = {i: line[3 - i] for i in range(4)}
    # Real 0: predictions at 3, 2, 1, 0 -> own (3) is the farthest, rank 3/4; real 1: one closer, one tie -> 1.5/4.
    np.testing.assert_array_equal(rank_metric(reversed_, line).to_numpy(), [0.75, 0.375, 0.375, 0.75])
    # Equidistant conditions, predictions cycled: one prediction is exact, all others tie with the own one.
    simplex = {i: np.eye(5)[[i, i]] for i in range(5)}
    cycled = {i: simplex[(i + 1) % 5] for i in range(5)}
    ranks = rank_metric(cycled, simplex)
    np.testing.assert_array_equal(ranks.to_numpy(), np.full(5, 0.5))  # (1 + 3 / 2) / 5, above the 0.4 of a constant
    # Two conditions swapped: the maximum, (N - 1) / N.
    two = {"a": np.zeros((3, 2)), "b": np.ones((3, 2))}
    assert rank_metric({"a": two["b"], "b": two["a"]}, two).tolist() == [0.5, 0.5]


def test_rank_metric_random_permutation_is_high(rng):
    real = _conditions(rng, k=12, n_cells=5)
    keys = list(real)
    pred = {c: real[keys[(i + 1) % 12]] for i, c in enumerate(keys)}
    ranks = rank_metric(pred, real)
    assert ranks.mean() > 0.3
    assert ranks.min() > 0.0


def test_rank_metric_e_distance_uses_e_distance(rng):
    real = {c: rng.normal(loc=i, size=(8 + i, 4)) for i, c in enumerate("abcd")}
    pred = {c: rng.normal(loc=3 - i * 0.8, size=(6, 4)) for i, c in enumerate("abcd")}
    d = np.array([[e_distance(pred[q], real[p]) for p in "abcd"] for q in "abcd"])
    own = np.diag(d)
    expected = ((d < own).sum(0) + 0.5 * ((d == own).sum(0) - 1)) / 4
    np.testing.assert_array_equal(rank_metric(pred, real, distance="e_distance").to_numpy(), expected)
    assert expected.max() > 0  # a non-trivial case


def test_rank_metric_mse_on_means_and_input_kinds(rng):
    real = _conditions(rng, k=4, n_cells=10, n_genes=6)
    pred = {c: rng.normal(size=(7, 6)) for c in real}
    means_p = {c: x.mean(0) for c, x in pred.items()}
    means_r = {c: x.mean(0) for c, x in real.items()}
    d = np.array([[np.mean((means_p[q] - means_r[p]) ** 2) for p in real] for q in real])
    own = np.diag(d)
    expected = ((d < own).sum(0) + 0.5 * ((d == own).sum(0) - 1)) / 4
    np.testing.assert_array_equal(rank_metric(pred, real).to_numpy(), expected)
    mixed = {c: (sp.csr_matrix(x) if i % 2 else ad.AnnData(x)) for i, (c, x) in enumerate(pred.items())}
    np.testing.assert_array_equal(rank_metric(mixed, real).to_numpy(), expected)


def test_rank_metric_edge_cases(rng):
    one = {"a": rng.normal(size=(3, 2))}
    ranks = rank_metric(one, one)
    assert list(ranks.index) == ["a"] and np.isnan(ranks["a"])
    real = _conditions(rng, k=3)
    with pytest.raises(ValueError, match="same conditions"):
        rank_metric({c: real[c] for c in ["p0", "p1"]}, real)
    with pytest.raises(ValueError, match="distance"):
        rank_metric(real, real, distance="pearson")
    with pytest.raises(ValueError, match="no conditions"):
        rank_metric({}, {})
    with pytest.raises(ValueError, match="same number of genes"):
        rank_metric({**real, "p2": real["p2"][:, :5]}, real)
    # Tuple labels (e.g. perturbation, cell type) stay one index level.
    tuples = {("KO", "T"): real["p0"], ("KO", "B"): real["p1"]}
    assert list(rank_metric(tuples, tuples).index) == [("KO", "T"), ("KO", "B")]
