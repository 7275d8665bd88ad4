"""The anchored default of Doloris: control + population anchor + calibrated share of the model's own shift."""

import numpy as np
import pytest
from conftest import SMALL, TRAIN_KWARGS, training_subset

import scdoloris as sd
from scdoloris.model._anchoring import (
    MAX_RESCALE,
    anchored_cells,
    calibration_fold,
    fit_gates,
    gate_statistics,
    gates_from_statistics,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def anchored(synthetic_two_types):
    train = training_subset(synthetic_two_types)
    model = sd.Doloris(train, gene_graph=synthetic_two_types.uns["synthetic"]["edges"], **SMALL)
    model.train(max_steps=60, seed=0, **TRAIN_KWARGS)
    return model


def test_default_preset_is_anchored_and_calibrated(anchored):
    assert anchored.preset == "anchored"
    calibration = anchored.calibration_
    # 20% of the 10 perturbed training labels were held out of the first phase.
    assert len(calibration["held_out"]) == 2
    assert sum(calibration["n_conditions"].values()) >= 2
    assert all(0.0 <= g <= 1.0 for g in calibration["gates"].values())
    assert anchored.anchor_["format"]  # the fitted anchor is kept as plain data


def test_calibration_records_each_conditions_statistics(anchored):
    """The record of the held-out conditions gives back the fitted gates (and any other gate rule)."""
    calibration = anchored.calibration_
    record = calibration["conditions"]
    assert len(record["kind"]) == sum(calibration["n_conditions"].values())
    assert set(record) == {"name", "cell_type", "kind", "product", "residual", "error_at_zero"}
    assert set(record["name"]) <= set(calibration["held_out"])
    gates, counts = gates_from_statistics(record, record["kind"])
    assert gates == pytest.approx(calibration["gates"]) and counts == calibration["n_conditions"]


def test_zero_gates_give_control_plus_anchor(anchored, held_out_doubles):
    """With every gate 0 the prediction is the Anchor baseline's: the same control cells plus its shift."""
    saved = anchored.calibration_
    try:
        anchored.calibration_ = {"gates": {}, "n_conditions": {}, "held_out": []}
        pred = anchored.predict_perturbation(held_out_doubles[:2], n_cells=15, seed=3, n_steps=5)
    finally:
        anchored.calibration_ = saved
    baseline = sd.baselines.Anchor().fit(
        anchored.adata, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type"
    )
    expected = baseline.predict(held_out_doubles[:2], n_cells=15, seed=3)
    assert list(pred.obs["control_cell"]) == list(expected.obs["control_cell"])
    np.testing.assert_allclose(pred.X, expected.X, atol=1e-5)
    # The paper's generated cells stay beside them, and the result says what anchored each condition.
    assert pred.layers["doloris_generated"].shape == pred.shape
    anchoring = pred.uns["doloris_anchoring"]
    assert len(anchoring["kind"]) == 4 and set(anchoring["kind"]) == {"combination"}
    assert anchoring["gate"] == [0.0] * 4


def test_gates_move_the_shift_towards_the_generated_cells(anchored, held_out_doubles):
    saved = anchored.calibration_
    kinds = {"seen", "combination", "partial", "unseen", "new_cell_type"}
    try:
        anchored.calibration_ = {"gates": dict.fromkeys(kinds, 1.0), "n_conditions": {}, "held_out": []}
        pred = anchored.predict_perturbation(held_out_doubles[:1], cell_type="ct0", n_cells=40, seed=3, n_steps=5)
    finally:
        anchored.calibration_ = saved
    sources = anchored.adata[pred.obs["control_cell"].to_numpy()].X
    sources = np.asarray(sources.toarray() if hasattr(sources, "toarray") else sources)
    generated_shift = pred.layers["doloris_generated"].mean(0) - sources.mean(0)
    unclipped = sources + generated_shift
    np.testing.assert_allclose(pred.X, np.clip(unclipped, 0, None), atol=1e-5)


def test_zero_residual_returns_control_plus_anchor():
    rng = np.random.default_rng(0)
    sources = rng.gamma(2.0, size=(30, 6))
    anchor = rng.normal(size=6)
    generated = np.tile(sources, (2, 1)) + anchor  # the model's shift equals the anchor: no residual
    groups = np.zeros(30, dtype=int)
    anchors = {(0, 0): anchor, (1, 0): anchor}
    for gate in (0.0, 0.4, 1.0):
        cells, shifts = anchored_cells(sources, generated, groups, anchors, {(0, 0): gate, (1, 0): gate})
        np.testing.assert_allclose(cells, np.clip(np.tile(sources, (2, 1)) + anchor, 0, None))
        np.testing.assert_allclose(shifts[(0, 0)], anchor)


def test_generated_cells_keep_their_zeros_and_take_the_anchored_mean():
    """``cells="generated"``: each gene's mean is the sources' mean + shift, zeros never filled by a shift."""
    rng = np.random.default_rng(1)
    n, genes = 200, 8
    sources = rng.gamma(2.0, size=(n, genes)) * (rng.random((n, genes)) < 0.6)
    generated = rng.gamma(2.0, size=(2 * n, genes)) * (rng.random((2 * n, genes)) < 0.3)
    groups = np.zeros(n, dtype=int)
    anchors = {(0, 0): np.full(genes, 0.1), (1, 0): np.linspace(-0.9, 0.9, genes)}
    gates = {(0, 0): 0.0, (1, 0): 0.5}
    cells, shifts = anchored_cells(sources, generated, groups, anchors, gates, "generated")
    for entry in (0, 1):
        block = slice(entry * n, (entry + 1) * n)
        target = np.clip(sources.mean(0) + shifts[(entry, 0)], 0, None)
        np.testing.assert_allclose(cells[block].mean(0), target, rtol=1e-10)
        # Every value is a generated value times one factor per gene, or a generated value drawn anew:
        # no cell holds a small positive value a shift of its zero would give.
        assert cells.min() >= 0
        ratio = target / generated[block].mean(0)
        kept = (ratio <= MAX_RESCALE) & (ratio >= 1 / MAX_RESCALE)
        assert kept.any() and not kept.all()
        np.testing.assert_array_equal(cells[block][:, kept] == 0, generated[block][:, kept] == 0)
        # Genes asked to rise beyond MAX_RESCALE are expressed in more cells, those asked to fall in fewer.
        more = ratio > MAX_RESCALE
        fewer = ratio < 1 / MAX_RESCALE
        on, was_on = (cells[block] > 0).mean(0), (generated[block] > 0).mean(0)
        assert np.all(on[more] > was_on[more]) and np.all(on[fewer] < was_on[fewer])
    # The shift aimed at is the same as the shifted cells'.
    _, shifted = anchored_cells(sources, generated, groups, anchors, gates, "shifted")
    for key in shifts:
        np.testing.assert_allclose(shifts[key], shifted[key])
    # Seeded: the cells switched on or off are drawn from each block's stream, the same again; and
    # a block's cells do not depend on the other blocks' streams.
    again, _ = anchored_cells(sources, generated, groups, anchors, gates, "generated")
    np.testing.assert_array_equal(cells, again)
    streams = {(0, 0): np.random.default_rng(5), (1, 0): np.random.default_rng([1, 0])}
    other, _ = anchored_cells(sources, generated, groups, anchors, gates, "generated", streams)
    np.testing.assert_array_equal(other[n:], cells[n:])
    assert (other[:n] != cells[:n]).any()


def test_generated_cells_without_expression_take_one_count_or_stay_silent():
    """A gene no generated cell expresses takes the sources' values, else about one count, else stays 0."""
    n = 100
    sources = np.zeros((n, 4))
    sources[:50, 0] = 2.0  # gene 0: the sources express it
    sources[:, 3] = 1.0  # every cell expresses gene 3: its smallest nonzero value is 1 ("one count")
    generated = np.zeros((n, 4))
    generated[:, 3] = 1.0
    groups = np.zeros(n, dtype=int)
    anchor = np.array([-0.6, 0.2, 0.001, 0.0])  # targets 0.4, 0.2, 0.001, 1.0
    cells, _ = anchored_cells(sources, generated, groups, {(0, 0): anchor}, {(0, 0): 0.0}, "generated")
    # Gene 0: 20 of the sources' cells at 2.0; gene 1: 20 cells at one count; gene 2: below half a cell.
    assert (cells[:, 0] > 0).sum() == 20 and np.allclose(cells[cells[:, 0] > 0, 0], 2.0)
    assert (cells[:, 1] > 0).sum() == 20 and np.allclose(cells[cells[:, 1] > 0, 1], 1.0)
    np.testing.assert_array_equal(cells[:, 2], 0.0)
    np.testing.assert_allclose(cells.mean(0)[[0, 1, 3]], [0.4, 0.2, 1.0])
    with pytest.raises(ValueError, match="cells must be one of"):
        anchored_cells(sources, generated, groups, {(0, 0): anchor}, {(0, 0): 0.0}, "mixed")


def test_generated_cells_switch_on_the_likeliest_cells_at_the_bridges_values():
    """With the mask model's probabilities, the cells switched on (off) are the likeliest (least likely)."""
    n = 10
    sources = np.ones((n, 2))
    generated = np.zeros((n, 2))
    generated[:2, 0] = 1.0  # gene 0: 2 cells on, mean 0.2; the target asks for 5 cells' worth
    generated[:, 1] = 1.0  # gene 1: all on, mean 1; the target asks for 3 cells' worth
    probabilities = np.tile(np.linspace(0.1, 1.0, n)[:, None], (1, 2))  # the last cells likeliest
    continuous = np.full((n, 2), 1.0)
    continuous[:, 0] = np.arange(1, n + 1) / 5.5  # the bridge's values before the mask
    groups = np.zeros(n, dtype=int)
    anchor = np.array([-0.5, -0.7])  # targets 0.5 and 0.3
    cells, _ = anchored_cells(
        sources, generated, groups, {(0, 0): anchor}, {(0, 0): 0.0}, "generated", None, probabilities, continuous
    )
    # Gene 0: the 2 generated cells stay on, plus the 3 likeliest others (rows 7-9) at their bridge values.
    on = np.flatnonzero(cells[:, 0] > 0)
    np.testing.assert_array_equal(on, [0, 1, 7, 8, 9])
    np.testing.assert_allclose(cells[7:, 0] / cells[7, 0], continuous[7:, 0] / continuous[7, 0])
    # Gene 1: the 3 likeliest cells keep it.
    np.testing.assert_array_equal(np.flatnonzero(cells[:, 1] > 0), [7, 8, 9])
    np.testing.assert_allclose(cells.mean(0), [0.5, 0.3])


def test_predicted_generated_cells_are_the_generated_layer_rescaled(anchored, held_out_doubles):
    pred = anchored.predict_perturbation(
        held_out_doubles[:2], cell_type="ct0", n_cells=30, seed=4, n_steps=5, anchored_cells="generated"
    )
    shifted = anchored.predict_perturbation(held_out_doubles[:2], cell_type="ct0", n_cells=30, seed=4, n_steps=5)
    np.testing.assert_array_equal(pred.layers["doloris_generated"], shifted.layers["doloris_generated"])
    generated = pred.layers["doloris_generated"]
    # The default fills zeros by the shift; the generated cells keep most of theirs.
    assert (pred.X == 0).mean() > (shifted.X == 0).mean()
    # Where the generated cells of a gene keep their zeros, they are rescaled by one positive factor.
    for entry in range(2):
        block = slice(30 * entry, 30 * (entry + 1))
        x, g = pred.X[block], generated[block]
        kept = np.all((x == 0) == (g == 0), axis=0) & (g > 0).any(axis=0)
        assert kept.any()
        ratios = np.where(g[:, kept] > 0, x[:, kept] / np.where(g[:, kept] > 0, g[:, kept], 1), np.nan)
        spread = np.nanmax(ratios, axis=0) - np.nanmin(ratios, axis=0)
        assert np.nanmax(spread) < 1e-4
    with pytest.raises(ValueError, match="anchored_cells must be one of"):
        anchored.predict_perturbation(held_out_doubles[:1], n_cells=5, n_steps=2, anchored_cells="spread")


def test_a_validated_gate_must_hold_out_on_each_condition_left_out():
    rng = np.random.default_rng(0)
    genes = 50
    anchors = np.zeros((6, genes))
    residual = rng.normal(size=(6, genes))
    # "helps": every condition's truth is half the model's residual, plus a little noise.
    helps = 0.5 * residual[:3] + 0.05 * rng.normal(size=(3, genes))
    # "lucky": one condition matches the residual, the others are unrelated to it.
    lucky = np.vstack([residual[3], rng.normal(size=(2, genes))])
    true = np.vstack([helps, lucky])
    kinds = ["helps"] * 3 + ["lucky"] * 3
    statistics = gate_statistics(true, anchors, residual)
    plain, _ = gates_from_statistics(statistics, kinds)
    validated, _ = gates_from_statistics(statistics, kinds, validate=True)
    assert plain["helps"] == pytest.approx(0.5, abs=0.05) and validated["helps"] == plain["helps"]
    assert plain["lucky"] > 0.2 and validated["lucky"] == 0.0
    # The statistics are the error of any gate: ||s - a - g r||^2 = c - 2 g p + g^2 q.
    g = 0.3
    direct = ((true - anchors - g * residual) ** 2).sum(axis=1)
    from_statistics = statistics["error_at_zero"] - 2 * g * statistics["product"] + g**2 * statistics["residual"]
    np.testing.assert_allclose(direct, from_statistics)


def test_gates_are_least_squares_clipped():
    s = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    a = np.zeros_like(s)
    gates, counts = fit_gates(s, a, -s, ["unseen", "unseen", "combination"])
    assert gates == {"combination": 0.0, "unseen": 0.0} and counts == {"combination": 1, "unseen": 2}
    gates, _ = fit_gates(s, a, 4 * s, ["unseen"] * 3)
    assert gates["unseen"] == pytest.approx(0.25)
    assert calibration_fold(["A", "B", "C", "D"], seed=0) == []
    assert calibration_fold([f"P{i}" for i in range(10)], seed=1) == calibration_fold([f"P{i}" for i in range(10)], 1)


def test_anchored_round_trip(anchored, held_out_doubles, tmp_path):
    pred = anchored.predict_perturbation(held_out_doubles[:1], n_cells=10, seed=2, n_steps=5)
    anchored.save(tmp_path / "model")
    loaded = sd.Doloris.load(tmp_path / "model", anchored.adata)
    assert loaded.preset == "anchored" and loaded.calibration_ == anchored.calibration_
    again = loaded.predict_perturbation(held_out_doubles[:1], n_cells=10, seed=2, n_steps=5)
    np.testing.assert_array_equal(pred.X, again.X)


def test_paper_preset_generates_every_cell(synthetic_two_types):
    train = training_subset(synthetic_two_types)
    model = sd.Doloris(train, gene_graph=None, preset="paper", **SMALL)
    model.train(max_steps=5, seed=0, **TRAIN_KWARGS)
    assert not hasattr(model, "calibration_")
    pred = model.predict_perturbation(["G000"], n_cells=5, n_steps=3)
    assert "doloris_generated" not in pred.layers
    with pytest.raises(ValueError, match="preset must be one of"):
        sd.Doloris(train, preset="papers")


def test_continued_training_keeps_the_gates(synthetic_two_types):
    """A second train() cannot hold perturbations out that the model has learned: the first gates stay."""
    train = training_subset(synthetic_two_types)
    model = sd.Doloris(train, gene_graph=None, **SMALL)
    model.train(max_steps=20, seed=0, **TRAIN_KWARGS)
    first = model.calibration_
    assert first["held_out"]
    model.calibration_ = {**first, "gates": {"unseen": 0.5}}  # a marker a recalibration would replace
    model.train(max_steps=20, seed=1, **TRAIN_KWARGS)
    assert model.calibration_["gates"] == {"unseen": 0.5}


def _calibrated(synthetic_two_types, monkeypatch, **constants):
    from scdoloris.model import _calibration

    for name, value in constants.items():
        monkeypatch.setattr(_calibration, name, value)
    train = training_subset(synthetic_two_types)
    model = sd.Doloris(train, gene_graph=synthetic_two_types.uns["synthetic"]["edges"], **SMALL)
    model.train(max_steps=20, seed=0, **TRAIN_KWARGS)
    return model.calibration_


def test_calibration_conditions_do_not_depend_on_how_they_are_batched(synthetic_two_types, monkeypatch):
    """The held-out conditions are generated together; one per call gives the same shifts (issue 26)."""
    together = _calibrated(synthetic_two_types, monkeypatch)
    one_by_one = _calibrated(synthetic_two_types, monkeypatch, CALIBRATION_CONDITIONS_PER_CALL=1)
    assert together["conditions"]["name"] == one_by_one["conditions"]["name"]
    assert len(together["conditions"]["name"]) >= 3
    for key in ("product", "residual", "error_at_zero"):
        np.testing.assert_allclose(together["conditions"][key], one_by_one["conditions"][key], rtol=1e-4, atol=1e-6)


def test_calibration_samples_at_most_its_cap_of_conditions(synthetic_two_types, monkeypatch):
    full = _calibrated(synthetic_two_types, monkeypatch)
    capped = _calibrated(synthetic_two_types, monkeypatch, CALIBRATION_MAX_CONDITIONS=2)
    assert len(capped["conditions"]["name"]) == 2
    pairs = set(zip(full["conditions"]["name"], full["conditions"]["cell_type"], strict=True))
    assert set(zip(capped["conditions"]["name"], capped["conditions"]["cell_type"], strict=True)) < pairs
    assert sum(capped["n_conditions"].values()) == 2
