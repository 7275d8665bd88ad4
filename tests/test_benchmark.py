"""Seeded splits and the benchmark runner."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scdoloris as sd


@pytest.fixture(scope="module")
def norman():
    return sd.datasets.norman2019_subset()


@pytest.fixture(scope="module")
def synthetic():
    return sd.datasets.synthetic_perturbations(n_genes=30, n_perturbed_genes=6, n_doubles=3, seed=0)


def _labels(adata, mask=None):
    labels = adata.obs["perturbation"].astype(str)
    return set(labels if mask is None else labels[mask])


def test_singles_to_doubles(norman):
    k562 = norman[(norman.obs["cell_type"] == "k562").to_numpy()]
    split = sd.benchmark.singles_to_doubles(k562, cell_type_key="cell_type")
    trained = _labels(k562, split.train)
    assert "control" in trained and not any("+" in p for p in trained) and len(trained) == 19
    assert len(split.test) == 15 and split.test["perturbation"].str.contains("+", regex=False).all()
    assert set(split.test["cell_type"]) == {"k562"}
    train = split.train_data(k562)
    assert train.n_obs == int(split.train.sum()) and "KLF1+MAP2K6" not in train.obs["perturbation"].cat.categories
    assert split.cells(k562, "KLF1+MAP2K6", "k562").n_obs == 100
    assert split.controls(k562, "k562").n_obs == 100


def test_unseen_perturbations_seeded(synthetic):
    a = sd.benchmark.unseen_perturbations(synthetic, fraction=0.3, seed=0)
    b = sd.benchmark.unseen_perturbations(synthetic, fraction=0.3, seed=0)
    c = sd.benchmark.unseen_perturbations(synthetic, fraction=0.3, seed=1)
    pd.testing.assert_frame_equal(a.test, b.test)
    assert list(a.test["perturbation"]) != list(c.test["perturbation"])
    singles = {p for p in _labels(synthetic) if p != "control" and "+" not in p}
    held_out = set(a.test["perturbation"])
    assert len(held_out) == round(0.3 * len(singles)) and held_out <= singles
    trained = _labels(synthetic, a.train)
    # No held-out perturbation is trained, nor any combination (it could contain one).
    assert not trained & held_out and not any("+" in p for p in trained) and "control" in trained
    assert trained | held_out == singles | {"control"}


def test_unseen_cell_type_keeps_its_controls(norman):
    mcfaline = norman[(norman.obs["dataset"] == "mcfaline23").to_numpy()]
    split = sd.benchmark.unseen_cell_type(mcfaline, "A172", cell_type_key="cell_type")
    train = split.train_data(mcfaline)
    a172 = train.obs["cell_type"] == "A172"
    assert set(train.obs.loc[a172, "perturbation"].astype(str)) == {"control"}
    assert set(split.test["cell_type"]) == {"A172"} and len(split.test) == 9
    other = train[~a172.to_numpy()]
    assert set(split.test["perturbation"]) <= set(other.obs["perturbation"].astype(str))


def test_unseen_cell_type_on_kang():
    kang = sd.datasets.kang2018_subset()
    split = sd.benchmark.unseen_cell_type(kang, "CD4T", perturbation_key="condition", cell_type_key="cell_type")
    assert split.test.to_dict("records") == [{"perturbation": "stimulated", "cell_type": "CD4T"}]
    train = kang[split.train]
    assert not ((train.obs["cell_type"] == "CD4T") & (train.obs["condition"] == "stimulated")).any()
    assert ((train.obs["cell_type"] == "CD4T") & (train.obs["condition"] == "control")).sum() == 278


def test_split_errors(synthetic):
    with pytest.raises(ValueError, match="fraction"):
        sd.benchmark.unseen_perturbations(synthetic, fraction=1.5)
    with pytest.raises(ValueError, match="nope"):
        sd.benchmark.unseen_cell_type(synthetic, "nope")
    singles_only = synthetic[~synthetic.obs["perturbation"].astype(str).str.contains("+", regex=False).to_numpy()]
    with pytest.raises(ValueError, match="combination"):
        sd.benchmark.singles_to_doubles(singles_only)
    with pytest.raises(KeyError, match="missing"):
        sd.benchmark.singles_to_doubles(synthetic, perturbation_key="missing")


# ---------------------------------------------------------------------------------------- runner
@pytest.fixture(scope="module")
def result(synthetic, small_model_kwargs):
    split = sd.benchmark.singles_to_doubles(synthetic, cell_type_key="cell_type")
    methods = sd.benchmark.default_methods(
        model_kwargs=small_model_kwargs, train_kwargs={"max_steps": 30}, gene_graph=synthetic.uns["synthetic"]["edges"]
    )
    return sd.benchmark.run_benchmark(synthetic, split, methods, seeds=(0, 1), n_cells=20, progress=False)


def test_runner_scores_every_method_condition_and_seed(result):
    scores = result.scores
    assert set(scores["method"]) == {
        "doloris",
        "doloris_paper",
        "anchor",
        "no_change",
        "mean_shift",
        "additive",
        "linear",
    }
    assert set(scores["seed"]) == {0, 1}
    assert set(scores["gene_set"]) == {"all", "DE20"}  # 30 genes: no top 40
    assert set(scores["metric"]) == set(sd.benchmark._scoring.DEFAULT_METRICS)
    per_method = scores.groupby("method").size()
    assert per_method.nunique() == 1  # every method scored on every condition, seed, gene set and metric
    assert len(result.failures) == 0
    # nan only where a metric is undefined: a zero change's cosine, an overlap with no real DE gene.
    undefined = scores["metric"].isin(["cosine_delta", "de_overlap"])
    assert np.isfinite(scores.loc[~undefined, "value"]).all()
    # The field's statements about all genes are made on all genes only; the rank, across the 3 doubles.
    for metric in ("top_expressed_l2", "de_overlap", "rank_mse", "rank_e_distance"):
        assert set(scores.loc[scores["metric"] == metric, "gene_set"]) == {"all"}
    ranks = scores[scores["metric"].str.startswith("rank_")]
    assert ranks["value"].between(0, 2 / 3).all()  # N = 3 conditions: at most (N - 1) / N
    mean_shift = ranks[ranks["method"] == "mean_shift"]
    assert np.allclose(mean_shift["value"], 1 / 3)  # one prediction for all: (N - 1) / (2N), no better than chance


def test_runner_summary_and_markdown(result):
    summary = result.summary()
    row = summary[
        (summary["method"] == "no_change") & (summary["metric"] == "e_distance") & (summary["gene_set"] == "all")
    ]
    values = result.scores.query("method == 'no_change' and metric == 'e_distance' and gene_set == 'all'")["value"]
    assert float(row["mean"].iloc[0]) == pytest.approx(values.mean()) and int(row["count"].iloc[0]) == 6
    text = result.to_markdown()
    assert "| doloris |" in text and "± " in text and "singles_to_doubles" in text
    wins = result.wins()
    assert (
        set(wins.index) == {"doloris_paper", "anchor", "no_change", "mean_shift", "additive", "linear"}
        and ((wins >= 0) & (wins <= 1)).all()
    )


def test_runner_matches_direct_metric(result, synthetic):
    """The runner's no-change E-distance equals a direct computation on the same control draw."""
    split = sd.benchmark.singles_to_doubles(synthetic, cell_type_key="cell_type")
    perturbation = split.test["perturbation"].iloc[0]
    baseline = sd.baselines.NoChange().fit(
        split.train_data(synthetic), perturbation_key="perturbation", control_value="control", cell_type_key="cell_type"
    )
    predicted = baseline.predict([perturbation], cell_type="ct0", n_cells=20, seed=0)
    expected = sd.metrics.e_distance(predicted.X, split.cells(synthetic, perturbation, "ct0").X)
    got = result.scores.query(
        "method == 'no_change' and seed == 0 and perturbation == @perturbation and metric == 'e_distance' "
        "and gene_set == 'all'"
    )["value"]
    assert float(got.iloc[0]) == pytest.approx(expected)


