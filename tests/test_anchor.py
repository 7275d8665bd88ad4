"""Tests of sd.baselines.Anchor: the best measured shift per condition, with calibrated fallbacks.

Hand-made data sets have exact pseudobulk means (each condition is two cells, mean +- the same
deviation), so the calibrated factors have known values; the synthetic generator checks the
behaviour on noisy single-cell data.
"""

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import scdoloris as sd
from scdoloris.baselines import Additive, Anchor, MeanShift, NoChange


def exact_adata(controls, shifts, seed=0):
    """AnnData whose pseudobulk means are exactly ``controls[t]`` and ``controls[t] + shifts[key, t]``.

    ``controls``: cell type -> control mean; ``shifts``: (label, cell type) -> shift.
    """
    rng = np.random.default_rng(seed)
    n_genes = len(next(iter(controls.values())))
    rows, labels, types = [], [], []
    conditions = [("control", t, c) for t, c in controls.items()]
    conditions += [(label, t, controls[t] + s) for (label, t), s in shifts.items()]
    for label, t, mean in conditions:
        deviation = rng.normal(0.0, 0.1, n_genes)
        rows += [mean + deviation, mean - deviation]
        labels += [label, label]
        types += [t, t]
    obs = pd.DataFrame({"perturbation": labels, "cell_type": types}, index=[f"c{i}" for i in range(len(rows))])
    return AnnData(
        np.asarray(rows, dtype=np.float64), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    )


def real_shifts(adata, labels, cell_type=None):
    lab = adata.obs["perturbation"].astype(str).to_numpy()
    keep = np.ones(adata.n_obs, bool)
    if cell_type is not None:
        keep = adata.obs["cell_type"].astype(str).to_numpy() == cell_type
    X = np.asarray(adata.X, dtype=np.float64)
    control = X[keep & (lab == "control")].mean(axis=0)
    return np.stack([X[keep & (lab == p)].mean(axis=0) - control for p in labels])


@pytest.fixture(scope="module")
def synthetic():
    return sd.datasets.synthetic_perturbations(n_genes=40, n_perturbed_genes=8, n_doubles=3, seed=0)


@pytest.fixture(scope="module")
def singles_fit(synthetic, subset_cells):
    """Anchor and Additive trained on controls and singles, minus two held-out singles."""
    held = ["G002", "G005"]
    keep = (synthetic.obs["condition_type"] != "double") & ~synthetic.obs["perturbation"].isin(held)
    train = subset_cells(synthetic, keep)
    return train, held, Anchor().fit(train), Additive().fit(train), MeanShift().fit(train)


# ---------------------------------------------------------------------- the measured answers
def test_seen_conditions_get_their_measured_shift(singles_fit):
    train, _, anchor, _, _ = singles_fit
    labels = ["G000", "G001", "U000", "U001"]
    assert [anchor.kind(p) for p in labels] == ["seen"] * 4
    np.testing.assert_allclose(anchor.predict_shift(labels).to_numpy(), real_shifts(train, labels), atol=1e-5)


def test_doubles_of_trained_singles_equal_additive(synthetic, singles_fit):
    _, held, anchor, additive, _ = singles_fit
    doubles = [p for p in synthetic.obs["perturbation"].cat.categories if "+" in p]
    doubles = [d for d in doubles if not set(d.split("+")) & set(held)]
    doubles += ["G000+G001", "G007+G003+U000", "G001+G000"]
    assert {anchor.kind(d) for d in doubles} == {"combination"}
    np.testing.assert_allclose(anchor.predict_shift(doubles).to_numpy(), additive.predict_shift(doubles).to_numpy())


def test_unseen_singles_are_shrunk_mean_shift_and_partials_add_it(singles_fit):
    _, held, anchor, additive, mean_shift = singles_fit
    assert anchor.n_lambda_ == 8  # 8 measured + 2 unmeasured genes perturbed, 2 held out
    assert 0.0 <= anchor.lambda_ <= 1.0
    assert [anchor.kind(p) for p in held] == ["unseen", "unseen"]
    expected = anchor.lambda_ * mean_shift.predict_shift(held).to_numpy()
    np.testing.assert_allclose(anchor.predict_shift(held).to_numpy(), expected)
    # A double with one trained and one unseen single: the trained shift plus the shrunk mean.
    assert anchor.kind("G000+G002") == "partial"
    expected = additive.predict_shift("G000").to_numpy() + anchor.lambda_ * mean_shift.predict_shift("G002").to_numpy()
    np.testing.assert_allclose(anchor.predict_shift("G000+G002").to_numpy(), expected)
    assert anchor.kind("G002+G005") == "unseen"
    twice = 2 * anchor.lambda_ * mean_shift.mean_shift_.loc["0"].to_numpy()
    np.testing.assert_allclose(anchor.predict_shift("G002+G005").to_numpy()[0], twice)


