"""Loaders of the published benchmark sets: download, cache, checksums and conversion, against a local server."""

import hashlib
import http.server
import io
import threading
import zipfile

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import scdoloris as sd
from scdoloris.datasets import ChecksumError, _published

GENE_IDS = [f"ENSG{i:011d}" for i in range(12)]
SYMBOLS = ["KLF1", "MAP2K6", "CEBPA", "TMSB4X", "GATA1", "HBG1", "HBZ", "FTL", "CD34", "MYC", "ACTB", "GAPDH"]


def _lognorm(rng, n_cells, n_genes):
    counts = rng.poisson(2.0, size=(n_cells, n_genes)).astype(float)
    counts[:, 0] += 1  # no empty cells
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)


def gears_adata(condition_name=True):
    """A small AnnData with the layout of GEARS's perturb_processed.h5ad."""
    rng = np.random.default_rng(0)
    conditions = ["ctrl"] * 12 + ["KLF1+ctrl"] * 8 + ["ctrl+MAP2K6"] * 8 + ["KLF1+MAP2K6"] * 8 + ["CEBPA+ctrl"] * 8
    n = len(conditions)
    dose = ["1" if c == "ctrl" else "1+1" for c in conditions]
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(conditions),
            "cell_type": pd.Categorical(["K562"] * n),
            "dose_val": pd.Categorical(dose),
            "control": [int(c == "ctrl") for c in conditions],
        },
        index=[f"cell{i}" for i in range(n)],
    )
    if condition_name:
        obs["condition_name"] = pd.Categorical([f"K562_{c}_{d}" for c, d in zip(conditions, dose, strict=True)])
    var = pd.DataFrame({"gene_name": SYMBOLS}, index=GENE_IDS)
    adata = ad.AnnData(sparse.csr_matrix(_lognorm(rng, n, len(SYMBOLS))), obs=obs, var=var)
    order = rng.permutation(len(GENE_IDS))
    adata.uns["rank_genes_groups_cov_all"] = {
        f"K562_{c}_1+1": np.array(GENE_IDS, dtype=object)[np.roll(order, i)]
        for i, c in enumerate(["KLF1+ctrl", "ctrl+MAP2K6", "KLF1+MAP2K6", "CEBPA+ctrl"])
    }
    adata.uns["top_non_dropout_de_20"] = {"K562_KLF1+ctrl_1+1": np.array(GENE_IDS[:3], dtype=object)}
    return adata


def chemcpa_adata(with_dose_column=True):
    """A small AnnData with the layout of chemCPA's sci-Plex3 file (two cell types, two drugs, vehicle)."""
    rng = np.random.default_rng(1)
    rows = []
    for cell_type in ["A549", "MCF7"]:
        rows += [(cell_type, "control", 1.0, 0.0, "CS(C)=O")] * 6  # vehicle: chemCPA sets dose_val to 1
        for drug, smiles in [("Dacinostat", "CC(O)=O"), ("JQ1", "CCN")]:
            for dose_nm in (10.0, 100.0, 1000.0, 10000.0):
                rows += [(cell_type, drug, dose_nm / 1e4, dose_nm, smiles)] * 3
    rows += [("A549", "Dacinostat", 0.0, 0.0, "CC(O)=O")] * 2  # dose 0 of a drug: a control too
    obs = pd.DataFrame(rows, columns=["cell_type", "condition", "dose_val", "dose", "SMILES"])
    obs.index = [f"c{i}" for i in range(len(obs))]
    if not with_dose_column:
        obs = obs.drop(columns="dose")
    obs["condition"] = obs["condition"].astype("category")
    obs["cov_drug_dose_name"] = (
        obs["cell_type"] + "_" + obs["condition"].astype(str) + "_" + obs["dose_val"].astype(str)
    )
    var = pd.DataFrame(index=SYMBOLS)  # chemCPA keeps symbols as var_names
    adata = ad.AnnData(_lognorm(rng, len(obs), len(SYMBOLS)), obs=obs, var=var)
    degs = {}
    for k, cell_type in enumerate(["A549", "MCF7"]):
        for j, drug in enumerate(["Dacinostat", "JQ1"]):
            ranking = np.roll(np.array(SYMBOLS, dtype=object), k + 3 * j)
            for dose_val in ("0.001", "0.01", "0.1", "1.0"):
                # chemCPA repeats one ranking for every dose; make the highest dose's stand out.
                degs[f"{cell_type}_{drug}_{dose_val}"] = ranking if dose_val == "1.0" else ranking[::-1]
    adata.uns["lincs_DEGs"] = degs
    return adata


