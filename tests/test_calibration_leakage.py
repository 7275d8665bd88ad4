"""The calibration fold reaches the model only as a condition never trained would.

Until the calibration step of an anchored run, and in the calibration prediction, everything the
model keeps of its training data (node features, scale, control and target priors, conditions'
moments, reference cells of mask sampling) must be what it would be without the fold's cells. The
references here are :func:`summarize_training_data` run on the data with those cells removed.
"""

import numpy as np
import pytest
import torch
from conftest import SMALL, TRAIN_KWARGS, training_subset

import scdoloris as sd
from scdoloris._constants import REGISTRY_KEYS
from scdoloris.data import summarize_training_data, summarize_without
from scdoloris.model._inputs import module_inputs
from scdoloris.module import DolorisModule, GraphTensors, ModuleInputs
from scdoloris.train import DolorisTrainingPlan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BUFFERS = ("x_max", "control_mean", "control_std", "target_prior_mean", "target_prior_std", "source_prior_std")


def _spied_training(model, monkeypatch, **train_kwargs) -> dict:
    """Train ``model``, recording what the model and its module hold during the calibration prediction."""
    seen: dict = {"anchor_keep": [], "source_rows": []}
    cls = type(model)
    calibrate, fit_anchor, sources = cls._calibrate, cls._fit_anchor, cls._sources

    def spy_calibrate(self, fold, held_out, seed):
        module = self.module
        seen["summary"] = self._summary
        seen["reference"] = self._mask_reference()
        seen["held_out"] = held_out.copy()
        seen["buffers"] = {name: getattr(module, name).detach().clone() for name in BUFFERS}
        seen["expressed"] = (module.expressed_mean.detach().clone(), module.expressed_std.detach().clone())
        seen["node_features"] = [e.graph.node_features.detach().clone() for e in (module.encoder, module.mask_encoder)]
        seen["result"] = result = calibrate(self, fold, held_out, seed)
        return result

    def spy_fit_anchor(self, keep, **kwargs):
        seen["anchor_keep"].append(np.asarray(keep).copy())
        return fit_anchor(self, keep, **kwargs)

    def spy_sources(self, adata, cell_type, n_cells, rng):
        out = sources(self, adata, cell_type, n_cells, rng)
        seen["source_rows"].append(np.asarray(out.rows).copy())
        return out

    monkeypatch.setattr(cls, "_calibrate", spy_calibrate)
    monkeypatch.setattr(cls, "_fit_anchor", spy_fit_anchor)
    monkeypatch.setattr(cls, "_sources", spy_sources)
    model.train(seed=0, **TRAIN_KWARGS, **train_kwargs)
    monkeypatch.undo()
    return seen


def _codes(model, key):
    return np.asarray(model.adata_manager.get_from_registry(key)).reshape(-1).astype(np.int64)


def _summary_without(model, seen, gene_graph, doses=None, smiles=None) -> sd.data.TrainingSummary:
    """What :func:`summarize_training_data` makes of the model's data without the fold's cells."""
    keep = ~seen["held_out"]
    summary = model._summary
    X = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    return summarize_training_data(
        X[keep],
        _codes(model, REGISTRY_KEYS.PERTURBATION_KEY)[keep],
        _codes(model, REGISTRY_KEYS.CELL_TYPE_KEY)[keep],
        summary.perturbation_labels,
        summary.cell_types,
        summary.control_values,
        list(model.adata.var_names),
        gene_graph=gene_graph,
        seed=0,
        doses=None if doses is None else doses[keep],
        smiles=None if smiles is None else smiles[keep],
    )


@pytest.fixture(scope="module")
def genes(synthetic_two_types):
    """A small anchored gene-perturbation model, trained with its calibration watched."""
    train = training_subset(synthetic_two_types)
    edges = synthetic_two_types.uns["synthetic"]["edges"]
    model = sd.Doloris(train, gene_graph=edges, **SMALL)
    full = model._summary
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = _spied_training(model, monkeypatch, max_steps=30)
    return model, full, seen, _summary_without(model, seen, edges)