# ------------------------------------------------------------------- floor and centred correlation
NEW_METRICS = ("e_distance_floor", "e_distance_excess", "pearson_delta_centred")


def _wide(scores):
    index = ["method", "seed", "perturbation", "cell_type", "gene_set"]
    return scores.pivot_table(index=index, columns="metric", values="value", dropna=False)


def test_runner_reports_floor_excess_and_centred_correlation(result, synthetic):
    scores = result.scores
    for gene_set in ("all", "DE20"):
        assert set(NEW_METRICS) <= set(scores.loc[scores["gene_set"] == gene_set, "metric"])
    wide = _wide(scores)
    np.testing.assert_allclose(wide["e_distance_excess"], wide["e_distance"] - wide["e_distance_floor"], atol=1e-12)
    # The floor depends on the condition and gene set only (every method predicts 20 cells) ...
    floors = wide["e_distance_floor"].groupby(["seed", "perturbation", "cell_type", "gene_set"]).nunique()
    assert (floors == 1).all()
    # ... and is sd.metrics.e_distance_floor of the real cells.
    split = sd.benchmark.singles_to_doubles(synthetic, cell_type_key="cell_type")
    perturbation = split.test["perturbation"].iloc[0]
    real = split.cells(synthetic, perturbation, "ct0")
    expected = sd.metrics.e_distance_floor(real.X, n_predicted=20)
    assert wide.loc[("doloris", 0, perturbation, "ct0", "all"), "e_distance_floor"] == pytest.approx(expected)
    # The tables show the new columns; wins() works on them.
    text = result.to_markdown()
    assert all(f"| {name} |" in text or f" {name} " in text for name in NEW_METRICS)
    assert "genes: DE20" in text
    for metric in ("e_distance_excess", "pearson_delta_centred"):
        wins = result.wins(metric=metric, gene_set="DE20")
        assert set(wins.index) == {"doloris_paper", "anchor", "no_change", "mean_shift", "additive", "linear"}
        assert ((wins >= 0) & (wins <= 1)).all()


