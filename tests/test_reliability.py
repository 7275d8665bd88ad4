"""Reliability (issue 6): bad input gets a clear error, nothing is lost, results are reproducible.

The tables of bad inputs here are the ones documented in ``docs/reliability.md``; keep both in step.
"""

import os
import signal
import subprocess
import sys
import time
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from conftest import SMALL, TRAIN_KWARGS, training_subset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback

import scdoloris as sd

N_STEPS = 5  # DDIM steps in predictions: enough to exercise the code, cheap
TINY = {"n_hidden": 16, "n_hidden_mask": 16, "n_perturbation": 8, "n_blocks": 1, "n_blocks_mask": 1}


def _small_adata(n_cell_types: int = 1) -> AnnData:
    return sd.datasets.synthetic_perturbations(
        n_genes=10,
        n_perturbed_genes=2,
        n_cells_per_condition=5,
        n_control_cells=10,
        n_doubles=0,
        n_cell_types=n_cell_types,
        seed=0,
    )


def _setup(adata, **kwargs):
    kwargs = {"perturbation_key": "perturbation", "control_value": "control", "cell_type_key": "cell_type", **kwargs}
    sd.Doloris.setup_anndata(adata, **kwargs)


def _relabel(adata, new_label: str, which: str = "G000") -> None:
    """Give the cells of perturbation ``which`` the label ``new_label``."""
    labels = adata.obs["perturbation"].astype(str)
    labels[labels == which] = new_label
    adata.obs["perturbation"] = pd.Categorical(labels)


def _set_x(value):
    def mutate(adata):
        adata.X = adata.X.copy()
        adata.X[0, 0] = value

    return mutate


def _counts(adata):
    adata.X = np.round(np.expm1(adata.X) * 5)


def _no_controls_in_ct1(adata):
    types = adata.obs["cell_type"].astype(str).to_numpy()
    controls = adata.obs["perturbation"].astype(str).to_numpy() == "control"
    types[~controls & (np.arange(adata.n_obs) % 2 == 0)] = "ct_without_controls"
    adata.obs["cell_type"] = pd.Categorical(types)


def _missing_label(adata):
    labels = adata.obs["perturbation"].astype(object)
    labels.iloc[-1] = np.nan
    adata.obs["perturbation"] = labels


def _missing_cell_type(adata):
    types = adata.obs["cell_type"].astype(object)
    types.iloc[-1] = None
    adata.obs["cell_type"] = types


def _duplicate_gene(adata):
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names


def _bad_layer(adata):
    adata.layers["bad"] = -adata.X - 1


def _dose(values):
    def mutate(adata):
        adata.obs["dose"] = values(adata.n_obs)

    return mutate


def _nothing(adata):
    pass


def _both_orders(adata):
    """Half of G000's cells labelled "G000+G001", the other half "G001+G000"."""
    labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
    rows = np.flatnonzero(labels == "G000")
    labels[rows[::2]], labels[rows[1::2]] = "G000+G001", "G001+G000"
    adata.obs["perturbation"] = pd.Categorical(labels)


def _one_gene(adata):
    adata._inplace_subset_var(adata.var_names[:1])


# (id, mutation of a valid AnnData, setup_anndata overrides, exception type, text the message must contain)
SETUP_CASES = [
    ("missing perturbation_key", _nothing, {"perturbation_key": "pert_col"}, KeyError, "pert_col"),
    ("missing cell_type_key", _nothing, {"cell_type_key": "celltype_col"}, KeyError, "celltype_col"),
    ("missing dose_key", _nothing, {"dose_key": "dose_col"}, KeyError, "dose_col"),
    ("missing layer", _nothing, {"layer": "log1p_missing"}, KeyError, "log1p_missing"),
    ("control label absent", _nothing, {"control_value": "ctrl"}, ValueError, "'ctrl'"),
    ("empty control_value", _nothing, {"control_value": []}, ValueError, "control_value"),
    ("NaN in X", _set_x(np.nan), {}, ValueError, "NaN"),
    ("inf in X", _set_x(np.inf), {}, ValueError, "infinite"),
    ("negative values", _set_x(-1.0), {}, ValueError, "negative"),
    ("raw counts", _counts, {}, ValueError, "raw counts"),
    ("bad values in the layer", _bad_layer, {"layer": "bad"}, ValueError, "layers['bad']"),
    ("cell type without controls", _no_controls_in_ct1, {}, ValueError, "ct_without_controls"),
    ("empty component A++B", lambda a: _relabel(a, "G000++G001"), {}, ValueError, "'G000++G001'"),
    ("leading separator +A", lambda a: _relabel(a, "+G000"), {}, ValueError, "'+G000'"),
    ("trailing separator A+", lambda a: _relabel(a, "G000+"), {}, ValueError, "'G000+'"),
    ("leading whitespace", lambda a: _relabel(a, " G000"), {}, ValueError, "' G000'"),
    ("whitespace in a combination", lambda a: _relabel(a, "G000 +G001"), {}, ValueError, "'G000 +G001'"),
    ("empty label", lambda a: _relabel(a, ""), {}, ValueError, "label ''"),
    ("only control components", lambda a: _relabel(a, "control+control"), {}, ValueError, "'control+control'"),
    ("missing perturbation label", _missing_label, {}, ValueError, "missing"),
    ("missing cell type", _missing_cell_type, {}, ValueError, "obs['cell_type']"),
    ("duplicated genes", _duplicate_gene, {}, ValueError, "duplicated"),
    ("non-numeric doses", _dose(lambda n: np.array(["high"] * n)), {"dose_key": "dose"}, ValueError, "obs['dose']"),
    ("negative dose", _dose(lambda n: -np.ones(n)), {"dose_key": "dose"}, ValueError, "obs['dose']"),
    # Issue 16: one combination under two labels, a repeated component, one gene.
    ("A+B and B+A", _both_orders, {}, ValueError, "names one combination twice"),
    ("repeated component A+A", lambda a: _relabel(a, "G000+G000"), {}, ValueError, "repeats a component"),
    ("one gene", _one_gene, {}, ValueError, "at least 2 genes"),
]