@pytest.fixture(scope="module")
def drugs():
    """A small anchored drug model (doses): a fold of drugs and held-out (drug, cell type, dose) conditions."""
    adata = sd.datasets.synthetic_drug_perturbations(
        n_genes=30, n_drugs=8, n_cells_per_condition=12, n_control_cells=40, cell_types=("A", "B"), seed=0
    )
    sd.Doloris.setup_anndata(
        adata, perturbation_key="perturbation", cell_type_key="cell_type", dose_key="dose", smiles_key="smiles"
    )
    model = sd.Doloris(adata, **SMALL)
    full = model._summary
    with pytest.MonkeyPatch.context() as monkeypatch:
        seen = _spied_training(model, monkeypatch, max_steps=20, batch_size=64)
    doses = adata.obs["dose"].to_numpy(dtype=np.float32)
    reference = _summary_without(model, seen, gene_graph="auto", doses=doses, smiles=adata.obs["smiles"].to_numpy())
    return model, full, seen, reference


def _fold_codes(model) -> list[int]:
    labels = model._summary.perturbation_labels
    return [labels.index(label) for label in model.calibration_["held_out"]]


# ------------------------------------------------------------------------------------- node features
def test_fold_gene_node_features_are_those_of_the_data_without_the_fold(genes):
    model, full, seen, reference = genes
    fold_genes = model.calibration_["held_out"]
    nodes = full.gene_graph.nodes
    rows = [nodes.index(g) for g in fold_genes if g in nodes[: full.gene_graph.n_measured]]
    assert rows, "the fold should hold measured genes, whose node features are PCA features"
    for features in seen["node_features"]:  # the denoiser's and the mask model's encoders
        np.testing.assert_array_equal(features.numpy(), reference.node_features)
    # The prediction's graph comes from the summary in place during the calibration.
    np.testing.assert_array_equal(seen["summary"].node_features, reference.node_features)
    # Built like a gene never trained: without the fold, the full data's features differ (the leak fixed).
    assert not np.allclose(full.node_features[rows], reference.node_features[rows])


def test_node_features_stay_fold_free_after_training(genes):
    model, full, seen, reference = genes
    np.testing.assert_array_equal(model._summary.node_features, reference.node_features)
    np.testing.assert_array_equal(model.summary_["node_features"], reference.node_features)
    np.testing.assert_array_equal(model.module.encoder.graph.node_features.numpy(), reference.node_features)


# ---------------------------------------------------------------------------------------- mask pools
def test_calibration_mask_reference_holds_no_fold_cell(genes):
    model, full, seen, reference = genes
    fold = _fold_codes(model)
    used = seen["summary"]
    assert not np.isin(used.condition_perturbation, fold).any()
    assert np.isin(full.condition_perturbation, fold).any()
    # Exactly the reference cells summarize_training_data draws from the data without the fold.
    np.testing.assert_array_equal(seen["reference"].packed_masks, reference.reference_masks)
    np.testing.assert_array_equal(seen["reference"].frequencies.numpy(), reference.condition_frequencies)
    np.testing.assert_array_equal(seen["reference"].counts, np.bincount(reference.reference_condition))
    # The matched pools the calibration built are drawn from those cells only.
    pools = seen["reference"].matched_pools
    assert pools
    allowed = {row.tobytes() for row in np.unpackbits(reference.reference_masks, axis=1)}
    for pool in pools.values():
        patterns = pool.patterns.numpy().astype(np.uint8)
        padded = np.pad(patterns, ((0, 0), (0, (-patterns.shape[1]) % 8)))
        assert all(row.tobytes() in allowed for row in padded)


