"""Tests of sd.baselines: NoChange, MeanShift, Additive and Linear on data with known effects."""

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import subset_cells as _subset
from scipy import sparse

import scdoloris as sd
from scdoloris.baselines import Additive, Linear, MeanShift, NoChange

ALL = [NoChange, MeanShift, Additive, Linear]


def _dense(X):
    return X.toarray() if sparse.issparse(X) else np.asarray(X)


def real_mean(adata, label, cell_type=None):
    """Mean expression of the cells labelled ``label`` (in ``cell_type``), in float64."""
    keep = adata.obs["perturbation"].astype(str).to_numpy() == label
    if cell_type is not None:
        keep &= adata.obs["cell_type"].astype(str).to_numpy() == cell_type
    return _dense(adata.X[keep]).astype(np.float64).mean(axis=0)


def real_shift(adata, label, cell_type=None):
    return real_mean(adata, label, cell_type) - real_mean(adata, "control", cell_type)


def r_squared(pred, obs):
    return 1.0 - ((obs - pred) ** 2).sum() / ((obs - obs.mean()) ** 2).sum()


@pytest.fixture(scope="module")
def data():
    return sd.datasets.synthetic_perturbations(seed=0)


@pytest.fixture(scope="module")
def train(data):
    """Controls and singles; the doubles are held out."""
    return _subset(data, data.obs["condition_type"] != "double")


@pytest.fixture(scope="module")
def doubles(data):
    return [p for p in data.obs["perturbation"].cat.categories if "+" in p]


@pytest.fixture(scope="module")
def singles(train):
    return [p for p in train.obs["perturbation"].cat.categories if p != "control"]


@pytest.fixture(scope="module")
def edges(data):
    return data.uns["synthetic"]["edges"]


@pytest.fixture(scope="module")
def linear(train, edges):
    return Linear(gene_graph=edges).fit(train)


# ---------------------------------------------------------------------- mean baselines
def test_additive_shift_is_sum_of_real_single_shifts(train, doubles, singles):
    additive = Additive().fit(train, perturbation_key="perturbation", control_value="control")
    predicted = additive.predict_shift(doubles + singles[:3])
    for label in doubles:
        a, b = label.split("+")
        expected = real_shift(train, a) + real_shift(train, b)
        np.testing.assert_allclose(predicted.loc[(label, "0")], expected, rtol=0, atol=1e-9)
    for label in singles[:3]:  # a seen single: its own shift
        np.testing.assert_allclose(predicted.loc[(label, "0")], real_shift(train, label), rtol=0, atol=1e-9)
    # Component order does not matter.
    a, b = doubles[0].split("+")
    swapped = additive.predict_shift(f"{b}+{a}").to_numpy()[0]
    np.testing.assert_allclose(swapped, predicted.loc[(doubles[0], "0")], rtol=0, atol=1e-12)


def test_additive_cells_are_clipped_shifted_controls(train, doubles):
    additive = Additive().fit(train)
    pred = additive.predict(doubles, n_cells=50, seed=3)
    shifts = additive.predict_shift(doubles)
    sources = _dense(train[pred.obs["control_cell"].to_numpy()].X).astype(np.float64)
    expected = np.clip(sources + shifts.loc[[(p, "0") for p in pred.obs["perturbation"]]].to_numpy(), 0, None)
    np.testing.assert_allclose(pred.X, expected.astype(np.float32), rtol=0, atol=1e-6)
    assert (pred.X >= 0).all()
    assert train.obs.loc[pred.obs["control_cell"], "perturbation"].eq("control").all()


def test_additive_gears_style_labels(train, doubles):
    """``"A+ctrl"`` labels and a ``"ctrl"`` control give the same shifts as plain labels."""
    gears = train.copy()
    labels = gears.obs["perturbation"].astype(str)
    gears.obs["condition"] = np.where(labels == "control", "ctrl", labels + "+ctrl")
    plain = Additive().fit(train).predict_shift(doubles)
    other = Additive().fit(gears, perturbation_key="condition", control_value="ctrl").predict_shift(doubles)
    np.testing.assert_allclose(other.to_numpy(), plain.to_numpy(), rtol=0, atol=1e-12)
    pred = Additive().fit(gears, perturbation_key="condition", control_value="ctrl").predict(doubles[:1], n_cells=3)
    assert (pred.obs["condition"] == doubles[0]).all()  # also under the user's column name


