import anndata
import numpy as np
import pandas as pd
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator
from scipy.stats import spearmanr

from scdoloris.datasets._synthetic_drugs import (
    _hill,
    _parse_drug_table,
    _read_drug_table,
    drug_similarity,
    synthetic_drug_perturbations,
)

DOSES = (10.0, 100.0, 1000.0, 10000.0)


@pytest.fixture(scope="module")
def adata():
    return synthetic_drug_perturbations(seed=0)


@pytest.fixture(scope="module")
def clean():
    """No dropout and many cells per condition: empirical means are precise and comparable to the ground truth."""
    return synthetic_drug_perturbations(n_drugs=10, n_cells_per_condition=200, dropout=0.0, seed=3)


@pytest.fixture(scope="module")
def library_truth():
    """Ground truth for all bundled drugs (one cell per condition: only ``uns`` is used)."""
    names = list(_read_drug_table().index)
    data = synthetic_drug_perturbations(drugs=names, doses=(1000.0,), n_cells_per_condition=1, n_control_cells=1)
    return data.uns["synthetic_drugs"]


def _mask(data, cell_type, condition):
    return ((data.obs["cell_type"] == cell_type) & (data.obs["condition"] == condition)).to_numpy()


def _true_shift(truth, cell_type, drug, dose):
    """Mean shift recomputed from ``uns`` with the documented formula only."""
    ec50, h = truth["drugs"].loc[drug, ["ec50", "hill"]]
    return truth["effects"][cell_type].loc[drug].to_numpy() * dose**h / (ec50**h + dose**h)


def _empirical(data, cell_type, drug, dose):
    """Empirical shift, its standard error and the genes where clipping, bimodality and dropout changed nothing."""
    truth = data.uns["synthetic_drugs"]
    treated = data.X[_mask(data, cell_type, f"{drug}_{dose}")]
    control = data.X[_mask(data, cell_type, "control")]
    shift = treated.mean(axis=0) - control.mean(axis=0)
    se = np.sqrt(treated.var(axis=0, ddof=1) / len(treated) + control.var(axis=0, ddof=1) / len(control))
    # With dropout=0 a value is 0 only if clipped (or a bimodal gene switched off); where no value of either group
    # is 0, the empirical means are exactly those of the unclipped model.
    untouched = (treated > 0).all(axis=0) & (control > 0).all(axis=0) & ~data.var_names.isin(truth["bimodal_genes"])
    return shift, se, untouched


def test_deterministic_given_seed(adata):
    again = synthetic_drug_perturbations(seed=0)
    np.testing.assert_array_equal(adata.X, again.X)
    pd.testing.assert_frame_equal(adata.obs, again.obs)
    for key in ("drugs", "module_activations", "module_loadings", "sensitivity", "base"):
        pd.testing.assert_frame_equal(adata.uns["synthetic_drugs"][key], again.uns["synthetic_drugs"][key])
    for ct in ("A549", "K562", "MCF7"):
        pd.testing.assert_frame_equal(
            adata.uns["synthetic_drugs"]["effects"][ct], again.uns["synthetic_drugs"]["effects"][ct]
        )


def test_different_seed_differs(adata):
    other = synthetic_drug_perturbations(seed=1)
    assert other.shape == adata.shape
    assert not np.array_equal(adata.X[:200], other.X[:200])
    assert list(other.uns["synthetic_drugs"]["drugs"].index) != list(adata.uns["synthetic_drugs"]["drugs"].index)