def test_after_training_predictions_use_every_reference_cell(genes):
    model, full, seen, reference = genes
    np.testing.assert_array_equal(model._mask_reference().packed_masks, full.reference_masks)
    np.testing.assert_array_equal(model._summary.condition_perturbation, full.condition_perturbation)


# ------------------------------------------------------------------------------------ other fields
def _check_module_without_fold(seen, reference, fold_conditions):
    """The module's statistics during the calibration equal those built from the data without the fold."""
    inputs = module_inputs(reference)
    buffers = seen["buffers"]
    np.testing.assert_allclose(buffers["x_max"].item(), reference.x_max, rtol=1e-7)
    np.testing.assert_array_equal(buffers["control_mean"].numpy(), reference.control_mean)
    np.testing.assert_array_equal(buffers["control_std"].numpy(), reference.control_std)
    np.testing.assert_array_equal(buffers["target_prior_mean"].numpy(), reference.cell_type_expressed_mean)
    np.testing.assert_array_equal(
        buffers["target_prior_std"].numpy(), np.maximum(reference.cell_type_expressed_std, 0.02)
    )
    mean, std = seen["expressed"]
    for row, (p, t, d) in enumerate(fold_conditions["keys"]):
        theirs = int(inputs.condition_lookup[p, t, d])
        if fold_conditions["held_out"][row]:
            # A fold condition has no cells of its own: its cell type's prior, as an untrained condition.
            assert theirs == -1
            np.testing.assert_array_equal(mean[row].numpy(), reference.cell_type_expressed_mean[t])
            np.testing.assert_array_equal(std[row].numpy(), reference.cell_type_expressed_std[t])
        else:
            np.testing.assert_array_equal(mean[row].numpy(), reference.condition_expressed_mean[theirs])
            np.testing.assert_array_equal(std[row].numpy(), reference.condition_expressed_std[theirs])


def _condition_rows(model, full, seen, doses=None) -> dict:
    """The module's condition rows (full data) and whether each is a fold condition (all its cells held out)."""
    keys = np.stack([full.condition_perturbation, full.condition_cell_type, full.condition_dose], axis=1)
    p, t = _codes(model, REGISTRY_KEYS.PERTURBATION_KEY), _codes(model, REGISTRY_KEYS.CELL_TYPE_KEY)
    is_control = full.is_control[p]
    if doses is None:
        dose_codes = np.zeros(len(p), dtype=np.int64)
    else:
        dose_codes = np.searchsorted(full.dose_values, doses)
        is_control = is_control | (doses == 0)
    held_out = [
        bool(seen["held_out"][(p == k[0]) & (t == k[1]) & (dose_codes == k[2]) & ~is_control].any()) for k in keys
    ]
    return {"keys": keys, "held_out": np.array(held_out)}


def test_module_statistics_during_calibration_are_fold_free(genes):
    model, full, seen, reference = genes
    rows = _condition_rows(model, full, seen)
    assert rows["held_out"].any()
    _check_module_without_fold(seen, reference, rows)
    # The fold changed the target prior: the check above is not vacuous.
    assert not np.array_equal(full.cell_type_expressed_mean, reference.cell_type_expressed_mean)


def test_after_the_calibration_the_module_has_the_full_statistics(genes):
    model, full, seen, reference = genes
    inputs = module_inputs(full)
    assert model.module.x_max.item() == pytest.approx(full.x_max, rel=1e-7)
    np.testing.assert_array_equal(model.module.target_prior_mean.numpy(), inputs.expressed_prior_mean.numpy())
    np.testing.assert_array_equal(model.module.expressed_mean.numpy(), inputs.expressed_mean.numpy())
    assert model._summary.x_max == full.x_max