@pytest.mark.parametrize(
    ("mutate", "overrides", "error", "text"),
    [case[1:] for case in SETUP_CASES],
    ids=[case[0] for case in SETUP_CASES],
)
def test_setup_rejects_bad_input(mutate, overrides, error, text):
    adata = _small_adata()
    mutate(adata)
    X = adata.X.copy()
    with pytest.raises(error) as info:
        _setup(adata, **overrides)
    message = str(info.value)
    assert text in message, message
    assert len(message) > len(text) + 20, "the message should also say what to do"
    np.testing.assert_array_equal(adata.X, X)  # nothing changed on the way to the error


def test_setup_rejects_a_view():
    adata = _small_adata()
    with pytest.raises(ValueError, match=r"adata\.copy\(\)"):
        _setup(adata[:20])


def test_setup_rejects_an_empty_anndata():
    adata = _small_adata()[:0].copy()
    with pytest.raises(ValueError, match="empty"):
        _setup(adata)


def test_unused_categories_are_dropped_with_a_warning():
    """Levels declared without cells (e.g. categories fixed from a larger design): dropped, with a warning."""
    adata = _small_adata()
    adata.obs["perturbation"] = adata.obs["perturbation"].cat.add_categories(["G_gone"])
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["ct_gone"])
    values = {key: adata.obs[key].astype(str).copy() for key in ("perturbation", "cell_type")}
    with pytest.warns(UserWarning, match="G_gone") as record:
        _setup(adata)
    messages = " ".join(str(w.message) for w in record)
    assert "ct_gone" in messages and "remove_unused_categories" in messages
    assert "G_gone" not in adata.obs["perturbation"].cat.categories
    assert "ct_gone" not in adata.obs["cell_type"].cat.categories
    for key, before in values.items():
        pd.testing.assert_series_equal(adata.obs[key].astype(str), before)  # every cell keeps its value
    model = sd.Doloris(adata, gene_graph=None, **TINY)
    assert "G_gone" not in model._summary.perturbation_labels


@pytest.mark.parametrize(
    ("argument", "value"),
    [("n_hidden", 0), ("n_blocks", -1), ("n_timesteps", 1), ("mask_reference_cells", 2.5), ("dropout", 1.0)],
)
def test_init_rejects_bad_arguments(argument, value):
    adata = _small_adata()
    _setup(adata)
    with pytest.raises(ValueError, match=argument):
        sd.Doloris(adata, gene_graph=None, **{**TINY, argument: value})


# ------------------------------------------------------------------------------------------ prediction
def _controls(model):
    adata = model.adata
    return adata[adata.obs["perturbation"] == "control"].copy()


def _other_genes(model):
    return _controls(model)[:, 1:].copy()


def _extra_gene(model):
    controls = _controls(model)
    X = np.hstack([controls.X, np.zeros((controls.n_obs, 1), dtype=controls.X.dtype)])
    return AnnData(
        X, obs=controls.obs[["perturbation", "cell_type"]], var=pd.DataFrame(index=[*controls.var_names, "EXTRA"])
    )


def _reordered_genes(model):
    controls = _controls(model)
    return controls[:, controls.var_names[::-1]].copy()


def _nan_controls(model):
    controls = _controls(model)
    controls.X[0, 0] = np.nan
    return controls


def _unseen_cell_type_controls(model):
    controls = _controls(model)
    controls.obs["cell_type"] = pd.Categorical(["ct9"] * controls.n_obs)
    return controls


def _duplicated_gene_controls(model):
    controls = _controls(model)
    names = list(controls.var_names)
    names[1] = names[0]
    controls.var_names = names
    return controls


