"""Argument checks: the model's methods refuse bad arguments, edited data and overwrites, and say what to do.

The table of bad prediction arguments here (``PREDICT_CASES``) is the one documented in
``docs/reliability.md``; keep both in step.
"""

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import scdoloris as sd

N_STEPS = 5  # DDIM steps in predictions: enough to exercise the code, cheap


@pytest.mark.parametrize(
    ("argument", "value"),
    [("n_hidden", 0), ("n_blocks", -1), ("n_timesteps", 1), ("mask_reference_cells", 2.5), ("dropout", 1.0)],
)
def test_init_rejects_bad_arguments(argument, value, tiny_model_kwargs, make_small_adata, setup_adata):
    adata = make_small_adata()
    setup_adata(adata)
    with pytest.raises(ValueError, match=argument):
        sd.Doloris(adata, gene_graph=None, **{**tiny_model_kwargs, argument: value})


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
@pytest.mark.parametrize("value", [np.nan, -1.0, np.inf])
def test_training_rechecks_the_models_anndata(value, tiny_model_kwargs, train_kwargs, make_small_adata, setup_adata):
    """Data edited after the model was built: train() refuses before its first step; the model stays untrained."""
    adata = make_small_adata()
    setup_adata(adata)
    model = sd.Doloris(adata, gene_graph=None, **tiny_model_kwargs)
    model.adata.X = model.adata.X.copy()
    model.adata.X[0, 0] = value
    with pytest.raises(ValueError, match="adata.X"):
        model.train(max_steps=2, **train_kwargs)
    assert not model.is_trained


@pytest.mark.parametrize("indices", [[], np.array([], dtype=int), np.zeros(0, dtype=bool)])
def test_latent_of_no_cell_is_empty(trained_model, indices):
    latent = trained_model.get_latent_representation(indices=indices, n_steps=N_STEPS)
    assert latent.shape == (0, trained_model.adata.n_vars) and latent.dtype == np.float32


def test_prediction_rechecks_the_models_anndata(make_tiny_model):
    model = make_tiny_model()
    model.adata.X = model.adata.X.copy()
    model.adata.X[0, 0] = -1.0  # edited after set-up
    with pytest.raises(ValueError, match="negative"):
        model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS)


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
def test_training_on_nothing_is_refused_and_leaves_the_model_untrained(
    arguments, text, tiny_model_kwargs, train_kwargs, make_small_adata, setup_adata
):
    adata = make_small_adata()
    setup_adata(adata)
    model = sd.Doloris(adata, gene_graph=None, **tiny_model_kwargs)
    with pytest.raises(ValueError, match=text):
        model.train(**{"max_steps": 2, **arguments}, **train_kwargs)
    assert not model.is_trained_


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
