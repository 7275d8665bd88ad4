"""End to end on real data: the bundled Norman 2019 subset, the shared data folder, and a Kang-like case."""

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scdoloris as sd

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"
NORMAN_FILE = "perturbench_devel_norman19_mcfaline23_500hvg_lognorm.h5ad"
# Both genes trained as singles; CNN1 neither measured nor trained (GO links it to 2 measured genes).
DOUBLES = ["KLF1+MAP2K6", "CNN1+MAPK1"]


@pytest.fixture(scope="module")
def norman():
    return sd.datasets.norman2019_subset(k562_only=True)


@pytest.fixture(scope="module")
def norman_model(norman, small_model_kwargs, train_kwargs):
    singles = ~norman.obs["perturbation"].astype(str).str.contains("+", regex=False)
    train = norman[singles.to_numpy()].copy()
    train.obs["perturbation"] = train.obs["perturbation"].cat.remove_unused_categories()
    sd.Doloris.setup_anndata(train, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
    model = sd.Doloris(train, **small_model_kwargs)  # gene_graph="auto"
    model.train(max_steps=100, seed=0, **train_kwargs)
    return model


def test_norman_subset_shape(norman):
    assert norman.shape == (3375, 500)
    labels = set(norman.obs["perturbation"].astype(str))
    assert "control" in labels and set(DOUBLES) <= labels and "CBL+CNN1" in labels
    assert set(norman.obs["cell_type"].astype(str)) == {"k562"}
    sd.pp.check_expression(norman)


def test_auto_graph_is_go(norman_model, small_model_kwargs):
    summary = norman_model.summary_
    graph = summary["graph"]
    trained_genes = {p for p in summary["perturbation_labels"] if p != "control"}
    # GO knows every trained gene but IER5L, which becomes a learned category.
    assert summary["categories"] == ["IER5L"]
    nodes = graph["nodes"]
    assert nodes[:500] == list(norman_model.adata.var_names) and graph["n_measured"] == 500
    # Trained unmeasured genes follow the measured ones, then their bridges (GO neighbours that touch a
    # measured gene); TMSB4X is a measured gene.
    perturbed_nodes = trained_genes - {"IER5L", "TMSB4X"}
    assert set(nodes[500 : 500 + len(perturbed_nodes)]) == perturbed_nodes
    assert "TMSB4X" in nodes[:500] and len(nodes) > 500 + len(perturbed_nodes)
    # CBL and CNN1 are neither measured nor trained: they join the graph at prediction.
    assert "CBL" not in nodes and "CNN1" not in nodes and "CNN1" not in summary["categories"]
    # Same graph as asking for GO explicitly.
    explicit = sd.Doloris(norman_model.adata, gene_graph="go", **small_model_kwargs).summary_["graph"]
    assert explicit["nodes"] == nodes
    np.testing.assert_array_equal(explicit["edges"], graph["edges"])
    assert graph["edges"].shape[1] > 500


def test_norman_predicts_held_out_doubles(norman_model, norman):
    pred = norman_model.predict_perturbation(DOUBLES, n_cells=30, n_steps=10, seed=0)
    assert pred.shape == (60, 500)
    assert list(pred.var_names) == list(norman.var_names)
    assert list(pred.obs["perturbation"].cat.categories) == DOUBLES
    assert (pred.obs["cell_type"] == "k562").all() and pred.obs["is_predicted"].all()
    for values in (pred.X, pred.layers["doloris_continuous"], pred.obsm["doloris_latent"]):
        assert np.isfinite(values).all()
    assert (pred.X >= 0).all() and (pred.layers["doloris_continuous"] >= 0).all()
    probs = pred.obsm["doloris_activation_prob"]
    assert ((probs >= 0) & (probs <= 1)).all()
    generated = pred.layers["doloris_generated"]  # the paper's cells; X anchors them (preset="anchored")
    np.testing.assert_array_equal(generated, pred.layers["doloris_mask"] * pred.layers["doloris_continuous"])
    # Sparse like the data (93% zeros), not dense noise.
    assert 0.5 < (generated == 0).mean() < 0.99
    # Same control cells for both; the new genes' graph embedding makes a difference.
    first, second = (pred.obs["perturbation"] == p for p in DOUBLES)
    np.testing.assert_array_equal(pred.obs["control_cell"][first], pred.obs["control_cell"][second])
    a, b = pred.layers["doloris_continuous"][first.to_numpy()], pred.layers["doloris_continuous"][second.to_numpy()]
    assert np.abs(a - b).mean() > 1e-5


def _zero_fractions(norman_model, norman):
    """Per double: zero fraction of the default's X, of the generated cells and of the real cells."""
    pred = norman_model.predict_perturbation(DOUBLES, n_cells=100, n_steps=10, seed=0)
    rows = {}
    for p in DOUBLES:
        mine = (pred.obs["perturbation"] == p).to_numpy()
        real = norman[(norman.obs["perturbation"] == p).to_numpy()].X
        real = real.toarray() if sparse.issparse(real) else real
        rows[p] = {
            "X": float((pred.X[mine] == 0).mean()),
            "generated": float((pred.layers["doloris_generated"][mine] == 0).mean()),
            "real": float((real == 0).mean()),
        }
    return pd.DataFrame(rows).T


def test_norman_generated_cells_are_as_sparse_as_real_ones(norman_model, norman):
    """The mask model's zeros: measured 93.5% / 93.7% zeros in the generated cells against 96.8% / 96.9% real."""
    table = _zero_fractions(norman_model, norman)
    assert ((table["generated"] - table["real"]).abs() < 0.06).all(), table


def test_norman_default_cells_are_as_sparse_as_real_ones(norman_model, norman):
    """What users get in X is as sparse as the real cells (issue 23; the shifted cells had 81.7% / 65.7% zeros)."""
    table = _zero_fractions(norman_model, norman)
    assert ((table["X"] - table["real"]).abs() < 0.03).all(), table


def test_norman_predicts_every_double(norman_model, norman):
    labels = norman.obs["perturbation"].astype(str)
    doubles = sorted(set(labels[labels.str.contains("+", regex=False)]))
    assert "CBL+CNN1" in doubles and len(doubles) == 15
    pred = norman_model.predict_perturbation(doubles, n_cells=3, n_steps=5, seed=0)
    assert pred.n_obs == 45 and np.isfinite(pred.X).all()


def test_norman_trained_genes_have_distinct_embeddings(norman_model):
    """FOXO4, KMT2A, NIT1, PLK4 and SLC38A2 have no measured GO neighbour; bridges set them apart."""
    import torch

    summary = norman_model.summary_
    labels = [p for p in summary["perturbation_labels"] if p != "control"]
    recipes = torch.as_tensor(summary["train_recipes"])[[summary["perturbation_labels"].index(p) for p in labels]]
    embedding, _ = norman_model.module.embed(recipes)
    distances = torch.cdist(embedding, embedding)[~torch.eye(len(labels), dtype=torch.bool)]
    # Untrained weights: embeddings are small, so compare with the typical distance between them.
    assert float(distances.min()) > 1e-3 * float(distances.median())


@pytest.mark.skipif(not (SHARED_DATA / "norman2019" / NORMAN_FILE).exists(), reason="../shared/data is absent")
def test_shared_norman_file_matches_bundled(norman):
    full = ad.read_h5ad(SHARED_DATA / "norman2019" / NORMAN_FILE)
    assert full.shape == (5961, 500)
    assert set(full.obs["cell_type"].astype(str)) == {"k562", "A172", "T98G", "U87MG"}
    k562 = full[(full.obs["cell_type"] == "k562").to_numpy()]
    assert list(k562.obs_names) == list(norman.obs_names)
    assert list(k562.var_names) == list(norman.var_names)
    x_shared = k562.X.toarray() if sparse.issparse(k562.X) else np.asarray(k562.X)
    x_bundled = norman.X.toarray() if sparse.issparse(norman.X) else np.asarray(norman.X)
    np.testing.assert_array_equal(x_shared, x_bundled)
    sd.pp.check_expression(full)


# ---------------------------------------------------------------------------------------- Kang-like
@pytest.fixture(scope="module")
def kang_like():
    """Stimulated vs control cells of 2 cell types; 'stimulated' is no gene (like Kang 2018 IFN-beta)."""
    rng = np.random.default_rng(0)
    n_genes, n_cells = 30, 40
    blocks, conditions, cell_types = [], [], []
    for ct, base in (("B", rng.uniform(0.5, 2.5, n_genes)), ("CD14 Mono", rng.uniform(0.5, 2.5, n_genes))):
        for condition, shift in (("control", 0.0), ("stimulated", rng.normal(0, 0.8, n_genes))):
            block = np.clip(base + shift + rng.normal(0, 0.3, (n_cells, n_genes)), 0, None)
            block[rng.random(block.shape) < 0.3] = 0.0
            blocks.append(block)
            conditions += [condition] * n_cells
            cell_types += [ct] * n_cells
    obs = pd.DataFrame(
        {"condition": pd.Categorical(conditions), "cell_type": pd.Categorical(cell_types)},
        index=[f"cell{i}" for i in range(len(conditions))],
    )
    adata = ad.AnnData(np.concatenate(blocks).astype(np.float32), obs=obs)
    adata.var_names = [f"ISG{i}" for i in range(n_genes)]
    return adata


def test_kang_like_learned_category(kang_like, train_kwargs):
    adata = kang_like.copy()
    sd.Doloris.setup_anndata(adata, perturbation_key="condition", control_value="control", cell_type_key="cell_type")
    model = sd.Doloris(adata)
    assert model.summary_["categories"] == ["stimulated"]
    graph = model.summary_["graph"]
    assert graph["nodes"] == list(adata.var_names)  # no perturbed-gene nodes
    assert np.asarray(graph["edges"]).shape[1] == 0
    model.train(max_steps=15, seed=0, **train_kwargs)
    pred = model.predict_perturbation("stimulated", n_cells=10, n_steps=10, seed=0)
    assert pred.shape == (20, 30)
    assert sorted(pred.obs["cell_type"].astype(str).unique()) == ["B", "CD14 Mono"]
    # Predictions carry the user's column name too, so they concatenate with the data.
    assert (pred.obs["condition"].astype(str) == "stimulated").all()
    assert np.isfinite(pred.X).all() and (pred.X >= 0).all()
    only_b = model.predict_perturbation("stimulated", cell_type="B", n_cells=5, n_steps=10, seed=0)
    assert only_b.n_obs == 5 and (only_b.obs["cell_type"] == "B").all()
    with pytest.raises(ValueError, match="interferon"):
        model.predict_perturbation("interferon", n_steps=10)


def test_design_section_1_user_code(tmp_path, small_model_kwargs, train_kwargs):
    """The user's code of DESIGN section 1, as written, on the full bundled subset (4 cell types), few steps."""
    import scanpy as sc

    adata = sd.datasets.norman2019_subset()
    sd.Doloris.setup_anndata(
        adata,
        perturbation_key="perturbation",
        control_value="control",
        cell_type_key="cell_type",
        dose_key=None,
        smiles_key=None,
        layer=None,
    )
    model = sd.Doloris(adata, gene_graph="go", **small_model_kwargs)
    model.train(max_steps=20, **train_kwargs)
    pred = model.predict_perturbation(["KLF1+MAP2K6", "CBL+CNN1"], cell_type="k562", n_cells=200, n_steps=5)
    assert pred.shape == (400, 500) and set(pred.obs["cell_type"]) == {"k562"}
    sc.pp.pca(pred)
    assert pred.obsm["X_pca"].shape[0] == 400
    model.save(str(tmp_path / "norman_model/"))
    model = sd.Doloris.load(str(tmp_path / "norman_model/"), adata)
    again = model.predict_perturbation(["KLF1+MAP2K6", "CBL+CNN1"], cell_type="k562", n_cells=200, n_steps=5)
    assert again.shape == (400, 500)
