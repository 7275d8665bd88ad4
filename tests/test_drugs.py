"""Molecular perturbations: setup with doses and SMILES, training, unseen molecules and doses."""

import numpy as np
import pandas as pd
import pytest
import torch

import scdoloris as sd
from scdoloris.prediction import resolve_request

DRUGS = {
    "entinostat": "Nc1ccccc1NC(=O)c1ccc(CNC(=O)OCc2cccnc2)cc1",
    "dacinostat": "O=C(/C=C/c1ccc(CN(CCO)CCc2c[nH]c3ccccc23)cc1)NO",
    "busulfan": "CS(=O)(=O)OCCCCOS(C)(=O)=O",
}
UNSEEN = {"mocetinostat": "Nc1ccccc1NC(=O)c1ccc(CNc2nccc(-c3cccnc3)n2)cc1"}


@pytest.fixture(scope="module")
def drug_data():
    """Controls and 3 drugs at 2 doses; the HDAC inhibitors shift genes 0-4, busulfan genes 5-9."""
    rng = np.random.default_rng(0)
    n_genes, n = 20, 40
    base = rng.uniform(0.5, 2.5, n_genes)
    blocks, obs = [], []
    for drug, dose in [("control", 0.0)] + [(d, x) for d in DRUGS for x in (10.0, 1000.0)]:
        shift = np.zeros(n_genes)
        if drug != "control":
            genes = slice(0, 5) if drug != "busulfan" else slice(5, 10)
            shift[genes] = 1.5 * np.log1p(dose) / np.log1p(1000.0)
        block = np.clip(base + shift + rng.normal(0, 0.3, (n, n_genes)), 0, None)
        block[rng.random(block.shape) < 0.2] = 0.0
        blocks.append(block)
        obs += [{"drug": drug, "dose": dose, "smiles": DRUGS.get(drug, ""), "cell_type": "A549"}] * n
    obs = pd.DataFrame(obs, index=[f"c{i}" for i in range(len(obs))])
    import anndata as ad

    adata = ad.AnnData(np.concatenate(blocks).astype(np.float32), obs=obs)
    adata.var_names = [f"G{i}" for i in range(n_genes)]
    return adata


def _registered(drug_data):
    """A copy of the drug data set up with doses and SMILES."""
    adata = drug_data.copy()
    sd.Doloris.setup_anndata(
        adata,
        perturbation_key="drug",
        control_value="control",
        cell_type_key="cell_type",
        dose_key="dose",
        smiles_key="smiles",
    )
    return adata


@pytest.fixture(scope="module")
def drug_model(drug_data, small_model_kwargs, train_kwargs):
    adata = _registered(drug_data)
    model = sd.Doloris(adata, **small_model_kwargs)
    model.train(max_steps=60, seed=0, **train_kwargs)
    return model


def test_molecules_are_not_categories(drug_model):
    summary = drug_model.summary_
    assert summary["categories"] == [] and sorted(summary["molecules"]["names"]) == sorted(DRUGS)
    np.testing.assert_array_equal(summary["dose_values"], [0.0, 10.0, 1000.0])
    # Conditions are (drug, cell type, dose): 6 perturbed + 1 control.
    assert len(summary["condition_perturbation"]) == 7
    assert drug_model.module.has_molecules


def test_predict_seen_unseen_molecule_and_dose(drug_model):
    pred = drug_model.predict_perturbation(
        ["entinostat", "mocetinostat"], dose=[100.0, 1000.0], smiles=UNSEEN, n_cells=15, n_steps=5, seed=0
    )
    assert pred.shape == (30, 20)
    assert list(pred.obs["perturbation"].cat.categories) == ["entinostat", "mocetinostat"]
    np.testing.assert_array_equal(pred.obs["dose"].to_numpy(), [100.0] * 15 + [1000.0] * 15)
    assert (pred.obs["dose"] == pred.obs["dose"]).all() and np.isfinite(pred.X).all()


def test_dose_changes_the_embedding_and_vanishes_at_zero(drug_model):
    request = resolve_request(["entinostat"] * 3, drug_model.control_values, dose=[0.0, 10.0, 5000.0])
    resolved = drug_model._perturbation_inputs(request, None)
    embedding, _ = drug_model.module.embed(
        resolved.recipes, resolved.graph, resolved.molecules, resolved.molecule_doses, resolved.molecule_features
    )
    assert float(embedding[0].abs().max()) == 0.0  # dose 0 is unperturbed
    assert float((embedding[1] - embedding[2]).abs().max()) > 0  # an unseen dose (5000) differs