def _lambda_by_hand(S):
    """The documented lambda of singles ``S``: the least-squares factor, kept when it beats 1 by > 1%."""
    loo = (S.sum(axis=0) - S) / (len(S) - 1)
    fitted = np.clip(np.sum(S * loo) / np.sum(loo**2), 0, 1)
    error = {lam: np.sum((S - lam * loo) ** 2) for lam in (fitted, 1.0)}
    return (fitted if error[fitted] < 0.99 * error[1.0] else 1.0), fitted


def test_lambda_formula_by_hand(singles_fit):
    """lambda = clip(sum_i <s_i, m_-i> / sum_i ||m_-i||^2, 0, 1) over training singles, as documented."""
    _, _, anchor, _, _ = singles_fit
    kept, fitted = _lambda_by_hand(anchor.shifts_.to_numpy())  # training has singles only
    assert anchor.lambda_ == pytest.approx(kept) and kept == pytest.approx(fitted)


def test_lambda_within_one_percent_of_no_shrinkage_is_one():
    """Many perturbations with large specific effects around a shared shift: the least-squares factor
    is below 1 only by the noise of the average, which lowers its error by less than 1%."""
    rng = np.random.default_rng(3)
    common = rng.normal(size=50)
    S = common + rng.normal(0.0, 1.5, size=(150, 50))
    kept, fitted = _lambda_by_hand(S)
    assert 0.9 < fitted < 1.0 and kept == 1.0
    adata = exact_adata({"T": np.full(50, 3.0)}, {(f"P{i}", "T"): s for i, s in enumerate(S)})
    anchor = Anchor().fit(adata, cell_type_key="cell_type")
    assert anchor.lambda_ == 1.0
    np.testing.assert_allclose(anchor.predict_shift("NEW").to_numpy()[0], anchor.mean_shift_.loc["T"])


# ---------------------------------------------------------------------- lambda's known values
def test_lambda_is_zero_for_unrelated_zero_mean_shifts():
    rng = np.random.default_rng(1)
    S = rng.normal(size=(12, 50))
    S -= S.mean(axis=0)  # zero mean: the mean of the others is -s_i / 11, anti-correlated with s_i
    adata = exact_adata({"T": np.full(50, 3.0)}, {(f"P{i}", "T"): s for i, s in enumerate(S)})
    anchor = Anchor().fit(adata, cell_type_key="cell_type")
    assert anchor.lambda_ == 0.0 and anchor.n_lambda_ == 12
    np.testing.assert_allclose(anchor.predict_shift("NEW").to_numpy(), 0.0)  # no change


def test_lambda_is_one_for_a_shared_shift():
    rng = np.random.default_rng(2)
    common = rng.normal(size=50)
    shifts = {(f"P{i}", "T"): common + rng.normal(0.0, 0.05, 50) for i in range(12)}
    anchor = Anchor().fit(exact_adata({"T": np.full(50, 3.0)}, shifts), cell_type_key="cell_type")
    assert anchor.lambda_ > 0.99
    np.testing.assert_allclose(anchor.predict_shift("NEW").to_numpy()[0], common, atol=0.05)


def test_lambda_defaults_to_one_without_singles():
    shifts = {("A+B", "T"): np.ones(5), ("C+D", "T"): -np.ones(5)}
    anchor = Anchor().fit(exact_adata({"T": np.full(5, 3.0)}, shifts))
    assert anchor.lambda_ == 1.0 and anchor.n_lambda_ == 0


# ---------------------------------------------------------------------- gamma and the transfer
def _cell_type_data(shift_of, n_keys=10, n_types=3, n_genes=200, seed=0):
    """Keys measured in ``n_types`` cell types plus cell type ``"new"`` with controls only."""
    rng = np.random.default_rng(seed)
    controls = {f"T{j}": rng.uniform(2.0, 6.0, n_genes) for j in range(n_types)}
    controls["new"] = rng.uniform(2.0, 6.0, n_genes)
    shifts = {(f"P{i}", f"T{j}"): shift_of(i, j, controls) for i in range(n_keys) for j in range(n_types)}
    return exact_adata(controls, shifts, seed), controls