def test_mean_shift_is_average_of_training_shifts(train, singles, doubles):
    mean_shift = MeanShift().fit(train)
    expected = np.mean([real_shift(train, p) for p in singles], axis=0)
    predicted = mean_shift.predict_shift([doubles[0], "never-seen"])
    for row in predicted.to_numpy():
        np.testing.assert_allclose(row, expected, rtol=0, atol=1e-9)


def test_no_change_returns_control_cells_unchanged(train, doubles):
    pred = NoChange().fit(train).predict(doubles, n_cells=40, seed=1)
    sources = _dense(train[pred.obs["control_cell"].to_numpy()].X)
    np.testing.assert_array_equal(pred.X, sources.astype(np.float32))
    assert train.obs.loc[pred.obs["control_cell"], "perturbation"].eq("control").all()


@pytest.mark.parametrize("cls", ALL)
def test_output_schema(cls, train, doubles, edges):
    kwargs = {"gene_graph": edges} if cls is Linear else {}
    pred = cls(**kwargs).fit(train).predict(doubles[:2] + ["G001"], n_cells=30, seed=0)
    assert pred.shape == (90, train.n_vars)
    assert isinstance(pred.X, np.ndarray) and pred.X.dtype == np.float32
    assert np.isfinite(pred.X).all()
    assert pred.var_names.equals(train.var_names)
    assert list(pred.obs.columns) == ["perturbation", "cell_type", "dose", "control_cell", "is_predicted"]
    assert list(pred.obs["perturbation"].cat.categories) == doubles[:2] + ["G001"]
    assert (pred.obs["perturbation"].value_counts() == 30).all()
    assert (pred.obs["cell_type"] == "0").all()  # Doloris' name for "no cell-type column"
    assert pred.obs["dose"].isna().all()
    assert pred.obs["is_predicted"].all()
    assert pred.obs_names.is_unique and pred.obs_names[0] == f"{doubles[0]}_0_0"
    assert pred.uns["baseline"]["name"] == cls.name
    # Every perturbation starts from the same control cells.
    cells = pred.obs.groupby("perturbation", observed=True)["control_cell"].apply(list)
    assert all(c == cells.iloc[0] for c in cells)


@pytest.mark.parametrize("cls", [MeanShift, Additive])
def test_seed_determinism(cls, train, doubles):
    baseline = cls().fit(train)
    first = baseline.predict(doubles, n_cells=40, seed=7)
    again = baseline.predict(doubles, n_cells=40, seed=7)
    other = baseline.predict(doubles, n_cells=40, seed=8)
    np.testing.assert_array_equal(first.X, again.X)
    assert first.obs.equals(again.obs)
    assert not np.array_equal(first.obs["control_cell"], other.obs["control_cell"])
    # Without replacement while there are enough controls (300), with replacement beyond.
    few = baseline.predict(doubles[0], n_cells=300, seed=0).obs["control_cell"]
    many = baseline.predict(doubles[0], n_cells=400, seed=0).obs["control_cell"]
    assert few.is_unique and not many.is_unique