# (id, predict_perturbation arguments (callables get the model), exception type, text the message must contain)
PREDICT_CASES = [
    ("unknown gene", {"perturbations": ["NOTAGENE"]}, ValueError, "NOTAGENE"),
    ("unknown gene in a combination", {"perturbations": ["G000+NOTAGENE"]}, ValueError, "NOTAGENE"),
    (
        "molecule (SMILES) for a gene model",
        {"perturbations": ["drugX"], "smiles": {"drugX": "CCO"}},
        ValueError,
        "smiles",
    ),
    ("control is not a perturbation", {"perturbations": ["control"]}, ValueError, "control"),
    ("unparsable label", {"perturbations": ["G000++G001"]}, ValueError, "'G000++G001'"),
    ("unseen cell type", {"cell_type": "ct9"}, ValueError, "ct9"),
    ("n_cells = 0", {"n_cells": 0}, ValueError, "n_cells"),
    ("n_cells < 0", {"n_cells": -3}, ValueError, "n_cells"),
    ("n_steps = 0", {"n_steps": 0}, ValueError, "n_steps"),
    ("batch_size = 0", {"batch_size": 0}, ValueError, "batch_size"),
    ("unknown mask_strategy", {"mask_strategy": "magic"}, ValueError, "magic"),
    ("mask_thresholds outside [0, 1]", {"mask_thresholds": (0.2, 1.5)}, ValueError, "mask_thresholds"),
    ("controls missing genes", {"adata": _other_genes}, ValueError, "missing"),
    ("controls with an extra gene", {"adata": _extra_gene}, ValueError, "EXTRA"),
    ("controls with genes reordered", {"adata": _reordered_genes}, ValueError, "order"),
    ("controls with duplicated genes", {"adata": _duplicated_gene_controls}, ValueError, "duplicated"),
    ("controls with NaN", {"adata": _nan_controls}, ValueError, "NaN"),
    ("controls of an unseen cell type", {"adata": _unseen_cell_type_controls}, ValueError, "ct9"),
    ("inplace without adata", {"inplace": True}, ValueError, "inplace"),
    # Issue 16: arguments that mean nothing, or are not what they should be.
    ("perturbations=None", {"perturbations": None}, ValueError, "perturbations must be a label"),
    ("a number for perturbations", {"perturbations": 3}, ValueError, "perturbations must be a label"),
    ("None inside perturbations", {"perturbations": ["G000", None]}, ValueError, "are not labels"),
    ("cell_type=0 (no such cell type)", {"cell_type": 0}, ValueError, "known cell types"),
    ("a dict for cell_type", {"cell_type": {"ct0": 1}}, ValueError, "cell_type must be a label"),
    ("a dose for a model without doses", {"dose": 10.0}, ValueError, "without doses"),
    ("controls: zero cells", {"adata": lambda m: _controls(m)[:0].copy()}, ValueError, "no cells"),
    ("controls: not an AnnData", {"adata": lambda m: _controls(m).X}, ValueError, "must be an AnnData"),
    ("key_added with '/'", {"adata": _controls, "inplace": True, "key_added": "a/b"}, ValueError, "without '/'"),
    ("n_cells beyond memory", {"n_cells": 10**12}, ValueError, "n_cells"),
    ("seed as text", {"seed": "a"}, ValueError, "seed must be"),
    ("negative seed", {"seed": -1}, ValueError, "seed must be"),
    ("mask_thresholds a number", {"mask_thresholds": 0.5}, ValueError, "mask_thresholds"),
    ("overwrite as text", {"overwrite": "no"}, ValueError, "overwrite must be True or False"),
    ("progress_bar as text", {"progress_bar": "yes"}, ValueError, "progress_bar must be"),
]


@pytest.mark.parametrize(
    ("arguments", "error", "text"), [case[1:] for case in PREDICT_CASES], ids=[case[0] for case in PREDICT_CASES]
)
def test_prediction_rejects_bad_input(trained_model, arguments, error, text):
    arguments = {k: v(trained_model) if callable(v) else v for k, v in arguments.items()}
    arguments = {"perturbations": ["G000"], "n_cells": 3, "n_steps": N_STEPS, **arguments}
    with pytest.raises(error) as info:
        trained_model.predict_perturbation(**arguments)
    assert text in str(info.value), str(info.value)


# ------------------------------------------------------------------------------- stale or changed state
def _tiny_model(adata=None, **setup):
    adata = _small_adata() if adata is None else adata
    _setup(adata, **setup)
    model = sd.Doloris(adata, gene_graph=None, **TINY)
    model.train(max_steps=2, seed=0, **TRAIN_KWARGS)
    return model


def test_a_second_setup_of_the_same_anndata_is_detected():
    """A second setup_anndata rewrites the codes the model reads: refused until set up as before."""
    model = _tiny_model()
    adata = model.adata
    sd.Doloris.setup_anndata(adata, perturbation_key="cell_type", control_value="ct0")
    with pytest.raises(ValueError, match="set up again") as info:
        model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS)
    assert "perturbation_key" in str(info.value)  # says which arguments to set it up with
    with pytest.raises(ValueError, match="set up again"):
        model.train(max_steps=1, **TRAIN_KWARGS)
    _setup(adata)  # the model's own arguments again: the same codes, usable again
    assert model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS).n_obs == 3


def test_a_copy_set_up_or_loaded_leaves_the_original_model_working(tmp_path):
    """A copy shares the registration's uuid: setting it up (or loading onto it) must not break the original."""
    model = _tiny_model()
    before = model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS, seed=1).X
    other = model.adata.copy()
    _setup(other)
    copy_model = sd.Doloris(other, gene_graph=None, **TINY)
    model.save(tmp_path / "model")
    loaded = sd.Doloris.load(tmp_path / "model", model.adata.copy())
    for user in (model, copy_model, loaded):
        assert user.get_latent_representation().shape[0] == user.adata.n_obs
    np.testing.assert_array_equal(model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS, seed=1).X, before)
    np.testing.assert_array_equal(loaded.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS, seed=1).X, before)
    model.train(max_steps=1, **TRAIN_KWARGS)
    copy_model.train(max_steps=1, **TRAIN_KWARGS)
    # Setting the original itself up again differently is still refused.
    sd.Doloris.setup_anndata(model.adata, perturbation_key="cell_type", control_value="ct0")
    with pytest.raises(ValueError, match="set up again"):
        model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS)


@pytest.mark.parametrize("value", [np.nan, -1.0, np.inf])
def test_training_rechecks_the_models_anndata(value):
    """Data edited after the model was built: train() refuses before its first step; the model stays untrained."""
    adata = _small_adata()
    _setup(adata)
    model = sd.Doloris(adata, gene_graph=None, **TINY)
    model.adata.X = model.adata.X.copy()
    model.adata.X[0, 0] = value
    with pytest.raises(ValueError, match="adata.X"):
        model.train(max_steps=2, **TRAIN_KWARGS)
    assert not model.is_trained