def test_gamma_is_one_for_shifts_shared_across_cell_types():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(10, 200))
    adata, _ = _cell_type_data(lambda i, j, c: base[i])
    anchor = Anchor().fit(adata, cell_type_key="cell_type")
    assert anchor.gamma_ == pytest.approx(1.0) and anchor.n_gamma_ == 30
    assert anchor.transfer_ == "mean"  # nothing left for the per-gene refinement to explain
    assert np.all(anchor.beta_ == 0.0) and anchor.ridge_ is None
    assert anchor.kind("P3", "new") == "new_cell_type" and anchor.kind("P3", "T0") == "seen"
    pred = anchor.predict_shift(["P3", "P1+P2", "NEW"], cell_type="new").to_numpy()
    np.testing.assert_allclose(pred[0], base[3], atol=1e-10)
    np.testing.assert_allclose(pred[1], base[1] + base[2], atol=1e-10)  # components transferred, additively
    overall = anchor.overall_shift_.to_numpy()
    np.testing.assert_allclose(pred[2], anchor.lambda_ * anchor.gamma_ * overall, atol=1e-10)


def test_gamma_is_zero_for_cell_type_specific_shifts():
    rng = np.random.default_rng(4)
    specific = rng.normal(size=(10, 3, 200))
    adata, _ = _cell_type_data(lambda i, j, c: specific[i, j])
    anchor = Anchor().fit(adata, cell_type_key="cell_type")
    assert anchor.gamma_ < 0.05 and anchor.n_gamma_ == 30
    assert anchor.transfer_ == "mean"  # control levels say nothing about independent responses
    assert np.abs(anchor.predict_shift("P3", cell_type="new").to_numpy()).max() < 0.2  # ~ no change


def test_gamma_defaults_with_one_perturbed_cell_type():
    controls = {"A": np.full(5, 3.0), "B": np.full(5, 4.0)}
    adata = exact_adata(controls, {("P", "A"): np.arange(5.0), ("Q", "A"): -np.ones(5)})
    for default in [1.0, 0.0]:
        anchor = Anchor(default_gamma=default).fit(adata, cell_type_key="cell_type")
        assert anchor.gamma_ == default and anchor.n_gamma_ == 0 and anchor.transfer_ == "mean"
        np.testing.assert_allclose(anchor.predict_shift("P", cell_type="B").to_numpy()[0], default * np.arange(5.0))


def test_per_gene_transfer_recovers_a_planted_beta():
    rng = np.random.default_rng(5)
    n_genes, n_types = 100, 6
    base = rng.normal(0.0, 1.0, size=(8, n_genes))
    beta = rng.normal(0.0, 0.5, n_genes)

    def shift_of(i, j, controls):
        mean_control = np.mean([controls[f"T{k}"] for k in range(n_types)], axis=0)
        return base[i] + beta * (controls[f"T{j}"] - mean_control)

    adata, controls = _cell_type_data(shift_of, n_keys=8, n_types=n_types, n_genes=n_genes, seed=5)
    anchor = Anchor().fit(adata, cell_type_key="cell_type")
    assert anchor.transfer_ == "per_gene" and anchor.ridge_ > 0
    assert anchor.transfer_errors_["per_gene"] < 0.1 * anchor.transfer_errors_["mean"]
    assert anchor.n_transfer_ == 8 * n_types
    assert np.corrcoef(anchor.beta_.to_numpy(), beta)[0, 1] > 0.99
    np.testing.assert_allclose(anchor.beta_.to_numpy(), beta, atol=0.1)
    # The new cell type: its own controls say how each gene's response differs there.
    mean_control = np.mean([controls[f"T{k}"] for k in range(n_types)], axis=0)
    truth = base[2] + beta * (controls["new"] - mean_control)
    pred = anchor.predict_shift("P2", cell_type="new").to_numpy()[0]
    plain = anchor.gamma_ * base[2]
    assert np.sum((pred - truth) ** 2) < 0.2 * np.sum((plain - truth) ** 2)