def test_anchor_and_sources_of_the_calibration_exclude_the_fold(genes):
    model, full, seen, reference = genes
    held_out = seen["held_out"]
    labels = np.asarray(full.perturbation_labels)[_codes(model, REGISTRY_KEYS.PERTURBATION_KEY)]
    np.testing.assert_array_equal(held_out, np.isin(labels, model.calibration_["held_out"]))
    # The calibration's anchor: every cell but the fold's (the final anchor is fitted on all).
    assert any(np.array_equal(keep, ~held_out) for keep in seen["anchor_keep"])
    rows = np.concatenate(seen["source_rows"])
    assert len(rows) and (labels[rows] == "control").all()


def test_summarize_without_equals_the_summary_of_the_data_without_the_fold(genes):
    model, full, seen, reference = genes
    X = model.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    p, t = _codes(model, REGISTRY_KEYS.PERTURBATION_KEY), _codes(model, REGISTRY_KEYS.CELL_TYPE_KEY)
    without = summarize_without(X, full, p, t, seen["held_out"], seed=0)
    for name in (
        "x_max",
        "control_mean",
        "control_std",
        "cell_type_expressed_mean",
        "cell_type_expressed_std",
        "condition_perturbation",
        "condition_cell_type",
        "condition_frequencies",
        "condition_expressed_mean",
        "condition_expressed_std",
        "node_features",
        "reference_masks",
        "reference_condition",
    ):
        np.testing.assert_array_equal(getattr(without, name), getattr(reference, name), err_msg=name)
    with pytest.raises(ValueError, match="whole"):  # half a condition is not a fold
        summarize_without(X, full, p, t, (p == p[~full.is_control[p]][0]) & (np.arange(len(p)) % 2 == 0))


def test_validation_loss_leaves_the_fold_out_before_the_calibration_step(monkeypatch):
    inputs = ModuleInputs(
        x_max=5.0,
        control_mean=torch.full((1, 10), 0.3),
        control_std=torch.full((1, 10), 0.1),
        graph=GraphTensors.empty(),
        n_categories=2,
        train_recipes=torch.tensor([[-1], [0], [1]]),
        is_control=torch.tensor([True, False, False]),
    )
    module = DolorisModule(inputs, n_hidden=16, n_blocks=1, n_hidden_mask=16, n_blocks_mask=1, n_perturbation=8)
    weights = []
    loss = module.loss

    def spy(*args, weight=None):
        weights.append(weight)
        return loss(*args, weight=weight)

    monkeypatch.setattr(module, "loss", spy)
    plan = DolorisTrainingPlan(module, excluded_perturbations=[1], exclude_until_step=5)
    monkeypatch.setattr(DolorisTrainingPlan, "log", lambda *args, **kwargs: None)
    batch = {
        "X": torch.rand(4, 10),
        "perturbation": torch.tensor([[0], [1], [2], [1]]),
        "cell_type": torch.zeros(4, 1, dtype=torch.long),
    }
    plan.validation_step(batch, 0)
    np.testing.assert_array_equal(weights[-1].numpy(), [1.0, 0.0, 1.0, 0.0])


# ------------------------------------------------------------------------------------------- doses
def test_with_doses_the_held_out_conditions_are_left_out_too(drugs):
    model, full, seen, reference = drugs
    calibration = model.calibration_
    assert calibration["held_out"] and calibration["held_out_conditions"]
    used = seen["summary"]
    labels = full.perturbation_labels
    used_conditions = {
        (labels[p], model.cell_types[t], float(full.dose_values[d]))
        for p, t, d in zip(used.condition_perturbation, used.condition_cell_type, used.condition_dose, strict=True)
    }
    for label, cell_type, dose in calibration["held_out_conditions"]:
        assert (label, cell_type, dose) not in used_conditions
    assert not {label for label, _, _ in used_conditions} & set(calibration["held_out"])
    # The same conditions, and the same statistics, as summarize_training_data without those cells.
    reference_conditions = {
        (labels[p], model.cell_types[t], float(reference.dose_values[d]))
        for p, t, d in zip(
            reference.condition_perturbation, reference.condition_cell_type, reference.condition_dose, strict=True
        )
    }
    assert used_conditions == reference_conditions
    for name in ("node_features", "condition_frequencies", "condition_expressed_mean", "reference_masks"):
        np.testing.assert_array_equal(getattr(used, name), getattr(reference, name), err_msg=name)
    np.testing.assert_array_equal(seen["reference"].packed_masks, reference.reference_masks)
    for features in seen["node_features"]:
        np.testing.assert_array_equal(features.numpy(), reference.node_features)
    rows = _condition_rows(model, full, seen, model.adata.obs["dose"].to_numpy(dtype=np.float32))
    assert rows["held_out"].sum() > len(calibration["held_out_conditions"])  # fold drugs and held-out conditions
    _check_module_without_fold(seen, reference, rows)


