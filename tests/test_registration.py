"""setup_anndata: the data it registers, the bad input it refuses, and setting up again.

The table of bad inputs here (``SETUP_CASES``) is the one documented in ``docs/reliability.md``; keep both
in step.
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scdoloris as sd

N_STEPS = 5  # DDIM steps in predictions: enough to exercise the code, cheap


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
def test_setup_rejects_bad_input(mutate, overrides, error, text, make_small_adata, setup_adata):
    adata = make_small_adata()
    mutate(adata)
    X = adata.X.copy()
    with pytest.raises(error) as info:
        setup_adata(adata, **overrides)
    message = str(info.value)
    assert text in message, message
    assert len(message) > len(text) + 20, "the message should also say what to do"
    np.testing.assert_array_equal(adata.X, X)  # nothing changed on the way to the error


def test_setup_rejects_a_view(make_small_adata, setup_adata):
    adata = make_small_adata()
    with pytest.raises(ValueError, match=r"adata\.copy\(\)"):
        setup_adata(adata[:20])


def test_setup_rejects_an_empty_anndata(make_small_adata, setup_adata):
    adata = make_small_adata()[:0].copy()
    with pytest.raises(ValueError, match="empty"):
        setup_adata(adata)


# ------------------------------------------------------------------------------------ one key at a time
@pytest.fixture
def small_adata():
    return sd.datasets.synthetic_perturbations(
        n_genes=10, n_perturbed_genes=2, n_cells_per_condition=5, n_control_cells=10, n_doubles=0, seed=0
    )


def test_setup_missing_obs_key(small_adata, setup_adata):
    with pytest.raises(KeyError, match="pert_col"):
        setup_adata(small_adata, perturbation_key="pert_col")
    with pytest.raises(KeyError, match="celltype_col"):
        setup_adata(small_adata, cell_type_key="celltype_col")


def test_setup_absent_control(small_adata, setup_adata):
    with pytest.raises(ValueError, match="ctrl"):
        setup_adata(small_adata, control_value="ctrl")


def test_setup_rejects_counts(small_adata, setup_adata):
    rng = np.random.default_rng(0)
    small_adata.X = rng.poisson(3.0, small_adata.shape).astype(np.float32)
    with pytest.raises(ValueError, match="counts"):
        setup_adata(small_adata)


def test_setup_rejects_negative_values(small_adata, setup_adata):
    small_adata.X[3, 4] = -0.5
    with pytest.raises(ValueError, match="negative"):
        setup_adata(small_adata)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_setup_rejects_non_finite(small_adata, bad, setup_adata):
    small_adata.X[2, 1] = bad
    with pytest.raises(ValueError):
        setup_adata(small_adata)


def test_setup_checks_the_layer(small_adata, setup_adata):
    small_adata.layers["log"] = small_adata.X.copy()
    small_adata.X = np.round(small_adata.X * 10)  # counts-like X is fine when a layer is used
    setup_adata(small_adata, layer="log")
    small_adata.layers["bad"] = -small_adata.layers["log"] - 1
    with pytest.raises(ValueError, match="bad"):
        setup_adata(small_adata, layer="bad")


def test_setup_does_not_modify_data(small_adata, small_model_kwargs, setup_adata):
    X = small_adata.X.copy()
    columns = {c: small_adata.obs[c].copy() for c in small_adata.obs}
    setup_adata(small_adata)
    np.testing.assert_array_equal(small_adata.X, X)
    for c, values in columns.items():
        pd.testing.assert_series_equal(small_adata.obs[c], values)
    model = sd.Doloris(small_adata, **small_model_kwargs)
    assert model.summary_["x_max"] == pytest.approx(float(X.max()))
    np.testing.assert_array_equal(small_adata.X, X)


# ------------------------------------------------------------------------------------------------ labels
def test_unused_categories_are_dropped_with_a_warning(tiny_model_kwargs, make_small_adata, setup_adata):
    """Levels declared without cells (e.g. categories fixed from a larger design): dropped, with a warning."""
    adata = make_small_adata()
    adata.obs["perturbation"] = adata.obs["perturbation"].cat.add_categories(["G_gone"])
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["ct_gone"])
    values = {key: adata.obs[key].astype(str).copy() for key in ("perturbation", "cell_type")}
    with pytest.warns(UserWarning, match="G_gone") as record:
        setup_adata(adata)
    messages = " ".join(str(w.message) for w in record)
    assert "ct_gone" in messages and "remove_unused_categories" in messages
    assert "G_gone" not in adata.obs["perturbation"].cat.categories
    assert "ct_gone" not in adata.obs["cell_type"].cat.categories
    for key, before in values.items():
        pd.testing.assert_series_equal(adata.obs[key].astype(str), before)  # every cell keeps its value
    model = sd.Doloris(adata, gene_graph=None, **tiny_model_kwargs)
    assert "G_gone" not in model._summary.perturbation_labels


def test_integer_coded_labels(make_small_adata, make_tiny_model):
    """Perturbations and cell types stored as integers, control_value=0: labels are their text."""
    adata = make_small_adata(n_cell_types=2)
    codes = {"control": 0, "G000": 1, "G001": 2}
    adata = adata[adata.obs["perturbation"].isin(list(codes)).to_numpy()].copy()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).map(codes).astype(int)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).map({"ct0": 7, "ct1": 8}).astype(int)
    model = make_tiny_model(adata, control_value=0)
    assert model.control_values == ["0"] and model.cell_types == ["7", "8"]
    pred = model.predict_perturbation(["1", "1+2"], cell_type=7, n_cells=3, n_steps=N_STEPS)
    assert list(pred.obs["perturbation"].cat.categories) == ["1", "1+2"] and set(pred.obs["cell_type"]) == {"7"}


def test_inplace_keys_are_h5ad_safe(tmp_path, make_small_adata, make_tiny_model):
    """A label with '/' is written '_' in in-place keys; the file reads back; uns maps entries to layers."""
    adata = make_small_adata()
    _relabel(adata, "IFN/stim")
    model = make_tiny_model(adata)
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
        make_tiny_model(adata).predict_perturbation(
            ["IFN/stim", "IFN_stim"], adata=controls, inplace=True, overwrite=True
        )


# ---------------------------------------------------------------------------------------- set up again
def test_a_second_setup_of_the_same_anndata_is_detected(train_kwargs, setup_adata, make_tiny_model):
    """A second setup_anndata rewrites the codes the model reads: refused until set up as before."""
    model = make_tiny_model()
    adata = model.adata
    sd.Doloris.setup_anndata(adata, perturbation_key="cell_type", control_value="ct0")
    with pytest.raises(ValueError, match="set up again") as info:
        model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS)
    assert "perturbation_key" in str(info.value)  # says which arguments to set it up with
    with pytest.raises(ValueError, match="set up again"):
        model.train(max_steps=1, **train_kwargs)
    setup_adata(adata)  # the model's own arguments again: the same codes, usable again
    assert model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS).n_obs == 3


def test_a_copy_set_up_or_loaded_leaves_the_original_model_working(
    tmp_path, tiny_model_kwargs, train_kwargs, setup_adata, make_tiny_model
):
    """A copy shares the registration's uuid: setting it up (or loading onto it) must not break the original."""
    model = make_tiny_model()
    before = model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS, seed=1).X
    other = model.adata.copy()
    setup_adata(other)
    copy_model = sd.Doloris(other, gene_graph=None, **tiny_model_kwargs)
    model.save(tmp_path / "model")
    loaded = sd.Doloris.load(tmp_path / "model", model.adata.copy())
    for user in (model, copy_model, loaded):
        assert user.get_latent_representation().shape[0] == user.adata.n_obs
    np.testing.assert_array_equal(model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS, seed=1).X, before)
    np.testing.assert_array_equal(loaded.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS, seed=1).X, before)
    model.train(max_steps=1, **train_kwargs)
    copy_model.train(max_steps=1, **train_kwargs)
    # Setting the original itself up again differently is still refused.
    sd.Doloris.setup_anndata(model.adata, perturbation_key="cell_type", control_value="ct0")
    with pytest.raises(ValueError, match="set up again"):
        model.predict_perturbation(["G000"], n_cells=3, n_steps=N_STEPS)


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
def test_random_valid_setups_train(adata, tiny_model_kwargs, train_kwargs, setup_adata):
    setup_adata(adata)
    model = sd.Doloris(adata, gene_graph=None, n_timesteps=20, **tiny_model_kwargs)
    model.train(max_steps=2, batch_size=16, seed=0, **train_kwargs)
    assert model.is_trained_
    assert all(torch.isfinite(v).all() for v in model.module.state_dict().values() if v.is_floating_point())
    # Every cell type (also integer-coded ones, by their text) predicts.
    assert model.cell_types == sorted({str(t) for t in adata.obs["cell_type"]}, key=model.cell_types.index)
    perturbed = [label for label in model._summary.perturbation_labels if label != "control"]
    pred = model.predict_perturbation(perturbed[0], n_cells=2, n_steps=2, seed=0)
    assert pred.n_obs == 2 * len(model.cell_types) and np.isfinite(pred.X).all()


@settings(max_examples=12, deadline=None, derandomize=True)
@given(adata=valid_adatas(), fault=st.sampled_from(sorted(FAULTS)))
def test_random_invalid_setups_fail_clearly(adata, fault, tiny_model_kwargs, setup_adata):
    mutate, text = FAULTS[fault]
    mutate(adata)
    with pytest.raises((ValueError, KeyError)) as info:
        setup_adata(adata)
        sd.Doloris(
            adata, gene_graph=None, n_timesteps=20, **tiny_model_kwargs
        )  # reached only if setup missed the fault
    assert text in str(info.value), str(info.value)