def test_similar_cell_types_weigh_more_in_the_transfer():
    """Two lineages with distinct control profiles respond in opposite ways: a new cell type whose
    controls sit in lineage A gets A's response, not the (near zero) average of both lineages."""
    rng = np.random.default_rng(7)
    n_genes, n_keys = 60, 6
    profile = {"A": rng.uniform(2.0, 6.0, n_genes), "B": rng.uniform(2.0, 6.0, n_genes)}
    response = rng.normal(size=(n_keys, n_genes))
    controls = {f"{g}{j}": profile[g] + rng.normal(0.0, 0.1, n_genes) for g in "AB" for j in range(3)}
    controls["newA"] = profile["A"] + rng.normal(0.0, 0.1, n_genes)
    sign = {"A": 1.0, "B": -1.0}
    shifts = {(f"P{i}", t): sign[t[0]] * response[i] for i in range(n_keys) for t in controls if t != "newA"}
    anchor = Anchor().fit(exact_adata(controls, shifts, 7), cell_type_key="cell_type")
    assert anchor.bandwidth_ is not None and anchor.gamma_ > 0.95
    assert anchor.bandwidth_errors_[anchor.bandwidth_] < 0.05 * anchor.bandwidth_errors_[None]
    pred = anchor.predict_shift(["P2", "NEW"], cell_type="newA").to_numpy()
    np.testing.assert_allclose(pred[0], response[2], atol=0.05)
    # A component measured nowhere: the average shift of the lineage, not of all cell types.
    lineage = np.mean(response, axis=0)
    np.testing.assert_allclose(pred[1], anchor.lambda_ * anchor.gamma_ * lineage, atol=0.05)
    restored = Anchor.from_state(anchor.state())
    assert restored.bandwidth_ == anchor.bandwidth_
    np.testing.assert_array_equal(restored.predict_shift(["P2", "NEW"], cell_type="newA").to_numpy(), pred)
    # States written before the weighting existed (no "bandwidth") transfer plain averages.
    old = {k: v for k, v in anchor.state().items() if k != "bandwidth"}
    assert Anchor.from_state(old).bandwidth_ is None


def _spread_adata():
    """Cell types A and B; gene 0 at 1..5 in every control, perturbed ``P`` spreads it (2, 4, .., 10 in
    A; 0.5 x that in B), ``Q`` only in A (1..5 doubled about 3: its change is the sources' sd); gene 1
    expressed by too few cells anywhere."""
    rows, labels, types = [], [], []
    base = np.arange(1.0, 6.0)
    cells = {
        ("control", "A"): base,
        ("control", "B"): base,
        ("P", "A"): 2.0 * base,
        ("P", "B"): 3.0 + 0.5 * (2.0 * base - 6.0),  # sd 1.41, as the controls: no change in B
        ("Q", "A"): 3.0 + 2.0 * (base - 3.0),
    }
    for (label, t), values in cells.items():
        for i, v in enumerate(values):
            rows.append([v, 1.0 if i == 0 else 0.0])
            labels.append(label)
            types.append(t)
    obs = pd.DataFrame({"perturbation": labels, "cell_type": types}, index=[f"c{i}" for i in range(len(rows))])
    return AnnData(np.asarray(rows), obs=obs, var=pd.DataFrame(index=["g0", "g1"]))


def test_spread_change_takes_the_most_specific_measured_spread():
    anchor = Anchor().fit(_spread_adata(), cell_type_key="cell_type")
    sd0 = np.sqrt(2.0)  # the standard deviation of 1..5
    change, level = anchor.spread_change("P", "A")  # seen: its own
    assert change[0] == pytest.approx(sd0) and level[0] == pytest.approx(2.0 * sd0)
    assert np.isnan(change[1]) and np.isnan(level[1])  # one nonzero value per condition: never measured
    change, level = anchor.spread_change("P", "B")
    assert change[0] == pytest.approx(0.0, abs=1e-12) and level[0] == pytest.approx(sd0)
    # A perturbation never trained in A: the average over A's perturbed conditions (P and Q).
    change, _ = anchor.spread_change("NEW", "A")
    assert change[0] == pytest.approx(sd0)
    restored = Anchor.from_state(anchor.state())
    np.testing.assert_array_equal(restored.spread_change("NEW", "A")[0], anchor.spread_change("NEW", "A")[0])
    # States written before spreads were kept, and an Anchor fitted without them: nothing known.
    old = {k: v for k, v in anchor.state().items() if k not in ("expressed_sd", "control_expressed_sd")}
    assert np.isnan(Anchor.from_state(old).spread_change("P", "A")[0]).all()
    lean = Anchor(spread=False).fit(_spread_adata(), cell_type_key="cell_type")
    assert lean.expressed_sd_ is None and np.isnan(lean.spread_change("P", "A")[0]).all()
    np.testing.assert_array_equal(lean.predict_shift(["P"], cell_type="A"), anchor.predict_shift(["P"], cell_type="A"))
    assert Anchor.from_state(lean.state()).spread is False