# ------------------------------------------------------------------------------------ paper preset
def test_paper_preset_keeps_the_summary_of_all_the_data(synthetic_two_types, monkeypatch):
    calls = []
    monkeypatch.setattr(DolorisModule, "load_statistics", lambda self, inputs: calls.append(inputs))
    train = training_subset(synthetic_two_types)
    model = sd.Doloris(train, gene_graph=synthetic_two_types.uns["synthetic"]["edges"], preset="paper", **SMALL)
    before = model._summary
    buffers = {name: getattr(model.module, name).clone() for name in (*BUFFERS, "expressed_mean")}
    model.train(max_steps=10, seed=0, **TRAIN_KWARGS)
    assert not calls and model._summary is before
    for name, value in buffers.items():
        assert torch.equal(getattr(model.module, name), value), name
    # The prediction the code before this fold-free calibration gave (commit cc84e45, bit for bit on
    # the machine it was pinned on; the tolerance allows for another CPU's last bits). The masks were
    # re-pinned when each condition got its own random stream (issue 24, item 4); the bridge's
    # continuous values are those of cc84e45.
    pred = model.predict_perturbation(["G000+G003", "G005"], n_cells=6, seed=3, n_steps=8)
    np.testing.assert_allclose(pred.X.astype(np.float64).sum(), 1159.3010781407356, rtol=1e-6)
    np.testing.assert_allclose(pred.layers["doloris_continuous"].astype(np.float64).sum(), 1770.783264219761, rtol=1e-6)
    np.testing.assert_allclose(
        pred.X[0, :4],
        [2.473705768585205, 1.3010263442993164, 1.0057332515716553, 2.4406628608703613],
        rtol=1e-5,
        atol=1e-6,
    )


# ----------------------------------------------------------------------------------- resumed runs


@pytest.mark.parametrize("crash_at", [12, 27], ids=["before the calibration step", "after it"])
def test_resumed_anchored_run_equals_uninterrupted(synthetic_two_types, tmp_path, crash_at, crash_at_step):
    """A checkpoint restores the statistics of its phase: a resumed run ends as an uninterrupted one."""

    def fresh():
        edges = synthetic_two_types.uns["synthetic"]["edges"]
        return sd.Doloris(training_subset(synthetic_two_types), gene_graph=edges, **SMALL)

    kwargs = {"max_steps": 30, "seed": 7, **TRAIN_KWARGS}
    uninterrupted = fresh()
    uninterrupted.train(**kwargs)
    crashed = fresh()
    with pytest.raises(crash_at_step.error):
        crashed.train(
            checkpoint_dir=tmp_path, checkpoint_every_n_steps=5, callbacks=[crash_at_step(crash_at)], **kwargs
        )
    resumed = fresh()
    resumed.train(checkpoint_dir=tmp_path, checkpoint_every_n_steps=5, **kwargs)
    assert resumed.calibration_ == uninterrupted.calibration_
    expected = uninterrupted.module.state_dict()
    for name, value in resumed.module.state_dict().items():
        assert torch.equal(value, expected[name]), name
    np.testing.assert_array_equal(resumed.summary_["node_features"], uninterrupted.summary_["node_features"])