def test_runner_centred_correlation_uses_the_mean_shift(result, synthetic):
    """pearson_delta_centred equals pearson_delta from control shifted by MeanShift's average training shift."""
    split = sd.benchmark.singles_to_doubles(synthetic, cell_type_key="cell_type")
    train = split.train_data(synthetic)
    shift = (
        sd.baselines.MeanShift()
        .fit(train, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
        .predict_shift(["anything"], cell_type="ct0")
        .iloc[0]
    )
    perturbation = split.test["perturbation"].iloc[0]
    predicted = (
        sd.baselines.NoChange()
        .fit(train, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
        .predict([perturbation], cell_type="ct0", n_cells=20, seed=0)
    )
    real = split.cells(synthetic, perturbation, "ct0")
    control = split.controls(synthetic, "ct0")
    expected = sd.metrics.pearson_delta(predicted.X, real.X, control.X + shift.to_numpy())
    got = result.scores.query(
        "method == 'no_change' and seed == 0 and perturbation == @perturbation and gene_set == 'all' "
        "and metric == 'pearson_delta_centred'"
    )["value"]
    assert float(got.iloc[0]) == pytest.approx(expected)


@pytest.fixture(scope="module")
def condition(synthetic):
    """One held-out double: its real cells, controls and the average training shift (a Series over genes)."""
    split = sd.benchmark.singles_to_doubles(synthetic, cell_type_key="cell_type")
    perturbation = split.test["perturbation"].iloc[0]
    real = split.cells(synthetic, perturbation, "ct0")
    control = split.controls(synthetic, "ct0")
    shift = (
        sd.baselines.MeanShift()
        .fit(split.train_data(synthetic), perturbation_key="perturbation", cell_type_key="cell_type")
        .predict_shift([perturbation], cell_type="ct0")
        .iloc[0]
    )
    gene_sets = {"all": None, "first10": list(synthetic.var_names[:10])}
    return real, control, shift, gene_sets


def _values(rows):
    return {(row["gene_set"], row["metric"]): row["value"] for row in rows}


def test_real_cells_as_their_own_prediction(condition):
    real, control, shift, gene_sets = condition
    values = _values(sd.benchmark.score_condition(real, real, control, gene_sets, reference_shift=shift))
    for gene_set in gene_sets:
        assert values[(gene_set, "e_distance")] == pytest.approx(0.0, abs=1e-9)
        assert values[(gene_set, "e_distance_floor")] > 0
        # V-statistic of the same cells: 0 minus the floor.
        assert values[(gene_set, "e_distance_excess")] <= 0
        assert values[(gene_set, "e_distance_excess")] == pytest.approx(-values[(gene_set, "e_distance_floor")])
        assert values[(gene_set, "pearson_delta_centred")] == pytest.approx(1.0)
    # The shift may also be given as an array over the genes of `real`.
    rows = sd.benchmark.score_condition(
        real, real, control, gene_sets, metric_names=["pearson_delta_centred"], reference_shift=shift.to_numpy()
    )
    assert [row["value"] for row in rows] == pytest.approx([1.0, 1.0])


def test_control_plus_average_shift_has_no_specific_part(condition):
    """A prediction equal to control + the average training shift has no perturbation-specific shift."""
    real, control, shift, gene_sets = condition
    x = np.asarray(control.X, dtype=np.float64) + shift.to_numpy()
    predicted = ad.AnnData(x, var=control.var)
    values = _values(sd.benchmark.score_condition(predicted, real, control, gene_sets, reference_shift=shift))
    for gene_set in gene_sets:
        centred = values[(gene_set, "pearson_delta_centred")]
        assert np.isnan(centred) or abs(centred) < 1e-6
        assert np.isfinite(values[(gene_set, "pearson_delta")])  # uncentred, it still gets the average shift


def test_score_condition_metric_selection_and_floor_cache(condition):
    real, control, shift, gene_sets = condition
    rows = sd.benchmark.score_condition(real, real, control, gene_sets, metric_names=["e_distance_excess"])
    assert [(row["gene_set"], row["metric"]) for row in rows] == [
        ("all", "e_distance_excess"),
        ("first10", "e_distance_excess"),
    ]
    # Without a reference shift the centred correlation is undefined.
    rows = sd.benchmark.score_condition(real, real, control, gene_sets, metric_names=["pearson_delta_centred"])
    assert all(np.isnan(row["value"]) for row in rows)
    # The floor is computed once per (gene set, number of predicted cells) and then read from the cache.
    cache: dict = {}
    first = _values(sd.benchmark.score_condition(real[:15], real, control, gene_sets, floor_cache=cache))
    # ... and the real cells' DE calls once per condition (all genes only).
    assert set(cache) == {("all", 15), ("first10", 15), ("all", "de_real")}
    assert cache[("all", 15)] == pytest.approx(sd.metrics.e_distance_floor(real.X, n_predicted=15))
    cache[("all", 15)] = 123.0
    again = _values(sd.benchmark.score_condition(real[:15], real, control, gene_sets, floor_cache=cache))
    assert again[("all", "e_distance_floor")] == 123.0
    assert again[("all", "e_distance_excess")] == pytest.approx(first[("all", "e_distance")] - 123.0)
    with pytest.raises(ValueError, match="Unknown metric"):
        sd.benchmark.score_condition(real, real, control, gene_sets, metric_names=["e_distance_ratio"])
    with pytest.raises(KeyError, match="reference_shift lacks"):
        sd.benchmark.score_condition(real, real, control, gene_sets, reference_shift=shift.iloc[:5])


def test_runner_paper_metrics_only(synthetic):
    split = sd.benchmark.singles_to_doubles(synthetic, cell_type_key="cell_type")
    methods = [sd.benchmark.BaselineMethod("no_change", sd.baselines.NoChange)]
    from scdoloris.benchmark._scoring import PAPER_METRICS

    result = sd.benchmark.run_benchmark(
        synthetic, split, methods, n_cells=10, n_de_genes=(), metric_names=PAPER_METRICS, progress=False
    )
    assert set(result.scores["metric"]) == {"e_distance", "emd", "mean_rmse", "pearson_delta"}


def test_wins_counts_higher_correlations_as_better():
    scores = pd.DataFrame(
        {
            "method": ["doloris", "no_change"] * 2,
            "seed": 0,
            "perturbation": ["A", "A", "B", "B"],
            "cell_type": "all",
            "gene_set": "all",
            "metric": "pearson_delta_centred",
            "value": [0.9, 0.1, 0.2, 0.5],
        }
    )
    result = sd.benchmark.BenchmarkResult(scores, "split")
    assert result.wins(metric="pearson_delta_centred").to_dict() == {"no_change": 0.5}
    scores.loc[2, "value"] = 0.6
    assert result.wins(metric="pearson_delta_centred").to_dict() == {"no_change": 1.0}


# ---------------------------------------------------------------------------------------- molecules
@pytest.fixture(scope="module")
def drugs():
    return sd.datasets.synthetic_drug_perturbations(n_genes=30, n_drugs=6, n_cells_per_condition=8, seed=0)


def test_unseen_molecules_split(drugs):
    split = sd.benchmark.unseen_molecules(drugs, fraction=0.3, seed=0)
    held_out = split.info["held_out"]
    assert len(held_out) == 2
    trained = set(drugs.obs["perturbation"].astype(str)[split.train])
    assert not trained & set(held_out) and "control" in trained
    assert set(split.test.columns) == {"perturbation", "cell_type", "dose"}
    assert len(split.test) == 2 * 3 * 4  # molecules x cell types x doses
    assert split.smiles(drugs)[held_out[0]] == drugs.obs.loc[drugs.obs["perturbation"] == held_out[0], "smiles"].iloc[0]
    with pytest.raises(ValueError, match="nope"):
        sd.benchmark.unseen_molecules(drugs, molecules=["nope"])


def test_unseen_drug_cell_dose_split(drugs):
    split = sd.benchmark.unseen_drug_cell_dose(drugs, fraction=0.25, seed=0)
    assert len(split.test) == round(0.25 * 6 * 3 * 4)
    obs = drugs.obs
    for row in split.test.to_dict("records"):
        cells = (obs["perturbation"] == row["perturbation"]) & (obs["cell_type"] == row["cell_type"])
        held = cells & (obs["dose"] == row["dose"])
        assert not split.train[held.to_numpy()].any()
        assert split.train[(obs["perturbation"] == row["perturbation"]).to_numpy()].any()  # the drug is still seen
    assert split.cells(drugs, row["perturbation"], row["cell_type"], row["dose"]).n_obs == 8


def test_runner_on_molecules(drugs, small_model_kwargs):
    split = sd.benchmark.unseen_molecules(drugs, fraction=0.2, seed=0)
    methods = sd.benchmark.default_methods(model_kwargs=small_model_kwargs, train_kwargs={"max_steps": 20})
    methods = [m for m in methods if m.name in ("doloris", "no_change", "mean_shift")]
    result = sd.benchmark.run_benchmark(drugs, split, methods, n_cells=10, n_de_genes=(20,), progress=False)
    scores = result.scores
    assert set(scores["method"]) == {"doloris", "no_change", "mean_shift"} and "dose" in scores.columns
    assert scores.groupby("method").size().nunique() == 1 and len(result.failures) == 0
    assert len(scores[(scores["metric"] == "e_distance") & (scores["gene_set"] == "all")]) == 3 * len(split.test)


def test_dosed_splits_get_the_nearest_dose_baseline_and_say_what_does_not_apply(drugs, small_model_kwargs):
    split = sd.benchmark.unseen_drug_cell_dose(drugs, fraction=0.3, seed=0)
    methods = sd.benchmark.default_methods(model_kwargs=small_model_kwargs, train_kwargs={"max_steps": 20}, doses=True)
    methods = [m for m in methods if m.name not in ("doloris", "doloris_paper")]
    result = sd.benchmark.run_benchmark(drugs, split, methods, n_cells=10, n_de_genes=(20,), progress=False)
    assert result.not_applicable == {
        "additive": "not applicable to conditions with doses",
        "linear": "not applicable to conditions with doses",
    }
    assert set(result.scores["method"]) == {"anchor", "no_change", "mean_shift", "nearest_dose"}
    assert len(result.failures) == 0  # no failure per condition for a baseline that cannot apply
    assert "Not applicable: additive (not applicable to conditions with doses)." in result.to_markdown()
    # Every held-out condition's drug was measured at another dose or in another cell type.
    wide = result.scores.query("metric == 'mean_rmse' and gene_set == 'all'").pivot_table(
        index=["perturbation", "cell_type", "dose"], columns="method", values="value"
    )
    assert len(wide) == len(split.test) and wide["nearest_dose"].notna().all()
    # A baseline that needs doses says so on a split without them.
    nearest = sd.benchmark.BaselineMethod("nearest_dose", sd.baselines.NearestDose, doses="native")
    plain = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    assert nearest.not_applicable(sd.benchmark.singles_to_doubles(plain)) == "needs conditions with doses"


def test_runner_records_a_method_that_cannot_fit():
    """Linear fits per cell type: a held-out cell type with controls only is recorded, not fatal."""
    adata = sd.datasets.synthetic_perturbations(n_genes=30, n_perturbed_genes=4, n_doubles=0, n_cell_types=2, seed=0)
    split = sd.benchmark.unseen_cell_type(adata, "ct1")
    # The baselines only: a Doloris model (either preset) would train 4,000 steps to test nothing here.
    methods = [
        m
        for m in sd.benchmark.default_methods(gene_graph=adata.uns["synthetic"]["edges"])
        if not m.name.startswith("doloris")
    ]
    result = sd.benchmark.run_benchmark(adata, split, methods, n_cells=10, n_de_genes=(), progress=False)
    assert set(result.scores["method"]) >= {"no_change", "mean_shift"}
    assert "linear" in set(result.failures["method"]) and "linear" not in set(result.scores["method"])


def test_doloris_variant_shares_the_trained_model(synthetic, small_model_kwargs):
    """A variant scores the parent's model with other predict settings, without training again."""
    split = sd.benchmark.singles_to_doubles(synthetic, cell_type_key="cell_type")
    doloris = sd.benchmark.DolorisMethod(
        {"gene_graph": synthetic.uns["synthetic"]["edges"], **small_model_kwargs}, {"max_steps": 10}
    )
    variant = doloris.variant("doloris_bernoulli", mask_strategy="bernoulli")
    # Listed before its parent, a variant cannot fit: the runner records that instead of crashing.
    early = sd.benchmark.run_benchmark(synthetic, split, [variant, doloris], seeds=(0,), n_cells=10, progress=False)
    assert set(early.failures["method"]) == {"doloris_bernoulli"}
    assert "list 'doloris' before" in early.failures["error"].iloc[0]
    model = doloris.model
    later = sd.benchmark.run_benchmark(synthetic, split, [doloris, variant], seeds=(0,), n_cells=10, progress=False)
    assert doloris.model is not model  # the parent trained again for this run ...
    double = str(split.test["perturbation"].iloc[0])
    direct = doloris.model.predict_perturbation([double], n_cells=10, seed=0, mask_strategy="bernoulli")
    shared = variant.predict([double], cell_type=None, n_cells=10, seed=0)
    np.testing.assert_array_equal(direct.X, shared.X)  # ... and the variant predicts from that model
    assert set(later.scores["method"]) == {"doloris", "doloris_bernoulli"} and len(later.failures) == 0


# ------------------------------------------------------------------------------------ integrity
class _Spy:
    """A method that records every cell it is given and every request it gets, and predicts controls."""

    name = "spy"

    def __init__(self):
        self.seen_cells: dict = {}  # per seed: a seeded split holds out other conditions at each seed
        self.requests: list = []

    def fit(self, train, split, *, seed):
        self.seen_cells.setdefault(seed, set()).update(train.obs_names)
        self.inner = sd.baselines.NoChange().fit(
            train,
            perturbation_key=split.perturbation_key,
            control_value=split.control_value,
            cell_type_key=split.cell_type_key,
        )
        return self

    def predict(self, perturbations, *, cell_type, n_cells, seed, dose=None, smiles=None):
        self.requests.append(list(perturbations))
        return self.inner.predict(list(perturbations), cell_type=cell_type, n_cells=n_cells, seed=seed)


@pytest.mark.parametrize("make_split", ["doubles", "unseen", "cell_type"])
def test_no_method_ever_sees_a_test_cell(synthetic, make_split):
    """The runner hands methods the training cells and the held-out labels, never a held-out cell."""
    two_types = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=6, n_cell_types=2, seed=3)
    data, split = {
        "doubles": (synthetic, lambda seed: sd.benchmark.singles_to_doubles(synthetic)),
        "unseen": (synthetic, lambda seed: sd.benchmark.unseen_perturbations(synthetic, fraction=0.4, seed=seed)),
        "cell_type": (two_types, lambda seed: sd.benchmark.unseen_cell_type(two_types, "ct1")),
    }[make_split]
    spy = _Spy()
    sd.benchmark.run_benchmark(data, split, [spy], seeds=(0, 1), n_cells=5, progress=False)
    for seed in (0, 1):
        current = split(seed)
        held_out = set()
        for condition in current.test.to_dict("records"):
            ct = None if condition["cell_type"] == "all" else condition["cell_type"]
            held_out |= set(current.cells(data, condition["perturbation"], ct).obs_names)
        assert held_out and not held_out & spy.seen_cells[seed]
    assert spy.requests and all(isinstance(label, str) for request in spy.requests for label in request)


def test_runner_records_the_gates_and_fit_time(result):
    gates = result.gates
    assert set(gates["method"]) == {"doloris"}  # the only anchored method
    assert len(gates) == result.scores.query("method == 'doloris'")[["seed", "perturbation"]].drop_duplicates().shape[0]
    assert gates["gate"].between(0, 1).all() and (gates["n_calibration"] >= 0).all()
    timings = result.timings.set_index(["method", "seed"])
    assert (timings["fit_seconds"] > 0).all() and (timings["predict_seconds"] > 0).all()
    text = result.to_markdown()
    assert "| doloris − anchor (paired, ± s.e.) |" in text


# ---------------------------------------------------------------------------------------- arguments
@pytest.fixture(scope="module")
def tiny():
    adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1, seed=0)
    return adata, sd.benchmark.singles_to_doubles(adata)


