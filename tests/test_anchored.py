"""The anchored default of Doloris: control + population anchor + calibrated share of the model's own shift."""

import numpy as np
import pytest
from conftest import SMALL, TRAIN_KWARGS, training_subset

import scdoloris as sd
from scdoloris.model._anchoring import (
    _moved_without_filling,
    anchored_cells,
    calibration_fold,
    fit_gates,
    gate_statistics,
    gates_from_statistics,
    spread_expressing,
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


def test_zero_gates_give_the_anchor_mean_or_with_shifted_cells_the_anchor_itself(anchored, held_out_doubles):
    """With every gate 0 the default's cells have the Anchor baseline's mean, gene by gene, per condition
    and cell type (a combination's target is the clipped shifted cells' mean), and ``"shifted"`` cells
    are the Anchor's own: the same control cells plus its shift."""
    saved = anchored.calibration_
    try:
        anchored.calibration_ = {"gates": {}, "n_conditions": {}, "held_out": []}
        pred = anchored.predict_perturbation(held_out_doubles[:2], n_cells=15, seed=3, n_steps=5)
        shifted = anchored.predict_perturbation(
            held_out_doubles[:2], n_cells=15, seed=3, n_steps=5, anchored_cells="shifted"
        )
    finally:
        anchored.calibration_ = saved
    baseline = sd.baselines.Anchor().fit(
        anchored.adata, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type"
    )
    expected = baseline.predict(held_out_doubles[:2], n_cells=15, seed=3)
    assert list(pred.obs["control_cell"]) == list(expected.obs["control_cell"])
    np.testing.assert_allclose(shifted.X, expected.X, atol=1e-5)
    blocks = pred.obs["perturbation"].astype(str) + "/" + pred.obs["cell_type"].astype(str)
    for block in blocks.unique():
        rows = (blocks == block).to_numpy()
        np.testing.assert_allclose(pred.X[rows].mean(axis=0), expected.X[rows].mean(axis=0), atol=1e-5)
    assert (pred.X == 0).mean() > (expected.X == 0).mean()  # the default keeps zeros the shift fills
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
        pred = anchored.predict_perturbation(
            held_out_doubles[:1], cell_type="ct0", n_cells=40, seed=3, n_steps=5, anchored_cells="shifted"
        )
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
        cells, shifts = anchored_cells(sources, generated, groups, anchors, {(0, 0): gate, (1, 0): gate}, "shifted")
        np.testing.assert_allclose(cells, np.clip(np.tile(sources, (2, 1)) + anchor, 0, None))
        np.testing.assert_allclose(shifts[(0, 0)], anchor)


def _sparse_and_dense(seed: int, n: int = 200) -> np.ndarray:
    """Cells whose six genes are expressed by 3%, 20%, 50%, 80%, 100% and 100% of them."""
    rng = np.random.default_rng(seed)
    share_on = np.array([0.03, 0.2, 0.5, 0.8, 1.0, 1.0])
    return np.where(rng.random((n, 6)) < share_on, rng.gamma(4.0, 0.4, (n, 6)), 0.0)


@pytest.mark.parametrize("cells", ["generated", "sources"])
@pytest.mark.parametrize("kind", ["unseen", "combination"])
def test_zero_aware_cells_take_the_anchored_mean_without_filling_zeros(cells, kind):
    """Each gene's mean is the target; a silent cell is switched on at a real value or stays 0."""
    sources = _sparse_and_dense(1)
    generated = _sparse_and_dense(2, n=400)
    n = len(sources)
    groups = np.zeros(n, dtype=int)
    anchors = {(0, 0): np.full(6, 0.8), (1, 0): np.full(6, -0.4)}
    gates = {(0, 0): 0.0, (1, 0): 0.0}
    kinds = {key: kind for key in anchors}
    out, shifts = anchored_cells(sources, generated, groups, anchors, gates, cells, kinds=kinds)
    shifted, _ = anchored_cells(sources, generated, groups, anchors, gates, "shifted")
    assert out.min() >= 0
    for entry in (0, 1):
        rows = slice(entry * n, (entry + 1) * n)
        # The target: the anchored mean, or, for a sum of shifts, the shifted cells' (each clipped at 0).
        anchored_mean = np.clip(sources.mean(0) + shifts[(entry, 0)], 0, None)
        target = shifted[rows].mean(0) if kind == "combination" else anchored_mean
        # (A fall can leave a little above it where values are clipped at 0 once more.)
        np.testing.assert_allclose(out[rows].mean(0), target, rtol=0, atol=1e-3)
    moved, moved_down = (generated[:n], generated[n:]) if cells == "generated" else (sources, sources)
    up, down = out[:n], out[n:]
    # A rise: more cells express each sparse gene, switched on at values of its moved nonzero values,
    # never at a small "filled" value.
    for gene in range(4):
        was_on = moved[:, gene] > 0
        assert (up[:, gene] > 0).sum() > was_on.sum()
        switched = (up[:, gene] > 0) & ~was_on
        assert up[switched, gene].min() > 0.5 * moved[was_on, gene].min()
    # Dense genes rise as the shifted cells do: every value by the shift.
    np.testing.assert_allclose(up[:, 4:], np.clip(moved[:, 4:] + (up[:, 4:].mean(0) - moved[:, 4:].mean(0)), 0, None))
    # A fall: no cell gains expression, and sparse genes are expressed by fewer cells.
    assert np.all((down > 0) <= (moved_down > 0))
    assert np.all((down[:, :4] > 0).sum(0) < (moved_down[:, :4] > 0).sum(0))
    # Seeded per block: the same again, and a block's cells do not depend on the other blocks' streams.
    again, _ = anchored_cells(sources, generated, groups, anchors, gates, cells, kinds=kinds)
    np.testing.assert_array_equal(out, again)
    streams = {(0, 0): np.random.default_rng(5), (1, 0): np.random.default_rng([1, 0])}
    other, _ = anchored_cells(sources, generated, groups, anchors, gates, cells, streams, kinds)
    np.testing.assert_array_equal(other[n:], out[n:])
    assert (other[:n] != out[:n]).any()
    with pytest.raises(ValueError, match="cells must be one of"):
        anchored_cells(sources, generated, groups, anchors, gates, "mixed")


def test_zero_aware_cells_of_a_gene_no_cell_expresses_take_one_count_or_stay_silent():
    """A gene silent in every cell is switched on at about one count (a cell's smallest value), or stays 0."""
    n = 100
    block = np.zeros((n, 3))
    block[:, 2] = 1.0  # every cell expresses gene 2: one count is 1.0
    out = _moved_without_filling(block, np.array([0.2, 0.001, 1.0]), np.random.default_rng(0))
    assert (out[:, 0] > 0).sum() == 20 and np.allclose(out[out[:, 0] > 0, 0], 1.0)
    np.testing.assert_array_equal(out[:, 1], 0.0)  # below half a cell: silent
    np.testing.assert_allclose(out[:, 2], 1.0)
    # Nothing expressed at all: nothing to draw from, the cells stay silent.
    np.testing.assert_array_equal(_moved_without_filling(np.zeros((5, 2)), np.ones(2), np.random.default_rng(0)), 0.0)


def test_predicted_zero_aware_cells_keep_the_generated_zeros(anchored, held_out_doubles):
    """``anchored_cells="generated"``: the generated layer moved gene by gene, most of its zeros kept."""
    kwargs = {"cell_type": "ct0", "n_cells": 30, "seed": 4, "n_steps": 5}
    pred = anchored.predict_perturbation(held_out_doubles[:2], anchored_cells="generated", **kwargs)
    shifted = anchored.predict_perturbation(held_out_doubles[:2], anchored_cells="shifted", **kwargs)
    np.testing.assert_array_equal(pred.layers["doloris_generated"], shifted.layers["doloris_generated"])
    generated = pred.layers["doloris_generated"]
    # Shifted cells fill zeros by the shift; the zero-aware cells keep most of the generated ones.
    assert (pred.X == 0).mean() > (shifted.X == 0).mean()
    assert abs((pred.X == 0).mean() - (generated == 0).mean()) < 0.1
    # The mean of each gene is the anchored one: that of the shifted cells where no value is clipped.
    unclipped = (shifted.X > 0).all(axis=0)
    np.testing.assert_allclose(pred.X.mean(0)[unclipped], shifted.X.mean(0)[unclipped], rtol=1e-4, atol=1e-5)
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
    # Three conditions per kind are below the package's minimum: no gate at all.
    assert gates_from_statistics(statistics, kinds, validate=True)[0] == {"helps": 0.0, "lucky": 0.0}
    plain, _ = gates_from_statistics(statistics, kinds, min_conditions=2)
    validated, _ = gates_from_statistics(statistics, kinds, validate=True, min_conditions=2)
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
    many = np.vstack([s, s])  # six conditions, above the minimum of five
    gates, _ = fit_gates(many, np.zeros_like(many), 4 * many, ["unseen"] * 6)
    assert gates["unseen"] == pytest.approx(0.25)
    assert fit_gates(s, a, 4 * s, ["unseen"] * 3)[0] == {"unseen": 0.0}  # three: the anchor alone
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


def test_zero_aware_means_are_the_target_for_any_block_that_expresses_the_gene():
    """Falls that would silence every cell keep one, and what the clip at 0 leaves is carried again."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n, genes = int(rng.integers(5, 120)), 30
        block = np.where(rng.random((n, genes)) < rng.random(genes), rng.gamma(2.0, 0.6, (n, genes)), 0.0)
        target = np.clip(block.mean(axis=0) + rng.normal(0.0, 0.5, genes) * rng.random(genes), 0.0, None)
        out = _moved_without_filling(block, target, np.random.default_rng(trial))
        expressed = block.sum(axis=0) > 0  # a gene silent everywhere gets whole counts or stays 0 (above)
        np.testing.assert_allclose(out.mean(axis=0)[expressed], target[expressed], atol=1e-9)
        assert (out >= 0).all() and ((out > 0) <= ((block > 0) | (target > 0))).all()


def test_the_model_summary_says_how_the_default_predicts(anchored):
    """The gates and what each rests on, or why there are none (Kang's one stimulation: no fold)."""
    summary = anchored._model_summary_string
    assert "Preset: anchored (source control cells moved, without filling zeros and with the spread" in summary
    for kind, count in anchored.calibration_["n_conditions"].items():
        assert f"{kind} {anchored.calibration_['gates'][kind]:.2f} on {count} held-out conditions" in summary
    adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=3, n_doubles=0)
    sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    few = sd.Doloris(adata, n_hidden=16)
    assert "Preset" not in few._model_summary_string  # nothing to say before training
    few.train(max_steps=12, batch_size=64)
    assert "No calibration fold (fewer than 5 perturbation labels" in few._model_summary_string
    assert few.calibration_["gates"] == {}


def test_spread_expressing_sets_the_wanted_spread_and_keeps_mean_and_zeros():
    rng = np.random.default_rng(1)
    # A dense gene beside one at one count (0.5) in every cell: the dense gene's values are moved about
    # their mean to the sources' spread plus the change (nothing reaches a cell's one count).
    sources = np.column_stack([rng.normal(3.0, 0.3, 200), np.full(200, 0.5)])
    target = np.array([3.2, 0.5])
    out = spread_expressing(sources + [0.2, 0.0], sources, target, np.array([0.3, 0.0]), np.full(2, np.nan), rng)
    assert out[:, 0].std() == pytest.approx(sources[:, 0].std() + 0.3, rel=1e-6)
    np.testing.assert_allclose(out.mean(axis=0), target, atol=1e-9)
    # A gene at one count in 10 of 200 sources, switched on in 150 cells at that value (ties): its
    # level's spread (the sources are too few for their own) by normal scores, the zeros and mean kept.
    # (A second gene holds each cell's one count, 0.3.)
    sources = np.column_stack([np.zeros(200), np.full(200, 0.3)])
    sources[:10, 0] = 1.0
    block = sources.copy()
    block[:150, 0] = 1.0
    target = np.array([1.5, 0.3])
    out = spread_expressing(block, sources, target, np.array([np.nan, 0.0]), np.array([0.6, 0.0]), rng)
    assert ((out > 0) == (block > 0)).all()
    np.testing.assert_allclose(out.mean(axis=0), [1.5, 0.3], atol=1e-9)
    assert out[:150, 0].min() >= 0.3 - 1e-9  # not below each cell's lowest value (about one count)
    assert 0.5 < out[:150, 0].std() < 0.7
    # Too few expressing cells in the block, or no measured spread: left as they are.
    few = np.zeros((50, 2))
    few[:3, 0] = [1.0, 2.0, 3.0]
    few[:, 1] = rng.gamma(2.0, 1.0, 50)
    kept = spread_expressing(few, few, few.mean(axis=0), np.array([1.0, np.nan]), np.array([1.0, np.nan]), rng)
    np.testing.assert_array_equal(kept, few)


def test_spread_gives_held_out_stimulated_cells_their_breadth_on_kang():
    """Kang's interferon-stimulated genes are near one count in a few control cells and broad in most
    stimulated ones: the default's cells (sources at the anchored mean) with the spread the Anchor
    transfers from the other cell types are closer to the held-out CD4 T cells on those genes."""
    adata = sd.datasets.kang2018_subset()
    cd4 = (adata.obs["cell_type"] == "CD4T").to_numpy()
    stimulated = (adata.obs["condition"] == "stimulated").to_numpy()
    train = adata[~(cd4 & stimulated)].copy()
    anchor = sd.baselines.Anchor().fit(
        train, perturbation_key="condition", control_value="control", cell_type_key="cell_type"
    )
    sources = np.asarray(adata[cd4 & ~stimulated].X.todense())[:200].astype(np.float64)
    real = np.asarray(adata[cd4 & stimulated].X.todense()).astype(np.float64)
    genes = [adata.var_names.get_loc(g) for g in ["ISG15", "IFI6", "IFIT3", "ISG20", "IFIT1", "IFIT2", "RSAD2", "OASL"]]
    anchors = {(0, 0): anchor.predict_shift(["stimulated"], cell_type="CD4T").to_numpy()[0]}
    groups, gates = np.zeros(len(sources), dtype=int), {(0, 0): 0.0}
    made = {}
    for name, spreads in [("kept", None), ("spread", {(0, 0): anchor.spread_change("stimulated", "CD4T")})]:
        streams = {(0, 0): np.random.default_rng(0)}
        made[name] = anchored_cells(sources, sources, groups, anchors, gates, "sources", streams, None, spreads)[0]
    np.testing.assert_allclose(made["spread"].mean(axis=0), made["kept"].mean(axis=0), atol=1e-9)
    # Zeros are kept; a value that the mean's correction takes below 0 stops expressing (rare).
    assert ((made["spread"] > 0) <= (made["kept"] > 0)).all()
    assert ((made["spread"] > 0) != (made["kept"] > 0)).mean() < 1e-3
    ratio = {k: v[:, genes].std(axis=0) / real[:, genes].std(axis=0) for k, v in made.items()}
    assert np.all(ratio["spread"] > ratio["kept"])
    distance = {k: sd.metrics.e_distance(v[:, genes], real[:, genes]) for k, v in made.items()}
    assert np.median(ratio["kept"]) < 0.5 and 0.65 < np.median(ratio["spread"]) < 1.33
    assert distance["spread"] < 0.5 * distance["kept"]  # 0.08 against 0.31 when written


def test_model_layers_off_skips_the_network_where_every_gate_is_0(anchored, held_out_doubles, monkeypatch):
    """``model_layers=False`` returns the same X; with every gate 0 the bridge does not run at all."""
    saved = anchored.calibration_
    calls = []
    original = type(anchored.module).generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(anchored.module), "generate", counted)
    try:
        for gates in [{}, {"combination": 0.5}]:
            anchored.calibration_ = {**saved, "gates": gates}
            kwargs = {"n_cells": 12, "seed": 4, "n_steps": 4}
            full = anchored.predict_perturbation(held_out_doubles[:2], **kwargs)
            calls.clear()
            lean = anchored.predict_perturbation(held_out_doubles[:2], model_layers=False, **kwargs)
            assert len(calls) == (1 if gates else 0)  # a gate above 0 needs the generated cells
            np.testing.assert_array_equal(lean.X, full.X)
            assert list(lean.obs["control_cell"]) == list(full.obs["control_cell"])
            assert len(lean.layers) == 0 and len(lean.obsm) == 0
            assert lean.uns["doloris_anchoring"] == full.uns["doloris_anchoring"]
        # In place: only the predicted expression of each perturbation.
        anchored.calibration_ = {**saved, "gates": {}}
        cells = anchored.adata[anchored.adata.obs["perturbation"] == "control"][:10].copy()
        anchored.predict_perturbation(held_out_doubles[0], adata=cells, inplace=True, model_layers=False, n_steps=4)
        assert list(cells.layers) == [f"doloris_{held_out_doubles[0]}"] and len(cells.obsm) == 0
    finally:
        anchored.calibration_ = saved
    with pytest.raises(ValueError, match="model_layers"):
        anchored.predict_perturbation(held_out_doubles[0], model_layers="no")