@pytest.mark.parametrize("indices", [[], np.array([], dtype=int), np.zeros(0, dtype=bool)])
def test_latent_of_no_cell_is_empty(trained_model, indices):
    latent = trained_model.get_latent_representation(indices=indices, n_steps=N_STEPS)
    assert latent.shape == (0, trained_model.adata.n_vars) and latent.dtype == np.float32


def test_prediction_rechecks_the_models_anndata():
    model = _tiny_model()
    model.adata.X = model.adata.X.copy()
    model.adata.X[0, 0] = -1.0  # edited after set-up
    with pytest.raises(ValueError, match="negative"):
        model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS)


def test_load_refuses_raw_counts(trained_model, tmp_path):
    trained_model.save(tmp_path / "model")
    counts = trained_model.adata.copy()
    counts.X = np.round(np.expm1(counts.X) * 5)
    with pytest.raises(ValueError, match="raw counts"):
        sd.Doloris.load(tmp_path / "model", adata=counts)


@pytest.mark.parametrize(
    ("arguments", "text"),
    [
        ({"max_steps": 0}, "max_steps"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"train_size": 0.0}, "train_size"),
        ({"train_size": 1.5}, "train_size"),
        ({"validation_size": 1.0}, "validation_size"),
        ({"train_size": 0.8, "validation_size": 0.5}, "at most 1"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_training_on_nothing_is_refused_and_leaves_the_model_untrained(arguments, text):
    adata = _small_adata()
    _setup(adata)
    model = sd.Doloris(adata, gene_graph=None, **TINY)
    with pytest.raises(ValueError, match=text):
        model.train(**{"max_steps": 2, **arguments}, **TRAIN_KWARGS)
    assert not model.is_trained_


def test_integer_coded_labels():
    """Perturbations and cell types stored as integers, control_value=0: labels are their text."""
    adata = _small_adata(n_cell_types=2)
    codes = {"control": 0, "G000": 1, "G001": 2}
    adata = adata[adata.obs["perturbation"].isin(list(codes)).to_numpy()].copy()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).map(codes).astype(int)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).map({"ct0": 7, "ct1": 8}).astype(int)
    model = _tiny_model(adata, control_value=0)
    assert model.control_values == ["0"] and model.cell_types == ["7", "8"]
    pred = model.predict_perturbation(["1", "1+2"], cell_type=7, n_cells=3, n_steps=N_STEPS)
    assert list(pred.obs["perturbation"].cat.categories) == ["1", "1+2"] and set(pred.obs["cell_type"]) == {"7"}


def test_inplace_keys_are_h5ad_safe(tmp_path):
    """A label with '/' is written '_' in in-place keys; the file reads back; uns maps entries to layers."""
    adata = _small_adata()
    _relabel(adata, "IFN/stim")
    model = _tiny_model(adata)
    controls = adata[adata.obs["perturbation"] == "control"].copy()
    model.predict_perturbation(["IFN/stim", "G001"], adata=controls, inplace=True, n_steps=N_STEPS)
    assert "doloris_IFN_stim" in controls.layers and "doloris_IFN_stim_mask" in controls.layers
    assert controls.uns["doloris_keys"] == {
        "entry": ["IFN/stim", "G001"],
        "layer": ["doloris_IFN_stim", "doloris_G001"],
    }
    controls.write_h5ad(tmp_path / "controls.h5ad")
    back = ad.read_h5ad(tmp_path / "controls.h5ad")
    np.testing.assert_array_equal(back.layers["doloris_IFN_stim"], controls.layers["doloris_IFN_stim"])
    with pytest.raises(ValueError, match="same in-place keys"):
        _relabel(adata, "IFN_stim", which="G001")  # now both spellings are trained labels
        _tiny_model(adata).predict_perturbation(["IFN/stim", "IFN_stim"], adata=controls, inplace=True, overwrite=True)


# ----------------------------------------------------------------------------------------- nothing lost
def test_inplace_prediction_keeps_data_and_refuses_to_overwrite(trained_model):
    controls = _controls(trained_model)[:6].copy()
    controls.layers["mine"] = controls.X + 1
    controls.obsm["mine"] = np.ones((controls.n_obs, 2))
    before = {"X": controls.X.copy(), "layer": controls.layers["mine"].copy(), "obsm": controls.obsm["mine"].copy()}
    kwargs = {"adata": controls, "inplace": True, "n_steps": N_STEPS, "seed": 0}
    assert trained_model.predict_perturbation(["G000"], **kwargs) is None
    first = controls.layers["doloris_G000"].copy()
    with pytest.raises(ValueError, match=r"layers\['doloris_G000'\].*overwrite=True"):
        trained_model.predict_perturbation(["G000"], **kwargs)
    np.testing.assert_array_equal(controls.layers["doloris_G000"], first)  # refused: untouched
    trained_model.predict_perturbation(["G000"], overwrite=True, **kwargs)
    # A second perturbation: listed beside the first in the index of what was written.
    trained_model.predict_perturbation(["G001"], overwrite=True, **kwargs)
    assert controls.uns["doloris_keys"] == {"entry": ["G000", "G001"], "layer": ["doloris_G000", "doloris_G001"]}
    np.testing.assert_array_equal(controls.X, before["X"])
    np.testing.assert_array_equal(controls.layers["mine"], before["layer"])
    np.testing.assert_array_equal(controls.obsm["mine"], before["obsm"])