class _FitSpy:
    """A method that records whether it was fitted: argument errors must come before any fit."""

    def __init__(self, name="spy"):
        self.name, self.fitted = name, False

    def fit(self, train, split, *, seed):
        self.fitted = True
        return self

    def predict(self, perturbations, **kwargs):  # pragma: no cover - never reached in these tests
        raise AssertionError("predict called")


def test_runner_takes_method_names(tiny):
    adata, split = tiny
    result = sd.benchmark.run_benchmark(adata, split, ["anchor", "no_change"], n_cells=10, progress=False)
    assert list(dict.fromkeys(result.scores["method"])) == ["anchor", "no_change"]
    assert {"anchor", "no_change"} == set(result.summary()["method"])
    # One name, and names mixed with method objects.
    one = sd.benchmark.run_benchmark(adata, split, "no_change", n_cells=10, n_de_genes=(), progress=False)
    assert set(one.scores["method"]) == {"no_change"}
    mixed = [sd.benchmark.BaselineMethod("shifted", sd.baselines.MeanShift), "no_change"]
    both = sd.benchmark.run_benchmark(adata, split, mixed, n_cells=10, n_de_genes=(), seeds=3, progress=False)
    assert set(both.scores["method"]) == {"shifted", "no_change"} and set(both.scores["seed"]) == {3}
    # Scores by name equal those of the same method given as an object.
    direct = sd.benchmark.run_benchmark(
        adata, split, [sd.benchmark.BaselineMethod("no_change", sd.baselines.NoChange)], n_cells=10, progress=False
    )
    by_name = result.scores[result.scores["method"] == "no_change"].reset_index(drop=True)
    pd.testing.assert_frame_equal(by_name, direct.scores.reset_index(drop=True))


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"methods": []}, ValueError, "methods is empty"),
        ({"methods": ["nosuch"]}, ValueError, r"Unknown method name\(s\) \['nosuch'\]"),
        ({"methods": ["no_change", "no_change"]}, ValueError, "more than once"),
        ({"methods": [object()]}, TypeError, "name, fit and predict"),
        ({"methods": ["nearest_dose"]}, ValueError, "No method of methods applies.*needs conditions with doses"),
        ({"seeds": []}, ValueError, "seeds is empty"),
        ({"seeds": [0, 0]}, ValueError, "seeds repeats"),
        ({"seeds": [-1]}, ValueError, "seeds must be integers from 0"),
        ({"seeds": [1.5]}, ValueError, "seeds must be integers"),
        ({"seeds": "0"}, ValueError, "seeds must be a list"),
        ({"n_cells": 0}, ValueError, "n_cells must be a positive integer"),
        ({"n_cells": 2.5}, ValueError, "n_cells must be a positive integer"),
        ({"n_de_genes": [0]}, ValueError, "n_de_genes must be a positive integer"),
        ({"metric_names": []}, ValueError, "metric_names is empty"),
        ({"metric_names": ["e_distanse"]}, ValueError, "Unknown metric_names"),
        ({"progress": "no"}, ValueError, "progress must be True or False"),
    ],
)
def test_runner_checks_its_arguments_before_any_work(tiny, arguments, error, match):
    adata, split = tiny
    spy = _FitSpy()
    arguments = {"methods": [spy]} | arguments
    with pytest.raises(error, match=match):
        sd.benchmark.run_benchmark(adata, split, **arguments)
    assert not spy.fitted