def _zip_bytes(tmp_path, adata, folder="adamson"):
    h5ad = tmp_path / "perturb_processed.h5ad"
    adata.write_h5ad(h5ad)
    archive = tmp_path / "gears.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(h5ad, f"{folder}/perturb_processed.h5ad")
        z.writestr(f"{folder}/go.csv", "source,target,importance\n")
    return archive.read_bytes()


class _Server:
    """Serves ``files`` ({path: bytes}) on 127.0.0.1 and counts the requests; ``truncate`` sends half a file."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.truncate = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if server.truncate else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def gears_zip(tmp_path_factory):
    return _zip_bytes(tmp_path_factory.mktemp("gears"), gears_adata())


def _cache_files(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ---------------------------------------------------------------------------------------------------------------------
# Download and cache
# ---------------------------------------------------------------------------------------------------------------------


def test_download_caches_and_verifies(server, gears_zip, tmp_path):
    server.files["/adamson.zip"] = gears_zip
    url, digest = server.url("/adamson.zip"), hashlib.sha256(gears_zip).hexdigest()
    cache = tmp_path / "cache"
    adata = sd.datasets.adamson2016(cache_dir=cache, url=url, sha256=digest)
    assert server.requests == ["/adamson.zip"]
    assert adata.n_obs == 44 and "perturbation" in adata.obs
    # Cached: the extracted file plus its recorded hash, no temporary files; the second call stays offline.
    files = _cache_files(cache)
    assert len(files) == 2 and files[0].startswith("adamson2016-") and files[0].endswith(".h5ad")
    assert files[1] == files[0] + ".sha256"
    again = sd.datasets.adamson2016(cache_dir=cache, url=url, sha256=digest)
    assert len(server.requests) == 1
    assert again.obs["perturbation"].tolist() == adata.obs["perturbation"].tolist()
    assert sd.datasets.adamson2016(cache_dir=cache, url=url, download=False).n_obs == 44
    assert len(server.requests) == 1


def test_default_url_and_cache_from_environment(server, gears_zip, tmp_path, monkeypatch):
    server.files["/6154020"] = gears_zip
    monkeypatch.setattr(_published, "NORMAN2019_URL", server.url("/6154020"))
    monkeypatch.setattr(_published, "NORMAN2019_SHA256", hashlib.sha256(gears_zip).hexdigest())
    monkeypatch.setenv("SCDOLORIS_CACHE", str(tmp_path / "env_cache"))
    adata = sd.datasets.norman2019()
    assert set(adata.obs["perturbation"]) == {"control", "KLF1", "MAP2K6", "KLF1+MAP2K6", "CEBPA"}
    assert _cache_files(tmp_path / "env_cache") == ["norman2019.h5ad", "norman2019.h5ad.sha256"]
    sd.datasets.norman2019()
    assert len(server.requests) == 1
    # A wrong published hash is caught at download time.
    monkeypatch.setattr(_published, "ADAMSON2016_URL", server.url("/6154020"))
    monkeypatch.setattr(_published, "ADAMSON2016_SHA256", "0" * 64)
    with pytest.raises(ChecksumError, match="adamson2016|Adamson 2016"):
        sd.datasets.adamson2016()


def test_checksum_mismatch_stores_nothing(server, gears_zip, tmp_path):
    server.files["/a.zip"] = gears_zip
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as error:
        sd.datasets.adamson2016(cache_dir=cache, url=server.url("/a.zip"), sha256="ab" * 32)
    message = str(error.value)
    assert server.url("/a.zip") in message and hashlib.sha256(gears_zip).hexdigest() in message
    assert "path=" in message
    assert _cache_files(cache) == []


def test_unknown_checksum_is_recorded_then_verified(server, gears_zip, tmp_path):
    server.files["/a.zip"] = gears_zip
    cache, url = tmp_path / "cache", server.url("/a.zip")
    with pytest.warns(UserWarning, match=hashlib.sha256(gears_zip).hexdigest()):
        sd.datasets.adamson2016(cache_dir=cache, url=url)
    (cached,) = [p for p in cache.iterdir() if p.suffix == ".h5ad"]
    recorded = (cache / (cached.name + ".sha256")).read_text().split()[0]
    assert recorded == hashlib.sha256(cached.read_bytes()).hexdigest()
    with cached.open("r+b") as f:  # corrupt the cached copy
        f.seek(100)
        f.write(b"\x00corrupt\x00")
    with pytest.raises(ChecksumError) as error:
        sd.datasets.adamson2016(cache_dir=cache, url=url)
    message = str(error.value)
    assert str(cached) in message and "Delete" in message and "path=" in message
    assert len(server.requests) == 1
    cached.unlink()  # as the message says: deleting it downloads it again
    with pytest.warns(UserWarning):
        assert sd.datasets.adamson2016(cache_dir=cache, url=url).n_obs == 44
    assert len(server.requests) == 2


def test_failed_downloads_leave_nothing(server, gears_zip, tmp_path):
    cache = tmp_path / "cache"
    server.files["/a.zip"] = gears_zip
    server.truncate = True  # the connection closes half way
    with pytest.raises(OSError, match="Incomplete download"):
        sd.datasets.adamson2016(cache_dir=cache, url=server.url("/a.zip"))
    assert _cache_files(cache) == []
    with pytest.raises(OSError, match="404"):
        sd.datasets.sciplex3(cache_dir=cache, url=server.url("/missing.h5ad"))
    assert _cache_files(cache) == []
    # A zip without perturb_processed.h5ad fails after the download, and nothing is kept either.
    server.truncate = False
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("norman/readme.txt", "no perturb_processed.h5ad here")
    server.files["/other.zip"] = buffer.getvalue()
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="perturb_processed.h5ad"):
        sd.datasets.norman2019(cache_dir=cache, url=server.url("/other.zip"))
    assert _cache_files(cache) == []


def test_offline_download_names_path(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(ConnectionError, match=r"Could not download .*name resolution.*path="):
        sd.datasets.norman2019(cache_dir=tmp_path / "cache")
    assert _cache_files(tmp_path / "cache") == []


def test_download_false_without_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"download=True.*path="):
        sd.datasets.norman2019(cache_dir=tmp_path / "empty", download=False)
    with pytest.raises(FileNotFoundError, match="sci-Plex3"):
        sd.datasets.sciplex3(cache_dir=tmp_path / "empty", download=False)
    assert not (tmp_path / "empty").exists()


def test_path_override_skips_download(tmp_path, gears_zip, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("path= must not download")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    archive = tmp_path / "norman.zip"
    archive.write_bytes(gears_zip)
    h5ad = tmp_path / "norman" / "perturb_processed.h5ad"
    h5ad.parent.mkdir()
    gears_adata().write_h5ad(h5ad)
    cache = tmp_path / "cache"
    for path in (archive, h5ad, h5ad.parent, tmp_path / "norman"):
        adata = sd.datasets.norman2019(path=path, cache_dir=cache)
        assert adata.n_obs == 44 and "KLF1+MAP2K6" in adata.uns["de_genes"]
    assert not cache.exists()
    sciplex = tmp_path / "sciplex.h5ad"
    chemcpa_adata().write_h5ad(sciplex)
    assert sd.datasets.sciplex3(path=sciplex, download=False).obs["perturbation"].iloc[0] == "control"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd.datasets.adamson2016(path=tmp_path / "nope.zip")


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("condition_name", [True, False])
def test_gears_conversion(tmp_path, condition_name):
    h5ad = tmp_path / "perturb_processed.h5ad"
    raw = gears_adata(condition_name)
    raw.write_h5ad(h5ad)
    adata = sd.datasets.adamson2016(path=h5ad)
    expected = {"ctrl": "control", "KLF1+ctrl": "KLF1", "ctrl+MAP2K6": "MAP2K6", "KLF1+MAP2K6": "KLF1+MAP2K6"}
    expected["CEBPA+ctrl"] = "CEBPA"
    assert adata.obs["perturbation"].tolist() == raw.obs["condition"].map(expected).tolist()
    assert adata.obs["perturbation"].cat.categories[0] == "control"
    assert adata.obs["condition"].tolist() == raw.obs["condition"].tolist()  # GEARS's columns are kept
    assert adata.obs["cell_type"].tolist() == ["K562"] * adata.n_obs
    assert list(adata.var_names) == SYMBOLS and list(adata.var["gene_id"]) == GENE_IDS
    np.testing.assert_array_equal(adata.X.toarray(), raw.X.toarray())
    # DE rankings: in the perturbation label space, as gene symbols, order kept.
    to_symbol = dict(zip(GENE_IDS, SYMBOLS, strict=True))
    ranks = raw.uns["rank_genes_groups_cov_all"]
    assert set(adata.uns["de_genes"]) == {"KLF1", "MAP2K6", "KLF1+MAP2K6", "CEBPA"}
    for key, label in [("K562_ctrl+MAP2K6_1+1", "MAP2K6"), ("K562_KLF1+MAP2K6_1+1", "KLF1+MAP2K6")]:
        assert adata.uns["de_genes"][label] == [to_symbol[g] for g in ranks[key]]
    assert adata.uns["de_genes_by_cell_type"] == {"K562": adata.uns["de_genes"]}
    sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
    # The converted object can be saved.
    adata.write_h5ad(tmp_path / "converted.h5ad")
    back = ad.read_h5ad(tmp_path / "converted.h5ad")
    assert list(back.uns["de_genes"]["CEBPA"]) == adata.uns["de_genes"]["CEBPA"]


def test_gears_labels():
    label = _published.gears_label
    assert [label(c) for c in ["ctrl", "ctrl+ctrl", "KLF1+ctrl", "ctrl+KLF1", "B+A", "A+B"]] == [
        "control",
        "control",
        "KLF1",
        "KLF1",
        "B+A",
        "A+B",
    ]


def test_gears_duplicate_symbols(tmp_path):
    raw = gears_adata()
    raw.var["gene_name"] = ["KLF1"] + SYMBOLS[1:-1] + ["KLF1"]
    raw.write_h5ad(tmp_path / "dup.h5ad")
    adata = sd.datasets.norman2019(path=tmp_path / "dup.h5ad")
    assert adata.var_names.is_unique and adata.var_names[0] == "KLF1" and adata.var_names[-1].startswith("KLF1-")
    assert set(adata.uns["de_genes"]["KLF1"]) == set(adata.var_names)


@pytest.mark.parametrize("with_dose_column", [True, False])
def test_sciplex3_conversion_and_download(server, tmp_path, with_dose_column):
    raw = chemcpa_adata(with_dose_column)
    raw.write_h5ad(tmp_path / "sciplex.h5ad")
    body = (tmp_path / "sciplex.h5ad").read_bytes()
    server.files["/sciplex.h5ad"] = body  # chemCPA serves the .h5ad itself, not a zip
    url = server.url("/sciplex.h5ad")
    adata = sd.datasets.sciplex3(cache_dir=tmp_path / "cache", url=url, sha256=hashlib.sha256(body).hexdigest())
    obs = adata.obs
    vehicle = (raw.obs["condition"] == "control").to_numpy()
    dose_zero = ((raw.obs["condition"] == "Dacinostat") & (raw.obs["dose_val"] == 0)).to_numpy()
    assert (obs["perturbation"][vehicle | dose_zero] == "control").all()
    assert obs["perturbation"][~(vehicle | dose_zero)].tolist() == raw.obs["condition"][~(vehicle | dose_zero)].tolist()
    assert obs["dose"].dtype == float and (obs["dose"][vehicle | dose_zero] == 0).all()
    treated = ~(vehicle | dose_zero)
    np.testing.assert_allclose(obs["dose"][treated], raw.obs["dose_val"][treated] * 1e4)
    assert set(obs["dose"][treated]) == {10.0, 100.0, 1000.0, 10000.0}
    assert obs["smiles"].tolist() == raw.obs["SMILES"].tolist()
    assert set(obs["cell_type"]) == {"A549", "MCF7"} and list(adata.var_names) == SYMBOLS
    # DE genes per cell type from the highest dose; the flat dict leaves out drugs whose rankings differ.
    by_type = adata.uns["de_genes_by_cell_type"]
    assert set(by_type) == {"A549", "MCF7"} and set(by_type["A549"]) == {"Dacinostat", "JQ1"}
    assert by_type["MCF7"]["JQ1"] == list(raw.uns["lincs_DEGs"]["MCF7_JQ1_1.0"])
    assert adata.uns["de_genes"] == {}
    a549 = sd.datasets.sciplex3(cache_dir=tmp_path / "cache", url=url, download=False)
    assert len(server.requests) == 1
    one_type = a549[a549.obs["cell_type"] == "A549"].copy()
    sd.Doloris.setup_anndata(
        one_type, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type"
    )


def test_sciplex3_single_cell_type_has_flat_de(tmp_path):
    raw = chemcpa_adata()
    raw = raw[raw.obs["cell_type"] == "A549"].copy()
    raw.uns["lincs_DEGs"] = {k: v for k, v in raw.uns["lincs_DEGs"].items() if k.startswith("A549_")}
    raw.write_h5ad(tmp_path / "a549.h5ad")
    adata = sd.datasets.sciplex3(path=tmp_path / "a549.h5ad")
    assert adata.uns["de_genes"]["Dacinostat"] == list(raw.uns["lincs_DEGs"]["A549_Dacinostat_1.0"])


def test_not_a_gears_file(tmp_path):
    raw = gears_adata()
    raw.obs = raw.obs.rename(columns={"condition": "perturbation_name"})
    raw.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(KeyError, match=r"GEARS.*\['condition'\]"):
        sd.datasets.adamson2016(path=tmp_path / "x.h5ad")
    gears_adata().write_h5ad(tmp_path / "y.h5ad")
    with pytest.raises(KeyError, match="chemCPA"):
        sd.datasets.sciplex3(path=tmp_path / "y.h5ad")


def test_sciplex3_feeds_the_molecule_path(tmp_path):
    """Loader output -> setup with doses and SMILES -> short training -> an unseen molecule at an unseen dose."""
    chemcpa_adata().write_h5ad(tmp_path / "sciplex.h5ad")
    adata = sd.datasets.sciplex3(path=tmp_path / "sciplex.h5ad")
    sd.Doloris.setup_anndata(
        adata,
        perturbation_key="perturbation",
        control_value="control",
        cell_type_key="cell_type",
        dose_key="dose",
        smiles_key="smiles",
    )
    model = sd.Doloris(adata, n_hidden=32, n_hidden_mask=32, n_perturbation=16)
    assert sorted(model.summary_["molecules"]["names"]) == ["Dacinostat", "JQ1"]
    model.train(max_steps=5, enable_progress_bar=False)
    pred = model.predict_perturbation(
        ["Dacinostat", "ethanol"], dose=[300.0, 50.0], smiles={"ethanol": "CCO"}, cell_type="MCF7", n_cells=4, n_steps=3
    )
    assert pred.n_obs == 8 and np.isfinite(pred.X).all()
    assert pred.obs["dose"].tolist() == [300.0] * 4 + [50.0] * 4