def test_same_drug_at_two_doses_in_one_call(drug_model):
    pred = drug_model.predict_perturbation(["busulfan", "busulfan"], dose=[10.0, 1000.0], n_cells=5, n_steps=3)
    assert pred.n_obs == 10 and sorted(set(pred.obs["dose"])) == [10.0, 1000.0]
    assert pred.obs_names.is_unique


def test_drug_errors(drug_model, drug_data):
    with pytest.raises(ValueError, match="dose"):
        drug_model.predict_perturbation(["entinostat"], n_cells=2, n_steps=2)
    with pytest.raises(ValueError, match="mocetinostat"):
        drug_model.predict_perturbation(["mocetinostat"], dose=10.0, n_cells=2, n_steps=2)
    with pytest.raises(ValueError, match="not_a_smiles"):
        drug_model.predict_perturbation(["x"], dose=10.0, smiles={"x": "not_a_smiles"}, n_cells=2, n_steps=2)
    with pytest.raises(ValueError, match="entries"):
        drug_model.predict_perturbation(["entinostat"], dose=[1.0, 2.0], n_cells=2, n_steps=2)
    # A trained molecule given again: the same structure (any spelling) is fine, another one is refused.
    same = {"busulfan": "CS(=O)(=O)OCCCCOS(=O)(=O)C"}
    assert drug_model.predict_perturbation(["busulfan"], dose=10.0, smiles=same, n_cells=2, n_steps=2).n_obs == 2
    with pytest.raises(ValueError, match="different SMILES.*busulfan"):
        drug_model.predict_perturbation(["busulfan"], dose=10.0, smiles={"busulfan": "CCO"}, n_cells=2, n_steps=2)
    bad = drug_data.copy()
    bad.obs["dose"] = bad.obs["dose"].astype(str)
    with pytest.raises(ValueError, match="numeric"):
        sd.Doloris.setup_anndata(bad, perturbation_key="drug", control_value="control", dose_key="dose")
    bad = drug_data.copy()
    bad.obs.iloc[50, bad.obs.columns.get_loc("dose")] = -1.0
    with pytest.raises(ValueError, match="negative"):
        sd.Doloris.setup_anndata(bad, perturbation_key="drug", control_value="control", dose_key="dose")


def test_drug_model_save_load(drug_model, tmp_path):
    drug_model.save(str(tmp_path / "m"))
    loaded = sd.Doloris.load(str(tmp_path / "m"), drug_model.adata)
    kwargs = {"dose": 100.0, "smiles": UNSEEN, "n_cells": 5, "n_steps": 3, "seed": 1}
    a = drug_model.predict_perturbation(["mocetinostat"], **kwargs)
    b = loaded.predict_perturbation(["mocetinostat"], **kwargs)
    np.testing.assert_array_equal(a.X, b.X)


def test_precomputed_molecule_table(drug_data, tmp_path, small_model_kwargs, train_kwargs):
    """Doloris(molecule_table=...) embeds molecules from a user table, indexed by name or by SMILES."""
    rng = np.random.default_rng(3)
    # Entinostat by name, the others by (non-canonical spellings of) their SMILES; mocetinostat only in the table.
    dacinostat, busulfan = "O=C(/C=C/c1ccc(CN(CCO)CCc2c[nH]c3ccccc23)cc1)NO", "CS(=O)(=O)OCCCCOS(=O)(=O)C"
    index = ["entinostat", dacinostat, busulfan, "mocetinostat"]
    table = pd.DataFrame(rng.normal(size=(4, 16)), index=index)
    adata = _registered(drug_data)
    model = sd.Doloris(adata, molecule_table=table, **small_model_kwargs)
    features = model.summary_["molecules"]
    assert features["kind"] == "table" and sorted(features["names"]) == sorted(DRUGS)
    row = features["names"].index("busulfan")
    np.testing.assert_allclose(features["features"][row], table.iloc[2].to_numpy(), rtol=1e-6)
    assert model.module.molecule_encoder.features.shape[1] == 16
    model.train(max_steps=5, seed=0, **train_kwargs)
    # A molecule found in the table needs no SMILES; one in neither gets an error naming it.
    pred = model.predict_perturbation(["mocetinostat"], dose=100.0, n_cells=4, n_steps=3, seed=0)
    assert pred.n_obs == 4 and np.isfinite(pred.X).all()
    with pytest.raises(ValueError, match="vorinostat"):
        model.predict_perturbation(["vorinostat"], dose=100.0, n_cells=2, n_steps=2)
    model.save(str(tmp_path / "m"))
    loaded = sd.Doloris.load(str(tmp_path / "m"), adata)
    again = loaded.predict_perturbation(["mocetinostat"], dose=100.0, n_cells=4, n_steps=3, seed=0)
    np.testing.assert_array_equal(pred.X, again.X)