def test_inplace_prediction_refuses_to_replace_a_users_uns_entry(trained_model):
    controls = _controls(trained_model)[:4].copy()
    controls.uns["doloris_keys"] = "my notes"
    kwargs = {"adata": controls, "inplace": True, "n_steps": N_STEPS, "seed": 0}
    with pytest.raises(ValueError, match=r"uns\['doloris_keys'\].*overwrite=True"):
        trained_model.predict_perturbation(["G000"], **kwargs)
    assert controls.uns["doloris_keys"] == "my notes" and "doloris_G000" not in controls.layers
    trained_model.predict_perturbation(["G000"], key_added="pred", **kwargs)
    assert controls.uns["doloris_keys"] == "my notes" and controls.uns["pred_keys"]["entry"] == ["G000"]


def test_save_refuses_to_replace_a_directory_that_is_not_a_model(trained_model, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a saved model"):
        trained_model.save(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_save_interrupted_midway_keeps_the_old_model(trained_model, tmp_path, monkeypatch):
    path = tmp_path / "model"
    trained_model.save(path)
    before = trained_model.predict_perturbation(["G000"], n_cells=4, n_steps=N_STEPS, seed=0)
    original = (path / "model.pt").read_bytes()

    def half_written_then_crash(obj, file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"PK\x03\x04 half a model")
        raise OSError("disk full")

    import scvi.model.base._base_model as base_model

    monkeypatch.setattr(base_model.torch, "save", half_written_then_crash)
    with pytest.raises(OSError, match="disk full"):
        trained_model.save(path, overwrite=True)
    monkeypatch.undo()
    assert (path / "model.pt").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the staging directory is gone
    loaded = sd.Doloris.load(path, adata=trained_model.adata)
    after = loaded.predict_perturbation(["G000"], n_cells=4, n_steps=N_STEPS, seed=0)
    np.testing.assert_array_equal(before.X, after.X)


_KILLED_SAVE = """
import sys, time, torch
import scvi.model.base._base_model as base_model
import scdoloris as sd

model = sd.Doloris.load(sys.argv[1])
real_save = torch.save

def slow_save(obj, file, *args, **kwargs):
    with open(file, "wb") as handle:
        handle.write(b"PK\\x03\\x04 the first bytes")
        handle.flush()
        print("WRITING", flush=True)
        time.sleep(120)  # killed here, mid-write

base_model.torch.save = slow_save
model.save(sys.argv[1], overwrite=True, save_anndata=True)
"""


def test_save_killed_midway_keeps_the_old_model(trained_model, tmp_path):
    """SIGKILL while the model file is half written: the old model is still there and loads."""
    path = tmp_path / "model"
    trained_model.save(path, save_anndata=True)
    original = (path / "model.pt").read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    ) as process:
        try:
            lines = iter(process.stdout.readline, b"")  # blocks until the file is half written (or the child dies)
            assert any(line.strip() == b"WRITING" for line in lines), "the save never started writing"
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert (path / "model.pt").read_bytes() == original
    sd.Doloris.load(path)


# ------------------------------------------------------------------------------------------------- load
def _saved(model, tmp_path):
    path = tmp_path / "model"
    model.save(path)
    return path


def _rewrite_attributes(path, change):
    content = torch.load(path / "model.pt", weights_only=False)
    change(content["attr_dict"])
    torch.save(content, path / "model.pt")


def test_load_reports_a_truncated_file(trained_model, tmp_path):
    path = _saved(trained_model, tmp_path)
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.pt is corrupted or truncated"):
        sd.Doloris.load(path, adata=trained_model.adata)


def test_load_reports_a_corrupted_file(trained_model, tmp_path):
    path = _saved(trained_model, tmp_path)
    (path / "model.pt").write_bytes(b"\x80\x04 not a model at all")
    with pytest.raises(ValueError, match="model.pt is corrupted or truncated"):
        sd.Doloris.load(path, adata=trained_model.adata)


def test_load_reports_a_missing_model(tmp_path):
    with pytest.raises(ValueError, match="No saved model"):
        sd.Doloris.load(tmp_path / "nowhere")


def test_load_checks_the_class(trained_model, tmp_path):
    path = _saved(trained_model, tmp_path)
    _rewrite_attributes(path, lambda attrs: attrs["registry_"].update(model_name="SCVI"))
    with pytest.raises(ValueError, match="holds a SCVI model, not a Doloris"):
        sd.Doloris.load(path, adata=trained_model.adata)


def test_load_checks_the_version(trained_model, tmp_path):
    path = _saved(trained_model, tmp_path)
    _rewrite_attributes(path, lambda attrs: attrs.update(scdoloris_version_="999.0"))
    with pytest.warns(UserWarning, match="saved by scdoloris 999.0"):
        sd.Doloris.load(path, adata=trained_model.adata)
    _rewrite_attributes(path, lambda attrs: attrs["summary_"].update(field_of_a_future_version=1))
    with pytest.raises(ValueError, match="cannot read"):
        sd.Doloris.load(path, adata=trained_model.adata)


# ------------------------------------------------------------------------------- checkpoint and resume
@pytest.fixture(scope="module")
def resume_data():
    return sd.datasets.synthetic_perturbations(
        n_genes=20, n_perturbed_genes=4, n_cells_per_condition=20, n_control_cells=60, n_doubles=1, seed=3
    )


def _fresh_model(data):
    return sd.Doloris(training_subset(data), gene_graph=data.uns["synthetic"]["edges"], **SMALL)


RESUME_STEPS = 30  # 3 training batches per epoch: 10 epochs, validation in between


class _Crash(Exception):
    pass


class _CrashAtStep(Callback):
    """Raises when training reaches a step: the run dies mid-training, as in a crash."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise _Crash()


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(resume_data):
    """Weights after RESUME_STEPS steps without any checkpointing."""
    model = _fresh_model(resume_data)
    model.train(max_steps=RESUME_STEPS, seed=7, **TRAIN_KWARGS)
    return _state(model)


@pytest.mark.parametrize(("every", "crash_at"), [(5, 12), (6, 8)], ids=["mid-epoch checkpoint", "epoch-end checkpoint"])
def test_resumed_training_equals_uninterrupted(resume_data, uninterrupted, tmp_path, every, crash_at):
    crashed = _fresh_model(resume_data)
    with pytest.raises(_Crash):
        crashed.train(
            max_steps=RESUME_STEPS,
            seed=7,
            checkpoint_dir=tmp_path,
            checkpoint_every_n_steps=every,
            callbacks=[_CrashAtStep(crash_at)],
            **TRAIN_KWARGS,
        )
    assert (tmp_path / "last.ckpt").exists()
    resumed = _fresh_model(resume_data)
    resumed.train(
        max_steps=RESUME_STEPS, seed=7, checkpoint_dir=tmp_path, checkpoint_every_n_steps=every, **TRAIN_KWARGS
    )
    assert resumed.trainer.global_step == RESUME_STEPS
    _assert_same_weights(_state(resumed), uninterrupted)


def test_a_failed_training_leaves_the_starting_weights(resume_data, uninterrupted):
    """A run that dies midway restores the weights it started from; a same-seed retry equals a clean run."""
    model = _fresh_model(resume_data)
    start = _state(model)
    with pytest.raises(_Crash):
        model.train(max_steps=RESUME_STEPS, seed=7, callbacks=[_CrashAtStep(8)], **TRAIN_KWARGS)
    assert not model.is_trained
    _assert_same_weights(_state(model), start)
    model.train(max_steps=RESUME_STEPS, seed=7, **TRAIN_KWARGS)
    _assert_same_weights(_state(model), uninterrupted)


_KILLED_TRAINING = """
import sys, time, scvi, torch
from lightning.pytorch.callbacks import Callback
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
scvi.settings.seed = 0
import scdoloris as sd
from conftest import SMALL, training_subset

class Slow(Callback):  # slow enough to be killed between checkpoints
    def on_train_batch_end(self, trainer, *args):
        time.sleep(0.3)

data = sd.datasets.synthetic_perturbations(
    n_genes=20, n_perturbed_genes=4, n_cells_per_condition=20, n_control_cells=60, n_doubles=1, seed=3
)
model = sd.Doloris(training_subset(data), gene_graph=data.uns["synthetic"]["edges"], **SMALL)
model.train(max_steps=int(sys.argv[3]), seed=7, checkpoint_dir=sys.argv[1], checkpoint_every_n_steps=5,
            enable_progress_bar=False, callbacks=[Slow()])
"""


def test_training_killed_then_resumed_equals_uninterrupted(resume_data, uninterrupted, tmp_path):
    """SIGKILL a training process after its first checkpoint; resuming ends with the uninterrupted weights."""
    tests_dir = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", _KILLED_TRAINING, str(tmp_path), tests_dir, str(RESUME_STEPS)]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) as process:
        try:
            deadline = time.monotonic() + 300
            while not (tmp_path / "last.ckpt").exists():
                assert process.poll() is None, "training ended before writing a checkpoint"
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.05)
            time.sleep(0.5)  # a step or two past the checkpoint, before the next one
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            process.kill()
    assert process.returncode == -signal.SIGKILL, "the run finished before it was killed"
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert 0 < checkpoint["global_step"] < RESUME_STEPS
    resumed = _fresh_model(resume_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.train(
            max_steps=RESUME_STEPS, seed=7, checkpoint_dir=tmp_path, checkpoint_every_n_steps=5, **TRAIN_KWARGS
        )
    _assert_same_weights(_state(resumed), uninterrupted)


def test_truncated_checkpoint_is_reported(resume_data, tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    model = _fresh_model(resume_data)
    with pytest.raises(ValueError, match="last.ckpt is corrupted or truncated"):
        model.train(max_steps=2, checkpoint_dir=tmp_path, **TRAIN_KWARGS)


@pytest.mark.parametrize("every", [0, -5, 2.5])
def test_bad_checkpoint_interval(resume_data, tmp_path, every):
    model = _fresh_model(resume_data)
    with pytest.raises(ValueError, match="checkpoint_every_n_steps"):
        model.train(max_steps=2, checkpoint_dir=tmp_path, checkpoint_every_n_steps=every, **TRAIN_KWARGS)


# ------------------------------------------------------------------------------------------ reproducible
def test_training_does_not_depend_on_the_global_random_state(resume_data):
    """Batches and noise come from the seed and the step only: the caller's torch/numpy state is irrelevant."""
    states = []
    for global_seed, seed in [(1, 3), (2, 3), (1, 4)]:
        model = _fresh_model(resume_data)
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        model.train(max_steps=6, seed=seed, **TRAIN_KWARGS)
        states.append(_state(model))
    _assert_same_weights(states[0], states[1])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])  # another seed, other weights