def test_runner_checks_the_split_and_the_data(tiny):
    adata, split = tiny
    spy = _FitSpy()
    with pytest.raises(TypeError, match=r"not the name 'singles_to_doubles'.*sd.benchmark.singles_to_doubles"):
        sd.benchmark.run_benchmark(adata, "singles_to_doubles", [spy])
    with pytest.raises(TypeError, match="split must be a Split"):
        sd.benchmark.run_benchmark(adata, {"train": None}, [spy])
    with pytest.raises(TypeError, match=r"split\(0\) must return a Split"):
        sd.benchmark.run_benchmark(adata, lambda seed: None, [spy])
    with pytest.raises(ValueError, match="made for data of 780 cells, but adata has 100"):
        sd.benchmark.run_benchmark(adata[:100].copy(), split, [spy])
    renamed = adata.copy()
    renamed.obs = renamed.obs.rename(columns={"perturbation": "condition"})
    with pytest.raises(ValueError, match=r"columns \['perturbation'\] are not in adata.obs"):
        sd.benchmark.run_benchmark(renamed, split, [spy])
    with pytest.raises(TypeError, match="adata must be an AnnData"):
        sd.benchmark.run_benchmark(adata.X, split, [spy])
    assert not spy.fitted


def test_a_dosed_combination_reaches_the_baselines_with_every_component_dosed():
    """The runner spells a dosed combination "A@100+B@100" (one rule, perturbation.dosed_label).

    Its real cells are the controls moved by both drugs' measured shifts at that dose, so the Anchor's
    sum of the two dosed singles, applied to the same controls, gives them back; "A+B@100" would leave
    "A" undosed, an unknown drug.
    """
    data = sd.datasets.synthetic_drug_perturbations(
        n_genes=30, n_drugs=3, doses=(100.0,), cell_types=("A549",), n_cells_per_condition=60, n_control_cells=120
    )
    x = np.asarray(data.X)
    labels = data.obs["perturbation"].astype(str).to_numpy()
    first, second = sorted(set(labels) - {"control"})[:2]
    controls = x[labels == "control"]
    moved = sum(x[labels == drug].mean(axis=0) - controls.mean(axis=0) for drug in (first, second))
    both = ad.AnnData(np.clip(controls + moved, 0.0, None).astype(np.float32), var=data.var)
    both.obs = data.obs[labels == "control"].copy()
    both.obs_names = [f"both{i}" for i in range(len(controls))]
    both.obs["perturbation"], both.obs["dose"] = f"{first}+{second}", 100.0
    data = ad.concat([data, both])
    data.obs["perturbation"] = data.obs["perturbation"].astype(str)
    split = sd.benchmark.Split(
        name="dosed_combination",
        train=(data.obs["perturbation"] != f"{first}+{second}").to_numpy(),
        test=pd.DataFrame([{"perturbation": f"{first}+{second}", "cell_type": "A549", "dose": 100.0}]),
        perturbation_key="perturbation",
        control_value="control",
        cell_type_key="cell_type",
        dose_key="dose",
    )
    methods = [
        sd.benchmark.BaselineMethod(name, cls)
        for name, cls in [("anchor", sd.baselines.Anchor), ("no_change", sd.baselines.NoChange)]
    ]
    result = sd.benchmark.run_benchmark(
        data, split, methods, n_cells=len(controls), n_de_genes=(), metric_names=["mean_rmse"], progress=False
    )
    assert len(result.failures) == 0
    rmse = result.scores.set_index("method")["value"]
    assert rmse["no_change"] > 0.1
    assert rmse["anchor"] < 1e-5  # every control, moved by the sum of the dosed singles
