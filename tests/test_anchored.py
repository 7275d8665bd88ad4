"""The anchored default of Doloris: control + population anchor + calibrated share of the model's own shift."""

import numpy as np
import pytest
from conftest import SMALL, TRAIN_KWARGS, training_subset

import scdoloris as sd
from scdoloris.model._anchoring import anchored_cells, calibration_fold, fit_gates

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