# -------------------------------------------------------------------------------------- property-based
@st.composite
def valid_adatas(draw) -> AnnData:
    """Small log1p AnnData: 1-2 cell types, each with controls and 1-3 perturbations (genes, a drug, pairs)."""
    n_genes = draw(st.integers(4, 9))
    n_types = draw(st.integers(1, 2))
    perturbations = draw(
        st.lists(st.sampled_from(["G0", "G1", "G2", "drugA", "G0+G1", "G1+drugA"]), min_size=1, max_size=3, unique=True)
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    labels, types = [], []
    for cell_type in range(n_types):
        for label in ["control", *perturbations]:
            n = int(rng.integers(3, 7))
            labels += [label] * n
            types += [f"type{cell_type}"] * n
    X = np.log1p(rng.gamma(1.5, 2.0, size=(len(labels), n_genes)) * (rng.random((len(labels), n_genes)) < 0.7))
    if draw(st.booleans()):  # an integer-coded cell-type column, as some pipelines write it
        types = [int(t.removeprefix("type")) + 10 for t in types]
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels), "cell_type": pd.Categorical(types)})
    obs.index = [f"cell{i}" for i in range(len(labels))]
    var = pd.DataFrame(index=[f"G{i}" for i in range(n_genes)])
    return AnnData(X.astype(np.float32), obs=obs, var=var)