def test_schema(adata):
    n_conditions = 40 * len(DOSES)
    assert adata.shape == (3 * (200 + n_conditions * 50), 100)
    assert adata.X.dtype == np.float32 and isinstance(adata.X, np.ndarray)
    assert (adata.X >= 0).all()
    assert 0.25 < (adata.X == 0).mean() < 0.5  # dropout 0.3 plus clipping and bimodal genes
    assert list(adata.var_names[:3]) == ["G000", "G001", "G002"]
    obs = adata.obs
    assert list(obs.columns) == ["perturbation", "smiles", "dose", "cell_type", "condition"]
    for key in ("perturbation", "smiles", "cell_type", "condition"):
        assert isinstance(obs[key].dtype, pd.CategoricalDtype)
    assert obs["dose"].dtype == np.float64
    assert list(obs["cell_type"].cat.categories) == ["A549", "K562", "MCF7"]
    assert obs["perturbation"].nunique() == 41
    assert obs["condition"].nunique() == 1 + n_conditions
    counts = obs.groupby(["cell_type", "condition"], observed=True).size()
    assert (counts.xs("control", level="condition") == 200).all()
    assert (counts.drop("control", level="condition") == 50).all()
    treated = obs[obs["perturbation"] != "control"]
    assert set(treated["dose"]) == set(DOSES)
    expected = treated["perturbation"].astype(str) + "_" + treated["dose"].astype(str)
    assert (treated["condition"].astype(str) == expected).all()
    first = str(obs["perturbation"].cat.categories[1])
    assert list(obs["condition"].cat.categories[:3]) == ["control", f"{first}_10.0", f"{first}_100.0"]

    truth = adata.uns["synthetic_drugs"]
    table = _read_drug_table()
    drugs = truth["drugs"]
    assert len(drugs) == 40 and drugs.index.is_unique and set(drugs.index) <= set(table.index)
    assert list(obs["perturbation"].cat.categories) == ["control", *drugs.index]
    assert list(drugs.columns) == ["smiles", "pathway", "logp", "ec50", "hill"]
    pd.testing.assert_series_equal(drugs["smiles"], table.loc[drugs.index, "smiles"])
    smiles = treated.drop_duplicates("perturbation").set_index("perturbation")["smiles"].astype(str)
    assert (smiles == drugs.loc[smiles.index, "smiles"]).all()
    assert all(Chem.MolFromSmiles(s) is not None for s in drugs["smiles"])
    assert ((drugs["ec50"] >= 10.0) & (drugs["ec50"] <= 10000.0)).all()
    assert ((drugs["hill"] > 1.0) & (drugs["hill"] < 2.0)).all()
    assert truth["module_activations"].shape == (40, 8)
    assert truth["module_loadings"].shape == (8, 100)
    assert truth["sensitivity"].shape == (3, 8)
    assert truth["base"].shape == (3, 100)
    for ct in ("A549", "K562", "MCF7"):
        effects = truth["effects"][ct]
        assert effects.shape == (40, 100) and list(effects.columns) == list(adata.var_names)
        # effects = (activations * sensitivity) @ loadings, as documented.
        recomputed = (truth["module_activations"] * truth["sensitivity"].loc[ct]) @ truth["module_loadings"]
        np.testing.assert_allclose(effects.to_numpy(), recomputed.to_numpy(), atol=1e-12)
    np.testing.assert_array_equal(truth["doses"], DOSES)
    assert truth["seed"] == 0


def test_bundled_table_and_robust_parsing():
    table = _read_drug_table()
    assert len(table) == 187  # 188 sci-Plex3 drugs minus the vehicle rows; every SMILES parses
    assert "control" not in table.index and table.index.is_unique
    assert table.loc["Dasatinib", "smiles"].startswith("Cc1nc(Nc2ncc(C(=O)Nc3c(C)cccc3Cl)s2)")
    text = "\ufeffname,SMILES,pathway\n\n A , CCO ,x\nB,C1CC\ncontrol,CS(C)=O,NA\nC,CCN\nA,CCC\n"
    parsed = _parse_drug_table(text)
    assert list(parsed.index) == ["A", "C"]  # header, blank line, unparseable SMILES, vehicle, repeat skipped
    assert list(parsed["smiles"]) == ["CCO", "CCN"]
    assert list(parsed["pathway"]) == ["x", ""]


