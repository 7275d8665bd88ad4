"""Molecule features (Morgan fingerprints, embedding tables), dose scaling and the molecule encoder."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from scdoloris.module import MoleculeEncoder, dose_scale
from scdoloris.perturbation._molecules import (
    MoleculeFeatures,
    canonical_smiles,
    morgan_fingerprints,
    tanimoto,
)

torch.set_num_threads(1)

# ../shared beside the repository root, found from this file.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCIPLEX3_DRUGS = SHARED_DATA / "sciplex3" / "sciplex3_drugs_smiles_chemCPA.csv"

SMALL = {
    "ethanol": "OCC",
    "benzene": "c1ccccc1",
    "phenol": "Oc1ccccc1",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
}


# -- fingerprints ---------------------------------------------------------------------------------


def test_fingerprints_shape_dtype_binary_and_deterministic():
    fp = morgan_fingerprints(list(SMALL.values()), n_bits=512, radius=2)
    assert fp.shape == (4, 512)
    assert fp.dtype == np.float32
    assert set(np.unique(fp)) <= {0.0, 1.0}
    assert (fp.sum(axis=1) > 0).all()
    np.testing.assert_array_equal(fp, morgan_fingerprints(list(SMALL.values()), n_bits=512, radius=2))
    assert morgan_fingerprints(["CCO"]).shape == (1, 2048)  # default length


def test_fingerprints_equal_for_two_spellings_and_differ_between_molecules():
    fp = morgan_fingerprints(["OCC", "C(O)C", "CCO", "C1=CC=CC=C1", "c1ccccc1", "CCCO"], n_bits=1024)
    np.testing.assert_array_equal(fp[0], fp[1])
    np.testing.assert_array_equal(fp[0], fp[2])
    np.testing.assert_array_equal(fp[3], fp[4])  # Kekulé and aromatic benzene
    assert not np.array_equal(fp[0], fp[4])
    assert not np.array_equal(fp[0], fp[5])
    assert canonical_smiles(["OCC", "C(O)C"]) == ["CCO", "CCO"]


def test_fingerprint_settings_matter():
    smiles = [SMALL["aspirin"]]
    assert morgan_fingerprints(smiles, n_bits=256).shape == (1, 256)
    r1, r3 = morgan_fingerprints(smiles, radius=1), morgan_fingerprints(smiles, radius=3)
    assert r1.sum() < r3.sum()  # larger radius, more environments
    assert ((r1 > 0) <= (r3 > 0)).all()


def test_invalid_smiles_error_names_every_one():
    smiles = ["CCO", "C1CC", "not a molecule", "", "c1ccccc1"]
    with pytest.raises(ValueError) as info:
        morgan_fingerprints(smiles, names=["good", "ring", "junk", "empty", "benzene"])
    message = str(info.value)
    assert "3 invalid SMILES" in message
    for text in ("'C1CC'", "'ring'", "index 1", "'not a molecule'", "'junk'", "index 2", "'empty'", "index 3"):
        assert text in message
    assert "'good'" not in message and "'benzene'" not in message
    with pytest.raises(ValueError, match="index 1"):
        morgan_fingerprints(["CCO", "C1CC"])  # without names: indices
    with pytest.raises(ValueError, match="'bad'"):
        MoleculeFeatures.from_smiles({"ethanol": "CCO", "bad": "C(("})


def test_tanimoto():
    fp = morgan_fingerprints(["CCO", "OCC", "CCCCCCO", "c1ccccc1"], n_bits=1024)
    assert tanimoto(fp[0], fp[1]) == 1.0
    assert 0 < tanimoto(fp[0], fp[2]) < 1
    assert tanimoto(fp[0], fp[2]) > tanimoto(fp[0], fp[3])
    assert tanimoto(np.zeros(4), np.zeros(4)) == 1.0


# -- real sci-Plex3 drugs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sciplex3_drugs():
    if not SCIPLEX3_DRUGS.exists():
        pytest.skip(f"{SCIPLEX3_DRUGS} is not available")
    table = pd.read_csv(SCIPLEX3_DRUGS, header=None, names=["name", "smiles", "pathway"])
    return table[table["name"] != "control"].drop_duplicates("name").set_index("name")


def test_sciplex3_drugs_all_featurize(sciplex3_drugs):
    assert len(sciplex3_drugs) > 150
    cache = MoleculeFeatures.from_smiles(sciplex3_drugs["smiles"].to_dict())
    assert cache.features.shape == (len(sciplex3_drugs), 2048)
    assert (cache.features.sum(axis=1) > 0).all()


def test_sciplex3_related_drugs_are_more_similar(sciplex3_drugs):
    names = ["Entinostat", "Mocetinostat", "Dacinostat", "Panobinostat", "Busulfan", "Prednisone", "Meprednisone"]
    fp = dict(zip(names, morgan_fingerprints(sciplex3_drugs.loc[names, "smiles"].tolist(), names=names), strict=True))
    # benzamide HDAC inhibitors, hydroxamate HDAC inhibitors, glucocorticoids vs an alkylating agent
    for a, b in [("Entinostat", "Mocetinostat"), ("Dacinostat", "Panobinostat"), ("Prednisone", "Meprednisone")]:
        related = tanimoto(fp[a], fp[b])
        assert related > 0.4
        assert related > 3 * tanimoto(fp[a], fp["Busulfan"])
        assert related > 3 * tanimoto(fp[b], fp["Busulfan"])


# -- the feature cache ----------------------------------------------------------------------------


def test_from_smiles_cache():
    cache = MoleculeFeatures.from_smiles(SMALL, n_bits=256)
    assert cache.names == list(SMALL)
    assert len(cache) == 4 and cache.n_features == 256 and cache.kind == "morgan"
    np.testing.assert_array_equal(cache.features, morgan_fingerprints(list(SMALL.values()), n_bits=256))
    assert cache.index("phenol") == 2
    assert "phenol" in cache and "water" not in cache
    assert cache.smiles[0] == "CCO"  # canonical
    with pytest.raises(KeyError, match="water"):
        cache.index("water")


@pytest.fixture
def embedding_table():
    rng = np.random.default_rng(0)
    index = ["ethanol", "c1ccccc1", "Oc1ccccc1", "CC(=O)O"]  # names and SMILES mixed
    return pd.DataFrame(rng.normal(size=(4, 5)), index=index, columns=[f"e{i}" for i in range(5)])


def test_table_features_by_name_and_by_smiles(embedding_table):
    values = embedding_table.to_numpy(dtype=np.float32)
    cache = MoleculeFeatures.from_table(
        embedding_table,
        {"ethanol": None, "benzene": "C1=CC=CC=C1", "phenol": "c1ccc(O)cc1", "c1ccccc1": "not used"},
    )
    assert cache.kind == "table" and cache.names == ["ethanol", "benzene", "phenol", "c1ccccc1"]
    np.testing.assert_array_equal(cache.features, values[[0, 1, 2, 1]])  # name, SMILES, SMILES, name
    assert cache.smiles[1] == "c1ccccc1"
    # Without names_to_smiles: every row, named by the index.
    everything = MoleculeFeatures.from_table(embedding_table)
    assert everything.names == list(embedding_table.index)
    np.testing.assert_array_equal(everything.features, values)
    # A name that is itself a SMILES (another spelling of an index entry) is found too.
    by_name_as_smiles = MoleculeFeatures.from_table(embedding_table, {"OC(C)=O": None})
    np.testing.assert_array_equal(by_name_as_smiles.features, values[[3]])


def test_table_missing_and_invalid_molecules(embedding_table):
    with pytest.raises(KeyError) as info:
        MoleculeFeatures.from_table(embedding_table, {"ethanol": None, "water": "O", "caffeine": None})
    assert "water" in str(info.value) and "caffeine" in str(info.value) and "ethanol" not in str(info.value)
    with pytest.raises(ValueError, match="'mystery'"):
        MoleculeFeatures.from_table(embedding_table, {"mystery": "C1CC"})
    with pytest.raises(ValueError, match="duplicated"):
        MoleculeFeatures.from_table(pd.concat([embedding_table, embedding_table.iloc[:1]]))
    with pytest.raises(ValueError, match="numeric"):
        MoleculeFeatures.from_table(embedding_table.assign(label="x"))
    with pytest.raises(ValueError, match="non-finite"):
        MoleculeFeatures.from_table(embedding_table.replace(embedding_table.iloc[0, 0], np.nan))


def test_extended_appends_and_leaves_the_original_unchanged():
    cache = MoleculeFeatures.from_smiles({"ethanol": "OCC", "benzene": "c1ccccc1"}, n_bits=128, radius=3)
    before = cache.features.copy()
    bigger = cache.extended({"benzene": "C1=CC=CC=C1", "phenol": "Oc1ccccc1", "aspirin": SMALL["aspirin"]})
    assert bigger.names == ["ethanol", "benzene", "phenol", "aspirin"]
    assert cache.names == ["ethanol", "benzene"] and len(cache) == 2 and "phenol" not in cache
    np.testing.assert_array_equal(cache.features, before)
    np.testing.assert_array_equal(bigger.features[:2], before)
    expected = morgan_fingerprints(["Oc1ccccc1", SMALL["aspirin"]], n_bits=128, radius=3)  # same settings
    np.testing.assert_array_equal(bigger.features[2:], expected)
    assert cache.extended({"ethanol": "CCO"}).names == cache.names  # nothing new
    with pytest.raises(ValueError, match="different SMILES"):
        cache.extended({"ethanol": "CCCO"})
    with pytest.raises(ValueError, match="No SMILES"):
        cache.extended({"water": None})
    with pytest.raises(ValueError, match="'junk'"):
        cache.extended({"junk": "C1CC"})


def test_extended_table_cache_looks_up_the_stored_table(embedding_table):
    cache = MoleculeFeatures.from_table(embedding_table, {"ethanol": None})
    bigger = cache.extended({"phenol": "OC1=CC=CC=C1"})
    assert len(cache) == 1 and bigger.names == ["ethanol", "phenol"]
    np.testing.assert_array_equal(bigger.features[1], embedding_table.to_numpy(dtype=np.float32)[2])
    with pytest.raises(KeyError, match="caffeine"):
        cache.extended({"caffeine": "Cn1c(=O)c2c(ncn2C)n(C)c1=O"})


def _assert_plain(value):
    if isinstance(value, dict):
        for item in value.values():
            _assert_plain(item)
    elif isinstance(value, list):
        assert all(isinstance(item, (str, int, float)) for item in value)
    else:
        assert isinstance(value, (np.ndarray, str, int)), type(value)


def test_to_dict_from_dict_round_trip(embedding_table):
    for cache in (
        MoleculeFeatures.from_smiles(SMALL, n_bits=64, radius=1),
        MoleculeFeatures.from_table(embedding_table, {"ethanol": None, "benzene": "c1ccccc1"}),
    ):
        state = cache.to_dict()
        _assert_plain(state)
        restored = MoleculeFeatures.from_dict(state)
        assert restored.names == cache.names and restored.smiles == cache.smiles and restored.kind == cache.kind
        assert (restored.n_bits, restored.radius) == (cache.n_bits, cache.radius)
        np.testing.assert_array_equal(restored.features, cache.features)
        # A restored cache featurises new molecules exactly like the original.
        new = {"phenol": "Oc1ccccc1"}
        np.testing.assert_array_equal(restored.extended(new).features, cache.extended(new).features)
        state["features"][:] = 7  # the plain form is a copy
        assert not (cache.features == 7).any()


def test_recipes():
    cache = MoleculeFeatures.from_smiles(SMALL, n_bits=32)
    rows, doses = cache.recipes([["phenol", "ethanol"], [], ["aspirin"]], [[10.0, 100.0], 0.0, 5.0], width=3)
    np.testing.assert_array_equal(rows, [[2, 0, -1], [-1, -1, -1], [3, -1, -1]])
    np.testing.assert_array_equal(doses, [[10, 100, 0], [0, 0, 0], [5, 0, 0]])
    assert rows.dtype == np.int64 and doses.dtype == np.float32
    assert cache.recipes([["ethanol", "benzene"]], [1.0])[1].tolist() == [[1.0, 1.0]]  # one dose for all
    with pytest.raises(KeyError, match="water"):
        cache.recipes([["water", "ethanol"]], [1.0])
    with pytest.raises(ValueError, match="doses"):
        cache.recipes([["ethanol", "benzene"]], [[1.0, 2.0, 3.0]])


# -- dose scale -----------------------------------------------------------------------------------


def test_dose_scale():
    doses = torch.tensor([0.0, 1e-6, 1.0, 10.0, 100.0, 1000.0, 10000.0, 50000.0])
    s = dose_scale(doses, max_dose=10000.0)
    assert s[0] == 0 and torch.isclose(s[6], torch.tensor(1.0))
    assert (s.diff() > 0).all()  # strictly monotone
    assert torch.isfinite(s).all() and s[-1] > 1  # above the training range: defined, beyond 1
    torch.testing.assert_close(s, torch.log1p(doses) / np.log1p(10000.0))
    assert dose_scale(5.0, 5.0).item() == pytest.approx(1.0)
    assert dose_scale([0, 1], 1.0).dtype == torch.float32
    with pytest.raises(ValueError, match="-1"):
        dose_scale(torch.tensor([1.0, -1.0]), 10.0)
    with pytest.raises(ValueError, match="finite"):
        dose_scale(torch.tensor([float("inf")]), 10.0)
    with pytest.raises(ValueError, match="max_dose"):
        dose_scale(1.0, 0.0)


# -- encoder --------------------------------------------------------------------------------------


@pytest.fixture
def cache():
    return MoleculeFeatures.from_smiles(SMALL, n_bits=128)


@pytest.fixture
def encoder(cache):
    torch.manual_seed(0)
    return MoleculeEncoder(torch.from_numpy(cache.features), n_hidden=32, n_output=16, max_dose=1000.0).eval()


def _embed(encoder, molecules, doses, features=None):
    return encoder(torch.as_tensor(molecules), torch.as_tensor(doses, dtype=torch.float32), features=features)


def test_encoder_shape_and_buffer(encoder, cache):
    out = _embed(encoder, [[0, 1], [2, -1]], [[10.0, 10.0], [100.0, 0.0]])
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    assert "features" in dict(encoder.named_buffers())
    assert all(p.data_ptr() != encoder.features.data_ptr() for p in encoder.parameters())  # features not trained
    restored = MoleculeEncoder(torch.zeros(len(cache), cache.n_features), n_hidden=32, n_output=16, max_dose=1000.0)
    restored.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(_embed(restored.eval(), [[0, 1]], [[10.0, 10.0]]), out[:1])


def test_encoder_exactly_zero_at_dose_zero_padding_and_empty_rows(encoder):
    out = _embed(
        encoder,
        [[0, -1, -1], [0, 1, 2], [-1, -1, -1], [3, 3, -1]],
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, float("nan"), 1e9], [0.0, 0.0, float("nan")]],
    )
    assert torch.equal(out, torch.zeros(4, 16))
    # Padding (any dose there) and dose-0 components add exactly nothing to a perturbed row.
    alone = _embed(encoder, [[1]], [[50.0]])
    padded = _embed(encoder, [[-1, 1, 2, -1]], [[float("nan"), 50.0, 0.0, 123.0]])
    torch.testing.assert_close(padded, alone, rtol=1e-6, atol=1e-7)  # equal up to matmul rounding
    assert torch.equal(_embed(encoder, torch.empty(3, 0, dtype=torch.long), torch.empty(3, 0)), torch.zeros(3, 16))


def test_encoder_combinations_are_permutation_invariant_sums(encoder):
    doses = [[10.0, 200.0, 3.0]]
    out = _embed(encoder, [[0, 1, 3]], doses)
    for order in ([1, 0, 2], [2, 1, 0], [1, 2, 0]):
        permuted = _embed(encoder, [[[0, 1, 3][i] for i in order]], [[doses[0][i] for i in order]])
        torch.testing.assert_close(permuted, out)
    singles = _embed(encoder, [[0], [1], [3]], [[10.0], [200.0], [3.0]])
    torch.testing.assert_close(singles.sum(dim=0, keepdim=True), out)


def test_encoder_is_continuous_in_dose(encoder):
    for molecule in range(4):
        for dose in (0.0, 1.0, 30.0, 1000.0):
            base = _embed(encoder, [[molecule]], [[dose]])
            steps = [(_embed(encoder, [[molecule]], [[dose + eps]]) - base).norm().item() for eps in (1e-1, 1e-3)]
            assert steps[1] < 1e-3 * max(1.0, base.norm().item())
            assert steps[1] < steps[0]
    # The effect grows from exactly 0: small doses give small embeddings.
    norms = [_embed(encoder, [[2]], [[d]]).norm().item() for d in (0.0, 1e-4, 1e-2, 1.0)]
    assert norms[0] == 0 and norms[1] < norms[2] < norms[3] and norms[1] < 1e-4


def test_encoder_distinguishes_molecules_and_doses(encoder):
    out = _embed(encoder, [[0], [1], [2], [3]], [[100.0]] * 4)
    distances = torch.cdist(out, out)
    assert (distances + torch.eye(4) > 1e-4).all()
    by_dose = _embed(encoder, [[2], [2], [2]], [[10.0], [100.0], [1000.0]])
    assert (by_dose[1:] - by_dose[:-1]).norm(dim=1).min() > 1e-5
    # The shape of the dose response depends on the molecule, not only its amplitude.
    low, high = _embed(encoder, [[0], [3]], [[10.0], [10.0]]), _embed(encoder, [[0], [3]], [[1000.0], [1000.0]])
    ratio = low.norm(dim=1) / high.norm(dim=1)
    assert abs(ratio[0] - ratio[1]) > 1e-4


def test_encoder_unseen_doses_are_finite(encoder):
    out = _embed(encoder, [[0], [0], [1]], [[1000.0], [1e6], [37.5]])
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_encoder_gradients_reach_every_weight(encoder):
    encoder.train()
    out = _embed(encoder, [[0, 1], [2, -1], [-1, -1], [3, 3]], [[10.0, 0.0], [100.0, 0.0], [0.0, 0.0], [1.0, 1e4]])
    out.pow(2).sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert encoder.features.grad is None


def test_encoder_features_override_embeds_new_molecules(encoder, cache):
    bigger = cache.extended({"caffeine": "Cn1c(=O)c2c(ncn2C)n(C)c1=O"})
    features = torch.from_numpy(bigger.features)
    old = _embed(encoder, [[0, 1], [3, -1]], [[5.0, 50.0], [500.0, 0.0]])
    torch.testing.assert_close(_embed(encoder, [[0, 1], [3, -1]], [[5.0, 50.0], [500.0, 0.0]], features), old)
    new = _embed(encoder, [[bigger.index("caffeine")], [0]], [[50.0], [50.0]], features)
    assert torch.isfinite(new).all() and not torch.allclose(new[0], new[1])
    with pytest.raises(IndexError, match="out of range"):
        _embed(encoder, [[4]], [[1.0]])  # the buffer does not know caffeine
    with pytest.raises(ValueError, match="n_molecules"):
        _embed(encoder, [[0]], [[1.0]], torch.zeros(5, 7))


def test_encoder_input_errors(encoder):
    with pytest.raises(ValueError, match="Doses"):
        _embed(encoder, [[0]], [[-3.0]])
    with pytest.raises(ValueError, match="batch, width"):
        _embed(encoder, [[0, 1]], [[1.0]])
    with pytest.raises(ValueError, match="max_dose"):
        MoleculeEncoder(torch.zeros(2, 3), max_dose=0.0)
    empty = MoleculeEncoder(torch.zeros(0, 3), n_hidden=4, n_output=2, max_dose=1.0)
    assert torch.equal(_embed(empty, [[-1]], [[0.0]]), torch.zeros(1, 2))


def test_fingerprints_tell_stereoisomers_apart_only_with_chirality():
    l_alanine, d_alanine = "C[C@H](N)C(=O)O", "C[C@@H](N)C(=O)O"
    plain = morgan_fingerprints([l_alanine, d_alanine], n_bits=256)
    chiral = morgan_fingerprints([l_alanine, d_alanine], n_bits=256, chirality=True)
    assert (plain[0] == plain[1]).all()
    assert not (chiral[0] == chiral[1]).all()