def _label_fault(label):
    def mutate(adata):
        labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
        labels[-1] = label
        adata.obs["perturbation"] = pd.Categorical(labels)

    return mutate


def _two_spellings(adata):
    labels = adata.obs["perturbation"].astype(str).to_numpy().copy()
    labels[-2:] = ["G0+G2", "G2+G0"]
    adata.obs["perturbation"] = pd.Categorical(labels)


# Faults the generator may plant, with the text the error must name.
FAULTS = {
    "nan": (_set_x(np.nan), "NaN"),
    "negative": (_set_x(-0.5), "negative"),
    "counts": (lambda a: setattr(a, "X", np.round(np.expm1(a.X) * 3 + 1)), "raw counts"),
    "empty component": (_label_fault("G0++G1"), "G0++G1"),
    "whitespace": (_label_fault("G1 "), "'G1 '"),
    "duplicated gene": (_duplicate_gene, "duplicated"),
    "no controls": (lambda a: _relabel(a, "G0", which="control"), "control_value 'control' does not occur"),
    "two spellings": (_two_spellings, "names one combination twice"),
    "repeated component": (_label_fault("G2+G2"), "repeats a component"),
}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(adata=valid_adatas())
def test_random_valid_setups_train(adata):
    _setup(adata)
    model = sd.Doloris(adata, gene_graph=None, n_timesteps=20, **TINY)
    model.train(max_steps=2, batch_size=16, seed=0, **TRAIN_KWARGS)
    assert model.is_trained_
    assert all(torch.isfinite(v).all() for v in model.module.state_dict().values() if v.is_floating_point())
    # Every cell type (also integer-coded ones, by their text) predicts.
    assert model.cell_types == sorted({str(t) for t in adata.obs["cell_type"]}, key=model.cell_types.index)
    perturbed = [label for label in model._summary.perturbation_labels if label != "control"]
    pred = model.predict_perturbation(perturbed[0], n_cells=2, n_steps=2, seed=0)
    assert pred.n_obs == 2 * len(model.cell_types) and np.isfinite(pred.X).all()


@settings(max_examples=12, deadline=None, derandomize=True)
@given(adata=valid_adatas(), fault=st.sampled_from(sorted(FAULTS)))
def test_random_invalid_setups_fail_clearly(adata, fault):
    mutate, text = FAULTS[fault]
    mutate(adata)
    with pytest.raises((ValueError, KeyError)) as info:
        _setup(adata)
        sd.Doloris(adata, gene_graph=None, n_timesteps=20, **TINY)  # reached only if setup missed the fault
    assert text in str(info.value), str(info.value)


def test_training_when_the_validation_share_rounds_to_no_cell():
    """train_size=0.9 of 9 cells keeps all 9 for training: no validation, no error (found by Hypothesis)."""
    rng = np.random.default_rng(0)
    labels = ["control"] * 5 + ["G0"] * 4
    adata = AnnData(
        np.log1p(rng.poisson(2.0, (9, 4))).astype(np.float32),
        obs=pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"c{i}" for i in range(9)]),
    )
    sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    model = sd.Doloris(adata, gene_graph=None, n_timesteps=20, **TINY)
    model.train(max_steps=2, train_size=0.9, seed=0, **TRAIN_KWARGS)
    assert model.is_trained_ and "validation_loss" not in model.history_


# --- first contact
# What a first user runs (the README's own calls) against what it promises: the source cells of
# include_sources=True carry every array of the predictions, a layer can be compared with real cells,
# asking for more cells than there are controls says so, and a notebook's thread choice holds.


def _first_contact_data() -> AnnData:
    """Tiny synthetic data: 2 cell types of 30 controls each, 4 singles and 1 double (20 cells each)."""
    return sd.datasets.synthetic_perturbations(
        n_genes=20, n_perturbed_genes=4, n_doubles=1, n_cells_per_condition=20, n_control_cells=30, n_cell_types=2
    )