def test_spread_change_in_a_new_cell_type_weighs_the_cell_types_measured():
    import anndata as ad

    adata = _spread_adata()
    new = adata[adata.obs["perturbation"] == "control"].copy()
    new.obs["cell_type"] = "C"
    new.obs_names = [f"n{i}" for i in range(new.n_obs)]
    anchor = Anchor().fit(ad.concat([adata, new]), cell_type_key="cell_type")
    assert anchor.bandwidth_ is None  # two perturbed cell types: equal weights
    change, _ = anchor.spread_change("P", "C")  # P measured in A (+sd0) and B (0): their average
    assert change[0] == pytest.approx(0.5 * np.sqrt(2.0))
    change, _ = anchor.spread_change("NEW", "C")  # never measured: every perturbed condition (P, P, Q)
    assert change[0] == pytest.approx(np.sqrt(2.0) * 2.0 / 3.0)


# ---------------------------------------------------------------------- kinds, state, validation
def test_kind_answers_each_case():
    controls = {"A": np.full(4, 3.0), "B": np.full(4, 3.0)}
    shifts = {("X", "A"): np.ones(4), ("Y", "A"): -np.ones(4), ("X+Y", "A"): np.zeros(4)}
    anchor = Anchor().fit(exact_adata(controls, shifts), cell_type_key="cell_type")
    cases = {"X": "seen", "Y+X": "seen", "X+Y+control": "seen", "X+Z": "partial", "Z": "unseen", "Z+W": "unseen"}
    assert {p: anchor.kind(p, "A") for p in cases} == cases
    assert {anchor.kind(p, "B") for p in cases} == {"new_cell_type"}
    single = Anchor().fit(exact_adata({"A": np.full(4, 3.0)}, {("X", "A"): np.ones(4), ("Y", "A"): -np.ones(4)}))
    assert single.kind("X+Y") == "combination"
    with pytest.raises(ValueError, match="Name the cell type"):
        anchor.kind("X")
    with pytest.raises(ValueError, match="not seen in training"):
        anchor.kind("X", "C")
    with pytest.raises(ValueError, match="control labels"):
        anchor.kind("control", "A")


def _plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(isinstance(v, str | float | int) for v in value)
    return value is None or isinstance(value, str | bool | int | float | np.ndarray)


def test_state_round_trip_gives_identical_predictions(subset_cells):
    rng = np.random.default_rng(6)
    base, beta = rng.normal(size=(6, 30)), rng.normal(0.0, 0.5, 30)

    def shift_of(i, j, controls):
        return base[i] + beta * (controls[f"T{j}"] - np.mean([controls[f"T{k}"] for k in range(4)], axis=0))

    adata, _ = _cell_type_data(shift_of, n_keys=6, n_types=4, n_genes=30, seed=6)
    adata = subset_cells(adata, ~((adata.obs["perturbation"] == "P5") & (adata.obs["cell_type"] == "T0")).to_numpy())
    anchor = Anchor().fit(adata, cell_type_key="cell_type")
    assert anchor.transfer_ == "per_gene"
    state = anchor.state()
    assert _plain(state)
    labels = ["P0", "P1+P2", "P5", "P0+NEW", "NEW"]
    kinds = {anchor.kind(p, t) for p in labels for t in anchor.cell_types_}
    assert kinds == {"seen", "combination", "partial", "unseen", "new_cell_type"}

    restored = Anchor.from_state(state)
    pd.testing.assert_frame_equal(restored.predict_shift(labels), anchor.predict_shift(labels), check_exact=True)
    assert [restored.kind(p, "T0") for p in labels] == [anchor.kind(p, "T0") for p in labels]
    assert (restored.lambda_, restored.gamma_, restored.transfer_) == (anchor.lambda_, anchor.gamma_, "per_gene")
    with pytest.raises(ValueError, match="restored without its training data"):
        restored.predict("P0")
    # With the training data, cells too: the same control draw, the same shift.
    attached = Anchor.from_state({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in state.items()}, adata)
    a, b = anchor.predict(labels, n_cells=7, seed=3), attached.predict(labels, n_cells=7, seed=3)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.obs.equals(b.obs)
    with pytest.raises(ValueError, match="not an Anchor state"):
        Anchor.from_state({"format": "something else"})