def test_controls_have_dose_zero_and_no_effect(clean):
    obs = clean.obs
    control = obs["perturbation"] == "control"
    assert (obs.loc[control, "dose"] == 0.0).all()
    assert (obs.loc[~control, "dose"] > 0.0).all()
    assert (obs.loc[control, "smiles"] == "").all()
    assert (obs.loc[control, "condition"] == "control").all()
    truth = clean.uns["synthetic_drugs"]
    assert (_hill(0.0, truth["drugs"]["ec50"].to_numpy(), truth["drugs"]["hill"].to_numpy()) == 0.0).all()
    assert all((_true_shift(truth, "K562", drug, 0.0) == 0.0).all() for drug in truth["drugs"].index)
    for ct in ("A549", "K562", "MCF7"):
        x = clean.X[_mask(clean, ct, "control")]
        base = truth["base"].loc[ct].to_numpy()
        ok = (x > 0).all(axis=0) & ~clean.var_names.isin(truth["bimodal_genes"])
        z = (x.mean(axis=0) - base)[ok] / (x.std(axis=0, ddof=1)[ok] / np.sqrt(len(x)))
        assert ok.sum() > 50
        assert np.abs(z).max() < 5.0  # control mean is the base profile: no shift


def test_mean_shift_follows_stored_hill_curve(clean):
    truth = clean.uns["synthetic_drugs"]
    zs, checked = [], 0
    for ct in ("A549", "K562", "MCF7"):
        for drug in truth["drugs"].index:
            effect = truth["effects"][ct].loc[drug].to_numpy()
            for dose in DOSES:
                shift, se, ok = _empirical(clean, ct, drug, dose)
                expected = _true_shift(truth, ct, drug, dose)
                zs.append(((shift - expected) / se)[ok])
                strong = ok & (np.abs(effect) > 0.5)
                if strong.sum() >= 3:
                    # Fraction of the maximal effect reached at this dose, read off the data.
                    norm2 = effect[strong] @ effect[strong]
                    fraction = shift[strong] @ effect[strong] / norm2
                    fraction_se = np.sqrt((se[strong] ** 2) @ (effect[strong] ** 2)) / norm2
                    ec50, h = truth["drugs"].loc[drug, ["ec50", "hill"]]
                    assert fraction == pytest.approx(dose**h / (ec50**h + dose**h), abs=4.5 * fraction_se)
                    assert fraction_se < 0.1
                    checked += 1
    z = np.concatenate(zs)
    assert checked >= 40
    assert z.size > 5000
    assert np.mean(z**2) == pytest.approx(1.0, abs=0.25)  # deviations are pure sampling noise
    assert np.mean(np.abs(z) > 4) < 0.001


def test_effect_monotone_in_dose(clean):
    truth = clean.uns["synthetic_drugs"]
    drugs = truth["drugs"]
    grid = np.geomspace(1.0, 1e6, 200)
    fractions = _hill(grid[None, :], drugs["ec50"].to_numpy()[:, None], drugs["hill"].to_numpy()[:, None])
    assert (np.diff(fractions, axis=1) > 0).all()
    assert (fractions[:, 0] < 0.01).all() and (fractions[:, -1] > 0.99).all()
    # Empirically: the projection of the mean shift on the drug's effect grows with the dose.
    n_strong = 0
    for ct in ("A549", "K562", "MCF7"):
        for drug in drugs.index:
            effect = truth["effects"][ct].loc[drug].to_numpy()
            if np.abs(effect).max() < 1.0:
                continue
            n_strong += 1
            along = []
            for dose in DOSES:
                shift, _, ok = _empirical(clean, ct, drug, dose)
                along.append(shift[ok] @ effect[ok] / (effect[ok] @ effect[ok]))
            assert (np.diff(along) > -0.05).all()
            assert along[-1] - along[0] > 0.3
    assert n_strong >= 5