@pytest.fixture(scope="module", params=["anchored", "paper"])
def first_contact_model(request):
    """A Doloris of each preset trained 2 steps on the controls and singles (the double held out)."""
    adata = _first_contact_data()
    train = training_subset(adata)
    model = sd.Doloris(train, gene_graph=None, preset=request.param, n_hidden=16, n_hidden_mask=16, n_perturbation=8)
    model.train(max_steps=2, seed=0, **TRAIN_KWARGS)
    double = next(p for p in adata.obs["perturbation"].astype(str).unique() if "+" in p)
    return model, adata, double


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def test_first_contact_sources_have_every_layer_and_obsm(first_contact_model, tmp_path):
    """include_sources=True: the sources have a row in every layer and obsm the predictions have."""
    model, _, double = first_contact_model
    kwargs = {"n_cells": 6, "n_steps": 2, "seed": 0}
    plain = model.predict_perturbation(["G001", double], **kwargs)
    pred = model.predict_perturbation(["G001", double], include_sources=True, **kwargs)
    n_sources = 6 * len(model.cell_types)
    is_source = ~pred.obs["is_predicted"].to_numpy()
    assert is_source[:n_sources].all() and not is_source[n_sources:].any()
    assert set(pred.layers) == set(plain.layers) and set(pred.obsm) == set(plain.obsm)
    generated = {"doloris_generated"} if model.preset == "anchored" else set()  # the paper's cells, anchored
    expected_layers = {"doloris_continuous", "doloris_mask"} | generated
    assert set(plain.layers) == expected_layers
    assert set(plain.obsm) == {"doloris_latent", "doloris_activation_prob"}

    # The predictions are those of include_sources=False.
    np.testing.assert_array_equal(pred.X[~is_source], plain.X)
    for slot in ("layers", "obsm"):
        for key, value in getattr(plain, slot).items():
            np.testing.assert_array_equal(getattr(pred, slot)[key][~is_source], value, err_msg=key)

    # A source cell is its own unperturbed outcome: its expression, its nonzero genes as mask, its latent.
    own = _dense(model.adata[pred.obs["control_cell"][is_source].to_numpy()].X)
    np.testing.assert_allclose(pred.X[is_source], own)
    for key in plain.layers:
        expected = (own != 0).astype(np.float32) if key == "doloris_mask" else own
        np.testing.assert_allclose(pred.layers[key][is_source], expected, err_msg=key)
    latent = pred.obsm["doloris_latent"]
    np.testing.assert_array_equal(latent[is_source], latent[n_sources : 2 * n_sources])  # what G001 started from
    # Activation probabilities belong to a perturbation: none for the sources.
    probabilities = pred.obsm["doloris_activation_prob"]
    assert np.isnan(probabilities[is_source]).all() and np.isfinite(probabilities[~is_source]).all()
    pred.write_h5ad(tmp_path / "pred.h5ad")  # NaN and all: it is written as it is
    assert set(ad.read_h5ad(tmp_path / "pred.h5ad").layers) == expected_layers


def test_first_contact_violins_of_a_layer_against_real_cells(first_contact_model):
    """The paper's cells (a layer of the prediction) are drawn against real cells, which have no such layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, adata, double = first_contact_model
    pred = model.predict_perturbation(double, n_cells=6, n_steps=2, seed=0, include_sources=True)
    layer = "doloris_generated" if model.preset == "anchored" else "doloris_continuous"
    real = adata[(adata.obs["perturbation"] == double).to_numpy()]
    control = model.adata[(model.adata.obs["perturbation"] == "control").to_numpy()]
    try:
        # One perturbation besides the sources' control label: no perturbation= needed.
        ax = sd.pl.de_gene_violins(pred, real, control=control, n_genes=4, layer=layer, show=False)
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == [
            f"control ({control.n_obs} cells, X)",
            f"real ({real.n_obs} cells, X)",
            f"predicted ({6 * len(model.cell_types)} cells)",  # the sources are not predictions
        ]
        assert ax.get_ylabel() == f"expression ({layer})"
    finally:
        plt.close("all")


def test_first_contact_more_cells_than_controls_warns(first_contact_model):
    """n_cells beyond a cell type's controls repeats cells: Doloris and the baselines say so, at the user's line."""
    model, _, _ = first_contact_model
    obs = model.adata.obs
    n = int(((obs["perturbation"] == "control") & (obs["cell_type"] == "ct1")).sum())
    message = rf"n_cells={n + 1} is more than the {n} control cells of cell type 'ct1'"
    with pytest.warns(UserWarning, match=message) as caught:
        pred = model.predict_perturbation("G001", cell_type="ct1", n_cells=n + 1, n_steps=2, seed=0)
    (warned,) = [w for w in caught if "n_cells=" in str(w.message)]
    distinct = pred.obs["control_cell"].nunique()
    assert distinct < n + 1 and f"({distinct} distinct of {n + 1})" in str(warned.message)
    assert warned.filename == __file__  # points at the call, not inside the package
    keys = {"perturbation_key": "perturbation", "control_value": "control", "cell_type_key": "cell_type"}
    for baseline in (sd.baselines.MeanShift(), sd.baselines.Anchor()):
        fitted = baseline.fit(model.adata, **keys)
        with pytest.warns(UserWarning, match=message) as caught:
            shifted = fitted.predict("G001", cell_type="ct1", n_cells=n + 1, seed=0)
        assert [w.filename for w in caught if "n_cells=" in str(w.message)] == [__file__]
        assert list(shifted.obs["control_cell"]) == list(pred.obs["control_cell"])  # the same draw
    # As many cells as controls: every control once, no warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="n_cells=")
        pred = model.predict_perturbation("G001", cell_type="ct1", n_cells=n, n_steps=2, seed=0)
        sd.baselines.MeanShift().fit(model.adata, **keys).predict("G001", cell_type="ct1", n_cells=n, seed=0)
    assert pred.obs["control_cell"].nunique() == n


def test_first_contact_a_notebooks_thread_choice_holds_through_training(monkeypatch):
    """The README's torch.set_num_threads(1) is not undone by training (Lightning resets threads only in
    multi-process launches, and only without OMP_NUM_THREADS)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    adata = training_subset(_first_contact_data())
    model = sd.Doloris(adata, gene_graph=None, n_hidden=16, n_hidden_mask=16, n_perturbation=8)
    try:
        torch.set_num_threads(1)
        model.train(max_steps=2, seed=0, **TRAIN_KWARGS)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