def test_fit_needs_perturbed_conditions():
    controls_only = exact_adata({"T": np.full(3, 1.0)}, {})
    with pytest.raises(ValueError, match="at least one perturbed"):
        Anchor().fit(controls_only)
    with pytest.raises(ValueError, match="default_gamma"):
        Anchor(default_gamma=2.0)
    assert repr(Anchor()) == "Anchor(clip=True, default_gamma=1.0, spread=True) [not fitted]"


# ---------------------------------------------------------------------- honest held-out comparison
def test_unseen_singles_error_is_no_worse_than_mean_shift_or_no_change(subset_cells):
    """Held-out singles of synthetic data: mean squared shift error over all held-out conditions of
    six random splits (the same splits and truths for every baseline)."""
    errors = {"Anchor": [], "MeanShift": [], "NoChange": []}
    for seed in range(6):
        adata = sd.datasets.synthetic_perturbations(n_genes=60, n_perturbed_genes=24, n_doubles=0, seed=seed)
        singles = [p for p in adata.obs["perturbation"].cat.categories if p != "control"]
        held = list(np.random.default_rng(seed).choice(singles, size=len(singles) // 3, replace=False))
        train = subset_cells(adata, ~adata.obs["perturbation"].isin(held))
        truth = real_shifts(adata, held)
        for model in [Anchor, MeanShift, NoChange]:
            pred = model().fit(train).predict_shift(held).to_numpy()
            errors[model.__name__] += list(((pred - truth) ** 2).sum(axis=1))
    mean = {name: float(np.mean(e)) for name, e in errors.items()}
    assert mean["Anchor"] <= mean["MeanShift"] and mean["Anchor"] <= mean["NoChange"], mean


def test_new_cell_type_error_is_no_worse_than_mean_shift_or_no_change(subset_cells):
    """Synthetic responses are shared by cell types: transferring them to a cell type seen only as
    controls beats both simple answers (gamma is calibrated on the two perturbed cell types)."""
    for seed in range(2):
        adata = sd.datasets.synthetic_perturbations(n_cell_types=3, n_doubles=2, seed=seed)
        is_new = (adata.obs["cell_type"] == "ct2") & (adata.obs["perturbation"] != "control")
        train = subset_cells(adata, ~is_new.to_numpy())
        labels = [p for p in adata.obs["perturbation"].cat.categories if p != "control"]
        truth = real_shifts(adata, labels, "ct2")
        errors = {}
        for model in [Anchor, MeanShift, NoChange]:
            fitted = model().fit(train, cell_type_key="cell_type")
            errors[model.__name__] = float(
                ((fitted.predict_shift(labels, cell_type="ct2").to_numpy() - truth) ** 2).sum(axis=1).mean()
            )
        anchor = Anchor().fit(train, cell_type_key="cell_type")
        assert {anchor.kind(p, "ct2") for p in labels} == {"new_cell_type"}
        assert 0.0 < anchor.gamma_ < 1.0 and anchor.n_gamma_ == 2 * len(labels)
        assert errors["Anchor"] < min(errors["MeanShift"], errors["NoChange"]), errors


# ---------------------------------------------------------------------- doses
def _dosed_data(seed=0, n_drugs=12, n_genes=60):
    """Drugs ``D<i>@<dose>`` in two cell types: a shared response plus a drug-specific one that grows
    with dose (Hill curve, drug's own EC50) and is scaled per cell type. Returns data and truth."""
    rng = np.random.default_rng(seed)
    controls = {t: rng.uniform(2.0, 5.0, n_genes) for t in ("T0", "T1")}
    common = rng.normal(0.0, 0.3, n_genes)
    direction = rng.normal(0.0, 1.0, size=(n_drugs, n_genes))
    ec50 = 10.0 ** rng.uniform(1.5, 3.5, n_drugs)
    sensitivity = {"T0": 1.0, "T1": 0.7}
    truth = {}
    for i in range(n_drugs):
        for dose in (10.0, 100.0, 1000.0, 10000.0):
            hill = dose / (dose + ec50[i])
            for t in controls:
                truth[(f"D{i}@{dose:g}", t)] = common + hill * sensitivity[t] * direction[i]
    return controls, truth


def test_a_held_out_dose_is_estimated_from_the_drugs_other_doses_and_cell_types():
    controls, truth = _dosed_data()
    held = [("D3@100", "T0"), ("D5@10", "T1"), ("D7@10000", "T0")]
    train = exact_adata(controls, {k: v for k, v in truth.items() if k not in held})
    anchor, mean = Anchor().fit(train, cell_type_key="cell_type"), MeanShift().fit(train, cell_type_key="cell_type")
    errors = {"anchor": [], "mean_shift": []}
    for label, t in held:
        assert anchor.kind(label, t) == "related"
        for name, model in [("anchor", anchor), ("mean_shift", mean)]:
            estimate = model.predict_shift([label], cell_type=t).to_numpy()[0]
            errors[name].append(np.sum((estimate - truth[label, t]) ** 2))
    # The drug's own response, measured at other doses and in the other cell type, is most of it.
    assert all(a < m for a, m in zip(errors["anchor"], errors["mean_shift"], strict=True)), errors
    assert sum(errors["anchor"]) < 0.2 * sum(errors["mean_shift"]), errors
    assert list(anchor.dose_weights_.columns) == [
        "dose",
        "lower_dose",
        "higher_dose",
        "cell_type",
        "population",
        "average",
    ]
    assert (anchor.dose_weights_.to_numpy() >= 0).all() and (anchor.n_dose_ >= 3).all()
    # A drug measured nowhere is any unseen perturbation: lambda times the cell type's mean shift.
    assert anchor.kind("NEW@100", "T0") == "unseen"
    np.testing.assert_allclose(
        anchor.predict_shift(["NEW@100"], cell_type="T0").to_numpy()[0], anchor.lambda_ * anchor.mean_shift_.loc["T0"]
    )


def test_dose_weights_fall_back_to_the_plain_average_without_dose_structure():
    """Responses that do not depend on the drug: the drug's other doses carry nothing beyond the average,
    so every pattern answers with the plain average (MeanShift's answer)."""
    rng = np.random.default_rng(4)
    common = rng.normal(size=40)
    shifts = {(f"D{i}@{d:g}", "T"): common + rng.normal(0.0, 0.3, 40) for i in range(15) for d in (10.0, 100.0)}
    anchor = Anchor().fit(exact_adata({"T": np.full(40, 3.0)}, shifts), cell_type_key="cell_type")
    weights = anchor.dose_weights_
    assert len(weights) and (weights["average"] == 1.0).all()
    assert (weights.drop(columns="average") == 0.0).all().all()


def test_dose_weights_travel_in_the_state_and_old_states_load():
    controls, truth = _dosed_data(seed=1)
    train = exact_adata(controls, {k: v for k, v in truth.items() if k != ("D2@1000", "T1")})
    anchor = Anchor().fit(train, cell_type_key="cell_type")
    state = anchor.state()
    assert _plain(state) and state["dose_patterns"]
    restored = Anchor.from_state(state)
    pd.testing.assert_frame_equal(
        restored.predict_shift(["D2@1000"], cell_type="T1"), anchor.predict_shift(["D2@1000"], cell_type="T1")
    )
    old = {k: v for k, v in state.items() if k not in ("dose_patterns", "dose_weights", "n_dose")}
    before = Anchor.from_state(old)  # written before doses were estimated: an unseen condition, as then
    assert before.kind("D2@1000", "T1") == "unseen"
    np.testing.assert_allclose(
        before.predict_shift(["D2@1000"], cell_type="T1").to_numpy()[0], before.lambda_ * before.mean_shift_.loc["T1"]
    )


def test_one_dosed_condition_per_cell_type_fits_without_dose_weights():
    """Nothing to hold out against: no pattern is fitted, and the drug elsewhere is an unseen one."""
    shifts = {("D0@10", "T0"): np.ones(5), ("D1@100", "T1"): -np.ones(5)}
    anchor = Anchor().fit(
        exact_adata({"T0": np.full(5, 3.0), "T1": np.full(5, 2.0)}, shifts), cell_type_key="cell_type"
    )
    assert anchor.dose_weights_.empty
    assert anchor.kind("D0@100", "T0") == "unseen"