def test_similar_structures_respond_similarly(library_truth):
    sim = drug_similarity(None)
    effects = np.concatenate([library_truth["effects"][ct].to_numpy() for ct in ("A549", "K562", "MCF7")], axis=1)
    responding = np.linalg.norm(effects, axis=1) > 0
    corr = np.corrcoef(effects[responding])
    tanimoto = sim.loc[library_truth["drugs"].index, library_truth["drugs"].index].to_numpy()
    tanimoto = tanimoto[np.ix_(responding, responding)]
    upper = np.triu_indices(responding.sum(), k=1)
    t, c = tanimoto[upper], corr[upper]
    assert spearmanr(t, c).statistic > 0.05
    close, far = c[t >= 0.4], c[t < 0.2]
    assert close.size >= 20
    assert close.mean() > 0.4
    assert abs(far.mean()) < 0.1
    assert close.mean() - far.mean() > 0.3
    related = c[(t >= 0.25) & (t < 0.4)]
    assert far.mean() < related.mean() < close.mean()


def test_drug_response_depends_only_on_structure_and_seed():
    one = synthetic_drug_perturbations(n_genes=50, drugs=["Dasatinib", "Belinostat"], n_cells_per_condition=2)
    two = synthetic_drug_perturbations(n_genes=80, drugs=["Givinostat", "Dasatinib"], n_cells_per_condition=2)
    a, b = one.uns["synthetic_drugs"], two.uns["synthetic_drugs"]
    pd.testing.assert_series_equal(a["drugs"].loc["Dasatinib"], b["drugs"].loc["Dasatinib"])
    pd.testing.assert_series_equal(a["module_activations"].loc["Dasatinib"], b["module_activations"].loc["Dasatinib"])
    assert list(one.obs["perturbation"].cat.categories) == ["control", "Dasatinib", "Belinostat"]


def test_cell_types_differ_in_sensitivity(adata):
    truth = adata.uns["synthetic_drugs"]
    sens = truth["sensitivity"].to_numpy()
    assert ((sens >= 0.2) & (sens <= 1.6)).all()
    assert np.ptp(sens, axis=0).min() > 0.05  # every module has a different sensitivity in each cell type
    flat = {ct: truth["effects"][ct].to_numpy().ravel() for ct in ("A549", "K562", "MCF7")}
    sizes = [np.abs(v).mean() for v in flat.values()]
    assert len({round(s, 3) for s in sizes}) == 3
    corr = np.corrcoef(list(flat.values()))
    # Same drugs, same gene programs, different weights: related but not proportional responses.
    assert (corr[np.triu_indices(3, k=1)] > 0.5).all() and (corr[np.triu_indices(3, k=1)] < 0.97).all()
    # Visible in the data: the top-dose shift of the strongest drug differs between cell types.
    drug = np.abs(truth["effects"]["A549"]).mean(axis=1).idxmax()
    shifts = [
        adata.X[_mask(adata, ct, f"{drug}_10000.0")].mean(axis=0) - adata.X[_mask(adata, ct, "control")].mean(axis=0)
        for ct in ("A549", "K562", "MCF7")
    ]
    assert np.corrcoef(shifts)[np.triu_indices(3, k=1)].min() < 0.95


def test_strong_drugs_exceed_noise_and_strengths_spread(adata):
    truth = adata.uns["synthetic_drugs"]
    noiseless = synthetic_drug_perturbations(dropout=0.0, seed=0)
    for ct in ("A549", "K562", "MCF7"):
        effects = truth["effects"][ct]
        control = noiseless.X[_mask(noiseless, ct, "control")]
        noise_sd = np.median(control.std(axis=0, ddof=1))  # latent structure + noise, about 0.5
        assert 0.3 < noise_sd < 0.7
        drug = np.abs(effects).mean(axis=1).idxmax()
        treated = noiseless.X[_mask(noiseless, ct, f"{drug}_10000.0")]
        shift = treated.mean(axis=0) - control.mean(axis=0)
        affected = np.abs(_true_shift(truth, ct, drug, 10000.0)) > 0.5
        assert affected.sum() >= 10
        assert np.abs(shift[affected]).mean() > 2 * noise_sd
        # A spread of weak and strong drugs: max |effect| ranges from below the noise to several noise sds.
        largest = np.abs(effects).max(axis=1)
        assert (largest < noise_sd).mean() >= 0.1
        assert (largest > 3 * noise_sd).sum() >= 3