def test_anchored_dose_zero_is_the_source_cells(drug_model):
    """At dose 0 a drug is no perturbation: the anchored prediction returns the source control cells."""
    pred = drug_model.predict_perturbation(["busulfan"], dose=0.0, n_cells=5, n_steps=3, seed=0)
    assert pred.uns["doloris_anchoring"]["kind"] == ["control"]
    sources = drug_model.adata[pred.obs["control_cell"].to_numpy()].X
    np.testing.assert_allclose(pred.X, np.asarray(sources), atol=1e-6)


def test_doses_as_text_are_refused(drug_model):
    with pytest.raises(ValueError, match="Doses must be numbers"):
        drug_model.predict_perturbation(["busulfan"], dose="100", n_cells=2, n_steps=2)
    with pytest.raises(ValueError, match="Doses must be numbers"):
        drug_model.predict_perturbation(["busulfan", "entinostat"], dose=[10.0, "1e3"], n_cells=2, n_steps=2)


def test_calibration_holds_out_doses_of_trained_drugs(tmp_path, small_model_kwargs, train_kwargs):
    """With doses, the calibration fold also holds out (drug, cell type, dose) conditions whose drug
    trains at other doses: their gate ("related") is fitted, and before the calibration step their
    cells get no weight in the loss."""
    from scdoloris.model._anchoring import CALIBRATION_CONDITION_FRACTION
    from scdoloris.train import DolorisTrainingPlan

    adata = sd.datasets.synthetic_drug_perturbations(
        n_genes=30, n_drugs=8, n_cells_per_condition=12, n_control_cells=40, cell_types=("A", "B"), seed=0
    )
    sd.Doloris.setup_anndata(
        adata, perturbation_key="perturbation", cell_type_key="cell_type", dose_key="dose", smiles_key="smiles"
    )
    model = sd.Doloris(adata, **small_model_kwargs)
    model.train(max_steps=20, batch_size=64, seed=0, **train_kwargs)
    calibration = model.calibration_
    fold, conditions = calibration["held_out"], calibration["held_out_conditions"]
    n_outside = (8 - len(fold)) * 2 * 4  # drugs outside the fold x cell types x doses
    assert len(conditions) == round(CALIBRATION_CONDITION_FRACTION * n_outside)
    assert all(drug not in fold and cell_type in ("A", "B") and dose > 0 for drug, cell_type, dose in conditions)
    assert calibration["n_conditions"]["related"] == len(conditions)
    assert 0.0 <= calibration["gates"]["related"] <= 1.0
    model.save(tmp_path / "model")
    assert sd.Doloris.load(tmp_path / "model", adata=adata).calibration_ == calibration  # doses stay numbers

    # The plan's weights: 0 for a held-out condition's cells, 1 for the same drug at another dose.
    drug, cell_type, dose = conditions[0]
    codes = {label: i for i, label in enumerate(model._registered_categories("perturbation"))}
    types = {t: i for i, t in enumerate(model.cell_types)}
    plan = DolorisTrainingPlan(
        model.module, excluded_conditions=[[codes[drug], types[cell_type], dose]], exclude_until_step=5
    )
    batch = {
        "X": torch.zeros(3, 30),
        "perturbation": torch.tensor([[codes[drug]]] * 3),
        "cell_type": torch.tensor([[types[cell_type]]] * 3),
        "dose": torch.tensor([[dose], [dose * 10.0], [dose]]),
    }
    batch["cell_type"][2] = 1 - types[cell_type]
    np.testing.assert_array_equal(plan._fold_weight(batch, batch["perturbation"].reshape(-1)).numpy(), [0.0, 1.0, 1.0])
