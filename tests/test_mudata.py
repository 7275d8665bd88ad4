import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scdoloris as sd
from scdoloris.data._mudata import assign_guides


def test_assign_guides_rules():
    counts = np.array(
        [
            [0, 0, 0, 0],  # no guide -> control
            [3, 0, 0, 0],  # one guide
            [2, 0, 5, 0],  # two genes -> alphabetical combination
            [1, 1, 0, 0],  # two guides of one gene -> that gene
            [1, 0, 0, 0],  # below a threshold of 2 -> control
            [0, 0, 0, 4],  # non-targeting guide -> control
            [0, 0, 2, 9],  # CBL + non-targeting -> CBL
        ],
        dtype=np.float32,
    )
    var = pd.DataFrame(
        {"gene": ["KLF1", "KLF1", "CBL", "non-targeting"]}, index=["KLF1_g1", "KLF1_g2", "CBL_g1", "NT_g1"]
    )
    guides = ad.AnnData(counts, var=var, obs=pd.DataFrame(index=[f"c{i}" for i in range(7)]))
    labels = assign_guides(guides, threshold=1, gene_key="gene", control_genes=["non-targeting"])
    assert list(labels) == ["control", "KLF1", "CBL+KLF1", "KLF1", "KLF1", "control", "CBL"]
    assert list(labels.index) == list(guides.obs_names)
    strict = assign_guides(guides, threshold=2, gene_key="gene", control_genes=["non-targeting"])
    assert list(strict) == ["control", "KLF1", "CBL+KLF1", "control", "control", "control", "CBL"]
    # sparse counts and guide names as targets
    guides.X = sparse.csr_matrix(counts)
    names = assign_guides(guides, threshold=1, control_value="ctrl")
    assert list(names)[:3] == ["ctrl", "KLF1_g1", "CBL_g1+KLF1_g1"]
    with pytest.raises(KeyError, match="guide_gene_key"):
        assign_guides(guides, gene_key="target")
    with pytest.raises(ValueError, match="positive"):
        assign_guides(guides, threshold=0)


def _guide_modality(adata, rng):
    """Guide UMIs matching adata.obs["perturbation"]: 2 guides per gene, plus a non-targeting guide."""
    genes = sorted({g for p in adata.obs["perturbation"].astype(str) if p != "control" for g in p.split("+")})
    names = [f"{g}_sg{k}" for g in genes for k in (1, 2)] + ["NT_sg1"]
    targets = [g for g in genes for _ in (1, 2)] + ["non-targeting"]
    column = {name: j for j, name in enumerate(names)}
    counts = np.zeros((adata.n_obs, len(names)), dtype=np.float32)
    for i, label in enumerate(adata.obs["perturbation"].astype(str)):
        if label == "control":
            if rng.random() < 0.5:
                counts[i, column["NT_sg1"]] = rng.integers(1, 10)
            continue
        for gene in label.split("+"):
            counts[i, column[f"{gene}_sg{rng.integers(1, 3)}"]] = rng.integers(2, 20)
    # ambient background: single UMIs below the threshold of 2
    noise = rng.random(counts.shape) < 0.02
    counts[noise & (counts == 0)] = 1
    var = pd.DataFrame({"gene": targets}, index=names)
    return ad.AnnData(sparse.csr_matrix(counts), obs=pd.DataFrame(index=adata.obs_names.copy()), var=var)


@pytest.fixture(scope="module")
def screen():
    adata = sd.datasets.synthetic_perturbations(
        n_genes=30, n_perturbed_genes=5, n_cells_per_condition=25, n_control_cells=60, n_doubles=2, seed=3
    )
    rna = ad.AnnData(adata.X.copy(), obs=adata.obs[["cell_type"]].copy(), var=adata.var.copy())
    guides = _guide_modality(adata, np.random.default_rng(0))
    return adata, rna, guides


def test_setup_mudata_from_guides_train_predict_save_load(screen, tmp_path, capsys, small_model_kwargs, train_kwargs):
    adata, rna, guides = screen
    mdata = md.MuData({"rna": rna.copy(), "crispr": guides.copy()})
    expression_before = mdata.mod["rna"].X.copy()
    sd.Doloris.setup_mudata(
        mdata,
        modalities={"rna": "rna", "guides": "crispr"},
        guide_threshold=2,
        guide_gene_key="gene",
        control_guides=["non-targeting"],
        cell_type_key="cell_type",
    )
    derived = mdata.mod["rna"].obs["perturbation"].astype(str)
    pd.testing.assert_series_equal(derived, adata.obs["perturbation"].astype(str), check_names=False)
    assert list(mdata.obs["perturbation"].astype(str)) == list(derived)
    np.testing.assert_array_equal(mdata.mod["rna"].X, expression_before)

    model = sd.Doloris(mdata, gene_graph=adata.uns["synthetic"]["edges"], **small_model_kwargs)
    assert model.adata is mdata.mod["rna"]
    capsys.readouterr()
    print(model)  # scvi-tools' repr prints the summary with rich
    assert "Doloris model: 30 genes" in capsys.readouterr().out
    model.train(max_steps=5, seed=0, **train_kwargs)
    assert "train_loss" in model.history
    model.view_anndata_setup()  # needs rich.pretty, which scvi-tools does not import itself

    doubles = sorted(p for p in set(derived) if "+" in p)
    capsys.readouterr()
    pred = model.predict_perturbation(doubles, n_cells=10, n_steps=3, seed=0, progress_bar=True)
    assert pred.n_obs == 10 * len(doubles)
    shown = capsys.readouterr()
    assert "Generating" in shown.out + shown.err
    model.predict_perturbation(doubles[:1], n_cells=5, n_steps=3, seed=0, progress_bar=False)
    hidden = capsys.readouterr()
    assert "Generating" not in hidden.out + hidden.err
    np.testing.assert_array_equal(mdata.mod["rna"].X, expression_before)

    model.save(tmp_path / "model")
    loaded = sd.Doloris.load(str(tmp_path / "model"), mdata.mod["rna"])
    again = loaded.predict_perturbation(doubles, n_cells=10, n_steps=3, seed=0)
    np.testing.assert_allclose(again.X, pred.X, atol=1e-5)


def test_setup_mudata_labels_from_global_obs(screen, small_model_kwargs):
    adata, rna, guides = screen
    mdata = md.MuData({"rna": rna.copy(), "crispr": guides.copy()})
    mdata.obs["condition"] = adata.obs["perturbation"].astype(str).reindex(mdata.obs_names).to_numpy()
    sd.Doloris.setup_mudata(mdata, perturbation_key="condition", control_value="control")
    assert list(mdata.mod["rna"].obs["condition"]) == list(adata.obs["perturbation"].astype(str))
    model = sd.Doloris(mdata, gene_graph=None, **small_model_kwargs)
    assert model.adata is mdata.mod["rna"]


def test_setup_mudata_errors(screen):
    adata, rna, guides = screen
    mdata = md.MuData({"rna": rna.copy(), "crispr": guides[: guides.n_obs // 2].copy()})
    with pytest.raises(ValueError, match="intersect_obs"):
        sd.Doloris.setup_mudata(mdata, modalities={"guides": "crispr"}, guide_gene_key="gene")
    with pytest.raises(KeyError, match="not a modality"):
        sd.Doloris.setup_mudata(mdata, modalities={"rna": "gex"})
    with pytest.raises(KeyError, match="no guide modality"):
        sd.Doloris.setup_mudata(mdata, perturbation_key="perturbation")
    fresh = md.MuData({"rna": rna.copy()})
    with pytest.raises(ValueError, match="setup_mudata"):
        sd.Doloris(fresh)