def test_drug_similarity():
    sim = drug_similarity(None)
    assert sim.shape == (187, 187)
    assert np.allclose(sim.to_numpy(), sim.to_numpy().T)
    assert (np.diag(sim) == 1.0).all() and sim.to_numpy().min() >= 0.0
    assert sim.loc["Ruxolitinib", "S-Ruxolitinib"] == 1.0  # stereoisomers: same Morgan fingerprint
    table = _read_drug_table()
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    fps = {d: generator.GetFingerprint(Chem.MolFromSmiles(table.loc[d, "smiles"])) for d in ("Sorafenib", "Dasatinib")}
    reference = DataStructs.TanimotoSimilarity(fps["Sorafenib"], fps["Dasatinib"])
    assert sim.loc["Sorafenib", "Dasatinib"] == pytest.approx(reference)
    assert sim.loc["Sorafenib", "Regorafenib"] > 0.6

    data = synthetic_drug_perturbations(n_genes=20, n_drugs=6, n_cells_per_condition=2, seed=2)
    sub = drug_similarity(data)
    names = list(data.uns["synthetic_drugs"]["drugs"].index)
    assert list(sub.index) == names and list(sub.columns) == names
    pd.testing.assert_frame_equal(sub, sim.loc[names, names], check_names=False)
    with pytest.raises(KeyError):
        drug_similarity(anndata.AnnData(np.zeros((2, 2), dtype=np.float32)))


def test_write_h5ad_roundtrip(tmp_path):
    data = synthetic_drug_perturbations(n_genes=20, n_drugs=3, n_cells_per_condition=2, seed=4)
    data.write_h5ad(tmp_path / "drugs.h5ad")
    back = anndata.read_h5ad(tmp_path / "drugs.h5ad")
    np.testing.assert_array_equal(back.X, data.X)
    pd.testing.assert_frame_equal(back.obs, data.obs)
    truth, back_truth = data.uns["synthetic_drugs"], back.uns["synthetic_drugs"]
    pd.testing.assert_frame_equal(back_truth["drugs"], truth["drugs"])
    pd.testing.assert_frame_equal(back_truth["effects"]["MCF7"], truth["effects"]["MCF7"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_genes": 1},
        {"n_drugs": 0},
        {"n_drugs": 188},
        {"doses": ()},
        {"doses": (0.0, 10.0)},
        {"doses": (10.0, 10.0)},
        {"n_cells_per_condition": 0},
        {"cell_types": ("A549", "A549")},
        {"dropout": 1.0},
        {"effect_size": -1.0},
        {"drugs": ["Dasatinib", "NotADrug"]},
        {"drugs": ["Dasatinib", "Dasatinib"]},
        {"drugs": []},
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        synthetic_drug_perturbations(**kwargs)


def test_effect_size_scales_effects():
    half = synthetic_drug_perturbations(n_genes=20, n_drugs=3, n_cells_per_condition=2, effect_size=0.5)
    full = synthetic_drug_perturbations(n_genes=20, n_drugs=3, n_cells_per_condition=2)
    for ct in ("A549", "K562", "MCF7"):
        np.testing.assert_allclose(
            half.uns["synthetic_drugs"]["effects"][ct].to_numpy(),
            0.5 * full.uns["synthetic_drugs"]["effects"][ct].to_numpy(),
        )