def test_same_control_draw_as_doloris():
    adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1, n_cell_types=2, seed=1)
    train = _subset(adata, adata.obs["condition_type"] != "double")
    sd.Doloris.setup_anndata(train, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
    model = sd.Doloris(train, n_hidden=16, n_hidden_mask=16, n_perturbation=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doloris = model.predict_perturbation(["G001"], n_cells=20, n_steps=2, seed=5)
    baseline = Additive().fit(train, cell_type_key="cell_type").predict(["G001"], n_cells=20, seed=5)
    np.testing.assert_array_equal(baseline.obs["control_cell"], doloris.obs["control_cell"])
    assert baseline.obs_names.equals(doloris.obs_names)


def test_per_cell_type_shifts():
    adata = sd.datasets.synthetic_perturbations(n_genes=30, n_perturbed_genes=4, n_doubles=2, n_cell_types=2, seed=1)
    train = _subset(adata, adata.obs["condition_type"] != "double")
    double = next(p for p in adata.obs["perturbation"].cat.categories if "+" in p)
    a, b = double.split("+")
    additive = Additive().fit(train, cell_type_key="cell_type")
    shifts = additive.predict_shift(double)
    for ct in ["ct0", "ct1"]:
        expected = real_shift(train, a, ct) + real_shift(train, b, ct)
        np.testing.assert_allclose(shifts.loc[(double, ct)], expected, rtol=0, atol=1e-9)
    # Pooling the cell types gives another answer: the shifts really are per cell type.
    pooled = Additive().fit(train).predict_shift(double).to_numpy()[0]
    assert np.abs(pooled - shifts.loc[(double, "ct1")]).max() > 1e-3

    pred = additive.predict([double], cell_type="ct1", n_cells=25, seed=0)
    assert (pred.obs["cell_type"] == "ct1").all() and pred.n_obs == 25
    assert train.obs.loc[pred.obs["control_cell"], "cell_type"].eq("ct1").all()
    both = additive.predict([double], n_cells=25, seed=0)
    assert both.obs["cell_type"].value_counts().to_dict() == {"ct0": 25, "ct1": 25}
    assert train.obs.loc[both.obs["control_cell"], "cell_type"].to_numpy().tolist() == both.obs["cell_type"].tolist()

    mean_shift = MeanShift().fit(train, cell_type_key="cell_type")
    singles = [p for p in train.obs["perturbation"].cat.categories if p != "control"]
    expected = np.mean([real_shift(train, p, "ct1") for p in singles], axis=0)
    np.testing.assert_allclose(mean_shift.predict_shift("X", cell_type="ct1").to_numpy()[0], expected, atol=1e-9)

    linear = Linear(gene_graph=adata.uns["synthetic"]["edges"]).fit(train, cell_type_key="cell_type")
    assert set(linear.models_) == {"ct0", "ct1"}
    assert np.isfinite(linear.predict_shift(double).to_numpy()).all()


def test_layer_and_sparse_input(train, doubles):
    reference = Additive().fit(train).predict(doubles, n_cells=20, seed=2)
    layered = train.copy()
    layered.layers["lognorm"] = layered.X.copy()
    layered.X = np.zeros_like(layered.X)
    from_layer = Additive().fit(layered, layer="lognorm").predict(doubles, n_cells=20, seed=2)
    np.testing.assert_allclose(from_layer.X, reference.X, atol=1e-6)
    sparse_train = train.copy()
    sparse_train.X = sparse.csr_matrix(sparse_train.X)
    from_sparse = Additive().fit(sparse_train).predict(doubles, n_cells=20, seed=2)
    np.testing.assert_allclose(from_sparse.X, reference.X, atol=1e-6)


def test_predict_given_control_cells(train, doubles):
    controls = train[train.obs["perturbation"] == "control"][:7].copy()
    additive = Additive().fit(train)
    pred = additive.predict(doubles[:2], adata=controls)
    assert pred.n_obs == 14
    assert list(pred.obs["control_cell"][:7]) == list(controls.obs_names)
    shift = additive.predict_shift(doubles[0]).to_numpy()[0]
    np.testing.assert_allclose(pred.X[:7], np.clip(_dense(controls.X) + shift, 0, None), atol=1e-6)
    with pytest.raises(ValueError, match="G000"):
        additive.predict(doubles[:1], adata=controls[:, 1:].copy())


def test_given_cells_follow_the_rules_of_doloris(train, doubles):
    """One set of rules for cells a user gives: the fitted genes in their order, log1p values, counts."""
    controls = train[train.obs["perturbation"] == "control"][:7].copy()
    additive = Additive().fit(train)
    reordered = controls[:, controls.var_names[::-1]].copy()
    with pytest.raises(ValueError, match="the same genes in another order"):
        additive.predict(doubles[:1], adata=reordered)
    counts = controls.copy()
    counts.X = np.round(np.expm1(_dense(counts.X)) * 50)
    with pytest.raises(ValueError, match="raw counts|log1p"):
        additive.predict(doubles[:1], adata=counts)
    for bad in [2.5, 0, -1]:
        with pytest.raises(ValueError, match="n_cells must be a positive integer"):
            additive.predict(doubles[:1], n_cells=bad)
    with pytest.raises(ValueError, match="seed"):
        additive.predict(doubles[:1], n_cells=3, seed=-1)


# ---------------------------------------------------------------------- linear
def test_linear_reproduces_training_pseudobulk(linear, train, singles):
    control = real_mean(train, "control")
    predicted = linear.predict_shift(singles).to_numpy()
    observed = np.stack([real_shift(train, p) for p in singles])
    # Measured (seed 0): R² 0.965 on the mean expression, 0.65 on the shift vs control (rank 10, 15 perturbations).
    assert r_squared(predicted + control, observed + control) > 0.93
    assert r_squared(predicted, observed) > 0.55
    assert linear.unembedded_ == {"0": []}  # the U genes are embedded through the graph


def test_linear_solves_the_paper_equations(train, edges, singles):
    """With λ = 0, K is the least-squares solution: the residual is orthogonal to G and P."""
    linear = Linear(gene_graph=edges, ridge=0.0).fit(train)
    model = linear.models_["0"]
    G, K, P, b = model["G"], model["K"], model["P"], model["b"]
    conditions = model["conditions"]
    assert conditions[0] == "" and sorted(conditions[1:]) == sorted(singles)
    Y = np.stack([np.zeros(train.n_vars)] + [real_shift(train, p) for p in conditions[1:]], axis=1)
    np.testing.assert_allclose(b, Y.mean(axis=1), atol=1e-9)
    residual = Y - b[:, None] - G @ K @ P.T
    assert np.abs(G.T @ residual @ P).max() < 1e-6 * np.abs(G.T @ Y @ P).max()
    # G: top-10 principal-component scores of the genes (conditions centred); P of a measured gene: its row of G.
    pseudobulk = np.stack([real_mean(train, "control")] + [real_mean(train, p) for p in conditions[1:]], axis=1)
    singular = np.linalg.svd(pseudobulk - pseudobulk.mean(axis=0), compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(G, axis=0), singular[:10], rtol=1e-6)
    row = conditions.index("G003")
    np.testing.assert_allclose(P[row], G[train.var_names.get_loc("G003")], atol=1e-12)
    assert np.abs(P[0]).max() == 0  # the control


def test_linear_combination_is_sum_of_embeddings(linear, doubles):
    a, b = doubles[0].split("+")
    shifts = linear.predict_shift([doubles[0], a, b]).to_numpy()
    offset = linear.models_["0"]["b"]
    np.testing.assert_allclose(shifts[0] - offset, (shifts[1] - offset) + (shifts[2] - offset), atol=1e-10)


def test_linear_held_out_doubles_follow_true_effects(linear, data, doubles):
    effects = data.uns["synthetic"]["effects"]
    predicted = linear.predict_shift(doubles)
    correlations = []
    for label in doubles:
        a, b = label.split("+")
        correlations.append(np.corrcoef(predicted.loc[(label, "0")], effects.loc[a] + effects.loc[b])[0, 1])
    # Measured (seed 0): 0.40, 0.51, 0.29, 0.53, 0.48, 0.60 (mean 0.47; Additive: 0.53-0.68).
    assert min(correlations) > 0.2 and np.mean(correlations) > 0.4


def test_linear_gene_unseen_in_training_comes_from_the_graph(data, edges):
    train = _subset(data, (data.obs["condition_type"] != "double") & (data.obs["perturbation"] != "U000"))
    linear = Linear(gene_graph=edges).fit(train)
    model = linear.models_["0"]
    shift = linear.predict_shift("U000").to_numpy()[0]
    assert np.isfinite(shift).all()
    # Non-trivial: it moves away from the offset b (measured: |Δ| 0.41 vs |b| 0.49) and differs from U001's.
    assert np.linalg.norm(shift - model["b"]) > 0.2 * np.linalg.norm(model["b"])
    assert np.abs(shift - linear.predict_shift("U001").to_numpy()[0]).max() > 0.05
    # Independently: the embedding is the |weight|-average of U000's measured neighbours' rows of G.
    links = edges[(edges["source"] == "U000") | (edges["target"] == "U000")]
    neighbours = pd.concat(
        [
            pd.DataFrame({"gene": links["target"], "weight": links["weight"].abs()}),
            pd.DataFrame({"gene": links["source"], "weight": links["weight"].abs()}),
        ]
    )
    neighbours = neighbours[neighbours["gene"] != "U000"].groupby("gene")["weight"].max()
    assert set(neighbours.index) <= set(train.var_names)
    rows = model["G"][[train.var_names.get_loc(g) for g in neighbours.index]]
    embedding = (neighbours.to_numpy()[:, None] * rows).sum(axis=0) / neighbours.sum()
    np.testing.assert_allclose(shift, model["G"] @ model["K"] @ embedding + model["b"], atol=1e-10)

    # Without a graph only measured genes are embedded; U genes in training are left out with a warning.
    with pytest.warns(UserWarning, match="U001"):
        plain = Linear(gene_graph=None).fit(train)
    with pytest.raises(ValueError, match="U000"):
        plain.predict_shift("G001+U000")


def test_linear_auto_graph_uses_coexpression(train):
    """Synthetic gene names are not in GO: "auto" picks co-expression, which cannot place the unmeasured U genes."""
    with pytest.warns(UserWarning, match="U000"):
        linear = Linear().fit(train)
    assert list(linear.gene_graph_.columns) == ["source", "target", "weight"]  # co-expression edges (none here)
    assert sorted(linear.unembedded_["0"]) == ["U000", "U001", "U002"]
    assert np.isfinite(linear.predict_shift("G001+G002").to_numpy()).all()


def test_linear_on_norman_with_go_graph():
    adata = sd.datasets.norman2019_subset(k562_only=True)
    train = _subset(adata, ~adata.obs["perturbation"].astype(str).str.contains("+", regex=False))
    assert "CBL" not in adata.var_names and "CBL" not in set(train.obs["perturbation"])
    with pytest.warns(UserWarning, match="IER5L"):  # no GO neighbour among the 500 measured genes
        linear = Linear(gene_graph="go").fit(train)
    pred = linear.predict(["KLF1+MAP2K6", "CBL+CNN1"], n_cells=50, seed=0)
    assert pred.shape == (100, 500) and np.isfinite(pred.X).all() and (pred.X >= 0).all()
    shifts = linear.predict_shift(["KLF1+MAP2K6", "CBL+CNN1"]).to_numpy()
    assert np.abs(shifts[0] - shifts[1]).max() > 1e-3
    real = real_shift(adata, "KLF1+MAP2K6")
    assert np.corrcoef(shifts[0], real)[0, 1] > 0.2  # measured: 0.42 (Additive: 0.98)
    with pytest.raises(ValueError, match="CBL"):
        Additive().fit(train).predict("CBL+CNN1")


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls", ALL)
def test_predict_before_fit(cls):
    with pytest.raises(ValueError, match="not fitted"):
        cls().predict(["A"])
    with pytest.raises(ValueError, match="not fitted"):
        cls().predict_shift(["A"])


def test_errors(train, doubles, linear):
    additive = Additive().fit(train)
    with pytest.raises(ValueError, match="NOPE"):
        additive.predict(["G001+NOPE"])
    with pytest.raises(ValueError, match="NOPE"):
        linear.predict(["NOPE"])
    with pytest.raises(ValueError, match="ct9"):
        additive.predict(doubles, cell_type="ct9")
    with pytest.raises(ValueError, match="control"):
        additive.predict(["control"])
    with pytest.raises(ValueError, match="No perturbation"):
        additive.predict([])
    with pytest.raises(ValueError, match="n_cells"):
        additive.predict(doubles, n_cells=0)
    with pytest.raises(ValueError, match="condition"):
        Additive().fit(train, perturbation_key="condition")
    with pytest.raises(ValueError, match="tissue"):
        Additive().fit(train, cell_type_key="tissue")
    with pytest.raises(ValueError, match="counts"):
        Additive().fit(train, layer="counts")
    with pytest.raises(ValueError, match="ctrl"):
        Additive().fit(train, control_value="ctrl")
    with pytest.raises(ValueError, match="only controls"):
        MeanShift().fit(_subset(train, train.obs["perturbation"] == "control"))
    with pytest.raises(ValueError, match="n_components"):
        Linear(n_components=0)


def test_no_change_function_still_works(train):
    pred = sd.baselines.no_change(train[train.obs["perturbation"] == "control"], ["G001"], n_cells=10)
    assert pred.n_obs == 10 and (pred.obs["perturbation"] == "G001").all()


def test_additive_names_a_cell_type_without_perturbed_cells():
    adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1, n_cell_types=2)
    only_controls_in_ct1 = ~((adata.obs["cell_type"] == "ct1") & (adata.obs["perturbation"] != "control")).to_numpy()
    additive = sd.baselines.Additive().fit(adata[only_controls_in_ct1].copy(), cell_type_key="cell_type")
    with pytest.raises(ValueError, match="'ct1' had only controls"):
        additive.predict_shift(["G001"], cell_type="ct1")


@pytest.mark.parametrize("cell_type_key", [None, "cell_type"])
def test_linear_names_a_cell_type_only_when_there_is_one(cell_type_key):
    """Without a cell-type column the one internal cell type "0" is not named in Linear's warning."""
    adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1, n_cell_types=1)
    labels = adata.obs["perturbation"].astype(str)
    labels[labels == "G000"] = "NOTAGENE"
    adata.obs["perturbation"] = pd.Categorical(labels)
    linear = sd.baselines.Linear(gene_graph=adata.uns["synthetic"]["edges"])
    with pytest.warns(UserWarning, match="out of the fit") as caught:
        linear.fit(adata, perturbation_key="perturbation", control_value="control", cell_type_key=cell_type_key)
    message = next(str(w.message) for w in caught if "out of the fit" in str(w.message))
    assert ("cell type" in message) == (cell_type_key is not None)
    assert "'0'" not in message
