"""Loaders for the published benchmark data sets: Adamson 2016, Norman 2019 (GEARS) and sci-Plex3 (chemCPA)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from ._download import fetch, find_member

CONTROL = "control"

#: GEARS-processed Adamson 2016 (K562 CRISPRi, UPR screen): Harvard Dataverse file 6154417, a zip holding
#: ``adamson/perturb_processed.h5ad``.
ADAMSON2016_URL = "https://dataverse.harvard.edu/api/access/datafile/6154417"
#: GEARS-processed Norman 2019 (K562 CRISPRa, single and double activations): Harvard Dataverse file 6154020,
#: a zip holding ``norman/perturb_processed.h5ad``.
NORMAN2019_URL = "https://dataverse.harvard.edu/api/access/datafile/6154020"
#: chemCPA-processed sci-Plex3 (A549, K562, MCF7; 188 drugs at 4 doses), the "shared gene set" file the chemCPA
#: authors list in their README (https://github.com/theislab/chemCPA). Served as a plain ``.h5ad``.
SCIPLEX3_URL = "https://f003.backblazeb2.com/file/chemCPA-datasets/sciplex_complete_middle_subset_lincs_genes.h5ad"

# SHA-256 of the files above. Not known yet (they could not be downloaded where this was written): ``None``
# accepts the first download, warns with its hash, and verifies the stored copy on every later use against the
# hash recorded then. Fill these in with the hashes from that warning (or ``sha256sum`` of the downloaded
# archive / file) to have every download checked.
ADAMSON2016_SHA256: str | None = None
NORMAN2019_SHA256: str | None = None
SCIPLEX3_SHA256: str | None = None

GEARS_FILE = "perturb_processed.h5ad"
GEARS_DE_KEY = "rank_genes_groups_cov_all"
CHEMCPA_DE_KEY = "lincs_DEGs"
#: Highest sci-Plex3 dose in nM; chemCPA's ``dose_val`` is the dose divided by it.
SCIPLEX3_MAX_DOSE_NM = 10_000.0
_SYMBOL_COLUMNS = ("gene_name", "gene_symbol", "gene_symbols", "symbol", "gene_short_name")

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------------------------------


def adamson2016(
    path: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    download: bool = True,
    url: str | None = None,
    sha256: str | None = None,
) -> ad.AnnData:
    """Adamson et al. 2016 Perturb-seq (K562 CRISPRi, unfolded protein response), as processed by GEARS.

    Downloads the GEARS release (Harvard Dataverse file 6154417, ``ADAMSON2016_URL``), a zip holding
    ``perturb_processed.h5ad`` (log-normalised expression), caches the extracted file and converts it for
    :meth:`scdoloris.Doloris.setup_anndata` (see Notes).

    Parameters
    ----------
    path
        A local copy to use instead of downloading: the GEARS zip, the ``perturb_processed.h5ad`` file or the
        folder holding it. Not checksummed (it may be your own re-processing of the data).
    cache_dir
        Where downloads are stored; default the environment variable ``SCDOLORIS_CACHE``, else
        ``~/.cache/scdoloris``.
    download
        Download when the data are not in the cache; ``False`` raises :class:`FileNotFoundError` instead.
    url
        Download from here instead of ``ADAMSON2016_URL`` (a mirror); cached separately per URL.
    sha256
        Expected SHA-256 of the downloaded zip. Default: ``ADAMSON2016_SHA256`` for the default URL, none for
        another. Without one the first download is accepted (its hash is shown in a warning) and the stored
        file is verified against the hash recorded then on every later use.

    Returns
    -------
    anndata.AnnData
        ``obs['perturbation']`` (``"control"``, ``"ATF6"``, ...), ``obs['cell_type']``, gene symbols as
        ``var_names`` and DE genes in ``uns['de_genes']``; GEARS's columns and ``uns`` entries are kept.

    Raises
    ------
    FileNotFoundError
        ``download=False`` and the data are not cached, or ``path`` does not exist.
    scdoloris.datasets.ChecksumError
        The download or the cached file does not have the expected SHA-256.

    Notes
    -----
    Conversion of GEARS files: ``obs['condition']`` becomes ``obs['perturbation']`` with the ``"ctrl"``
    placeholders dropped and the order of the remaining genes kept (``"ctrl"`` -> ``"control"``,
    ``"KLF1+ctrl"`` and ``"ctrl+KLF1"`` -> ``"KLF1"``, ``"KLF1+MAP2K6"`` unchanged); ``var['gene_name']``
    becomes ``var_names`` (made unique; the former names go to ``var['gene_id']``); the rankings in
    ``uns['rank_genes_groups_cov_all']`` (keys ``f"{cell_type}_{condition}_{dose}"``, genes as former
    ``var_names``) become ``uns['de_genes']`` = ``{perturbation: [gene symbols, most significant first]}``
    and ``uns['de_genes_by_cell_type']`` = ``{cell_type: {perturbation: [...]}}``. With several cell types,
    ``uns['de_genes']`` holds only the perturbations whose ranking is the same in all of them.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.adamson2016()  # doctest: +SKIP
    >>> sd.Doloris.setup_anndata(
    ...     adata, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type"
    ... )  # doctest: +SKIP
    >>> adata.uns["de_genes"]["ATF6"][:20]  # doctest: +SKIP
    """
    return _load_gears("adamson2016", "Adamson 2016", ADAMSON2016_URL, ADAMSON2016_SHA256, **_args(locals()))


def norman2019(
    path: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    download: bool = True,
    url: str | None = None,
    sha256: str | None = None,
) -> ad.AnnData:
    """Norman et al. 2019 Perturb-seq (K562 CRISPRa, single and double gene activations), as processed by GEARS.

    Downloads the GEARS release (Harvard Dataverse file 6154020, ``NORMAN2019_URL``), a zip holding
    ``perturb_processed.h5ad`` (log-normalised expression), caches the extracted file and converts it for
    :meth:`scdoloris.Doloris.setup_anndata`. For the small subset bundled with the package see
    :func:`norman2019_subset`.

    Parameters
    ----------
    path
        A local copy to use instead of downloading: the GEARS zip, the ``perturb_processed.h5ad`` file or the
        folder holding it. Not checksummed.
    cache_dir
        Where downloads are stored; default the environment variable ``SCDOLORIS_CACHE``, else
        ``~/.cache/scdoloris``.
    download
        Download when the data are not in the cache; ``False`` raises :class:`FileNotFoundError` instead.
    url
        Download from here instead of ``NORMAN2019_URL`` (a mirror); cached separately per URL.
    sha256
        Expected SHA-256 of the downloaded zip. Default: ``NORMAN2019_SHA256`` for the default URL, none for
        another (see :func:`adamson2016`).

    Returns
    -------
    anndata.AnnData
        ``obs['perturbation']`` (``"control"``, ``"KLF1"``, ``"KLF1+MAP2K6"``), ``obs['cell_type']``, gene
        symbols as ``var_names`` and DE genes in ``uns['de_genes']``; converted as described in
        :func:`adamson2016`.

    Raises
    ------
    FileNotFoundError
        ``download=False`` and the data are not cached, or ``path`` does not exist.
    scdoloris.datasets.ChecksumError
        The download or the cached file does not have the expected SHA-256.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.norman2019(cache_dir="data/")  # doctest: +SKIP
    >>> adata = sd.datasets.norman2019(path="norman.zip")  # a copy downloaded by hand  # doctest: +SKIP
    >>> doubles = adata.obs["perturbation"].str.contains("+", regex=False)  # doctest: +SKIP
    """
    return _load_gears("norman2019", "Norman 2019", NORMAN2019_URL, NORMAN2019_SHA256, **_args(locals()))


def sciplex3(
    path: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    download: bool = True,
    url: str | None = None,
    sha256: str | None = None,
) -> ad.AnnData:
    """sci-Plex3 (Srivatsan et al. 2020: A549, K562 and MCF7 cells, 188 drugs at 4 doses), as processed by chemCPA.

    Downloads the chemCPA authors' ``sciplex_complete_middle_subset_lincs_genes.h5ad`` (``SCIPLEX3_URL``;
    log-normalised, the genes shared with LINCS), caches it and converts it for
    :meth:`scdoloris.Doloris.setup_anndata`. Pass ``url=`` (or set ``scdoloris.datasets._published.SCIPLEX3_URL``)
    to use another chemCPA release with the same layout, or ``path=`` for a local copy.

    Parameters
    ----------
    path
        A local chemCPA ``.h5ad`` (or a zip holding exactly one ``.h5ad``) to use instead of downloading.
        Not checksummed.
    cache_dir
        Where downloads are stored; default the environment variable ``SCDOLORIS_CACHE``, else
        ``~/.cache/scdoloris``.
    download
        Download when the data are not in the cache; ``False`` raises :class:`FileNotFoundError` instead.
    url
        Download from here instead of ``SCIPLEX3_URL``; cached separately per URL.
    sha256
        Expected SHA-256 of the download. Default: ``SCIPLEX3_SHA256`` for the default URL, none for another
        (see :func:`adamson2016`).

    Returns
    -------
    anndata.AnnData
        ``obs['perturbation']`` (drug name, ``"control"`` for vehicle), ``obs['cell_type']``, ``obs['dose']``
        (float, nM; 0 for controls), ``obs['smiles']``, gene symbols as ``var_names`` and DE genes in
        ``uns['de_genes']`` / ``uns['de_genes_by_cell_type']``; chemCPA's columns and ``uns`` entries are kept
        (``obs['dose']`` is replaced by the numeric dose).

    Raises
    ------
    FileNotFoundError
        ``download=False`` and the data are not cached, or ``path`` does not exist.
    scdoloris.datasets.ChecksumError
        The download or the cached file does not have the expected SHA-256.

    Notes
    -----
    Conversion of chemCPA files (``obs`` columns ``condition``, ``SMILES``, ``cell_type``, ``dose_val``):

    - Dose: chemCPA's ``dose_val`` is the dose divided by the highest dose, 10 µM (and is set to 1 for the
      vehicle). ``obs['dose']`` in nM is taken from chemCPA's own ``obs['dose']`` column (nM) when the file
      has one, else ``dose_val * 10000`` (``dose_val`` used as is when it exceeds 1, i.e. already in nM).
    - Controls: a cell is a control, ``perturbation == "control"`` and ``dose == 0``, when chemCPA's
      ``condition`` is ``"control"`` (the vehicle, DMSO) or its dose is 0. Other cells keep their drug name.
    - DE genes: ``uns['lincs_DEGs']`` is keyed ``f"{cell_type}_{condition}_{dose_val}"`` and chemCPA gives
      every dose of a drug the same ranking; the one at the highest dose is kept.
      ``uns['de_genes_by_cell_type']`` = ``{cell_type: {drug: [genes]}}``; as the rankings differ between
      the three cell lines, ``uns['de_genes']`` (``{drug: [genes]}``) holds only drugs whose ranking is the
      same in all cell types present: subset to one cell type and use ``uns['de_genes_by_cell_type'][ct]``.
    - ``dose_key``/``smiles_key`` are not supported by ``Doloris.setup_anndata`` in this release: drugs are
      modelled as learned categories.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.sciplex3()  # doctest: +SKIP
    >>> a549 = adata[adata.obs["cell_type"] == "A549"].copy()  # doctest: +SKIP
    >>> de = adata.uns["de_genes_by_cell_type"]["A549"]["Dacinostat"][:20]  # doctest: +SKIP

    DE genes of every (drug, cell type), in the form :func:`scdoloris.metrics.evaluate` takes:

    >>> by_type = adata.uns["de_genes_by_cell_type"]  # doctest: +SKIP
    >>> de_genes = {(drug, ct): genes for ct, per in by_type.items() for drug, genes in per.items()}  # doctest: +SKIP
    """
    return _load("sciplex3", "sci-Plex3", SCIPLEX3_URL, SCIPLEX3_SHA256, None, chemcpa_to_doloris, **_args(locals()))


# ---------------------------------------------------------------------------------------------------------------------
# Locating and reading the files
# ---------------------------------------------------------------------------------------------------------------------


def _args(local: Mapping) -> dict:
    return {k: local[k] for k in ("path", "cache_dir", "download", "url", "sha256")}


def _load_gears(key: str, description: str, default_url: str, default_sha256: str | None, **kwargs) -> ad.AnnData:
    return _load(key, description, default_url, default_sha256, GEARS_FILE, gears_to_doloris, **kwargs)


def _load(
    key: str,
    description: str,
    default_url: str,
    default_sha256: str | None,
    member: str | None,
    convert: Callable[[ad.AnnData], ad.AnnData],
    *,
    path: PathLike | None,
    cache_dir: PathLike | None,
    download: bool,
    url: str | None,
    sha256: str | None,
) -> ad.AnnData:
    if path is not None:
        return convert(_read_local(Path(path).expanduser(), member))
    if url is None or url == default_url:
        url, name = default_url, f"{key}.h5ad"
        sha256 = default_sha256 if sha256 is None else sha256
    else:
        name = f"{key}-{hashlib.sha256(url.encode()).hexdigest()[:10]}.h5ad"
    file = fetch(
        name,
        url,
        sha256=sha256,
        member=member,
        cache_dir=cache_dir,
        download=download,
        description=description,
    )
    return convert(ad.read_h5ad(file))


def _read_local(path: Path, member: str | None) -> ad.AnnData:
    """Read a user's ``.h5ad``, or the file ``member`` (``None``: the only ``.h5ad``) in a folder or zip."""
    if not path.exists():
        raise FileNotFoundError(f"path={str(path)!r} does not exist.")
    pattern = member or "*.h5ad"
    if path.is_dir():
        found = sorted(path.glob(pattern)) or sorted(path.glob(f"*/{pattern}"))
        if len(found) != 1:
            raise FileNotFoundError(f"Expected one {pattern!r} in the folder {path} (or a subfolder), found {found}.")
        path = found[0]
    if not zipfile.is_zipfile(path):
        return ad.read_h5ad(path)
    with zipfile.ZipFile(path) as archive:
        if member is None:
            names = [n for n in archive.namelist() if n.endswith(".h5ad") and not n.startswith("__MACOSX/")]
            if len(names) != 1:
                raise FileNotFoundError(f"Expected exactly one .h5ad file in {path}, found {names}.")
            name = names[0]
        else:
            name = find_member(archive, member)
        with tempfile.TemporaryDirectory() as tmp:
            return ad.read_h5ad(archive.extract(name, tmp))


# ---------------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------------


def gears_label(condition: str) -> str:
    """Perturbation label of a GEARS condition: ``"ctrl"`` -> ``"control"``, ``"KLF1+ctrl"`` -> ``"KLF1"``."""
    genes = [g for g in str(condition).split("+") if g and g != "ctrl"]
    return "+".join(genes) if genes else CONTROL


def _require(adata: ad.AnnData, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in adata.obs]
    if missing:
        raise KeyError(
            f"This does not look like a {what} file: obs lacks {missing} (columns: {list(adata.obs.columns)})."
        )


def _use_gene_symbols(adata: ad.AnnData) -> dict[str, str]:
    """Make gene symbols the ``var_names`` (former names to ``var['gene_id']``); return former -> new name."""
    old = adata.var_names.astype(str)
    column = next((c for c in _SYMBOL_COLUMNS if c in adata.var), None)
    if column is not None:
        symbols = adata.var[column].astype(str).to_numpy()
        if not np.array_equal(symbols, old.to_numpy()) and "gene_id" not in adata.var:
            adata.var["gene_id"] = old.to_numpy()
        adata.var_names = pd.Index(symbols)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return dict(zip(old, adata.var_names.astype(str), strict=True))


def _split_key(key: str, cell_types: list[str]) -> tuple[str, str, str] | None:
    """``f"{cell_type}_{condition}_{dose}"`` -> ``(cell_type, condition, dose)``; the cell types are known."""
    for cell_type in sorted(cell_types, key=len, reverse=True):
        if key.startswith(f"{cell_type}_"):
            rest = key[len(cell_type) + 1 :]
            condition, sep, dose = rest.rpartition("_")
            return (cell_type, condition, dose) if sep and condition else None
    return None


def _genes(values, rename: dict[str, str]) -> list[str]:
    return [rename.get(g, g) for g in np.asarray(values).astype(str).tolist()]


def _store_de(adata: ad.AnnData, by_cell_type: dict[str, dict[str, list[str]]]) -> None:
    flat: dict[str, list[str]] = {}
    labels = dict.fromkeys(label for per_type in by_cell_type.values() for label in per_type)
    for label in labels:
        rankings = [per_type[label] for per_type in by_cell_type.values() if label in per_type]
        # Several cell types disagree: the flat dict would have to pick one, so it leaves the label out.
        if len(by_cell_type) == 1 or (len(rankings) == len(by_cell_type) and all(r == rankings[0] for r in rankings)):
            flat[label] = rankings[0]
    adata.uns["de_genes"] = flat
    adata.uns["de_genes_by_cell_type"] = by_cell_type


def _categorical(values) -> pd.Categorical:
    values = pd.Series(values).astype(str)
    categories = sorted(set(values))
    if CONTROL in categories:
        categories = [CONTROL] + [c for c in categories if c != CONTROL]
    return pd.Categorical(values, categories=categories)


def gears_to_doloris(adata: ad.AnnData) -> ad.AnnData:
    """Convert a GEARS ``perturb_processed.h5ad`` in place (see :func:`adamson2016`, Notes) and return it."""
    _require(adata, ("condition", "cell_type"), "GEARS")
    conditions = adata.obs["condition"].astype(str)
    adata.obs["perturbation"] = _categorical(conditions.map(gears_label).to_numpy())
    adata.obs["cell_type"] = _categorical(adata.obs["cell_type"].to_numpy())
    rename = _use_gene_symbols(adata)
    cell_types = list(adata.obs["cell_type"].cat.categories)
    # condition_name (GEARS's DE key of each cell) -> (cell type, condition), when the file has it.
    named: dict[str, tuple[str, str]] = {}
    if "condition_name" in adata.obs:
        pairs = pd.DataFrame(
            {
                "key": adata.obs["condition_name"].astype(str).to_numpy(),
                "cell_type": adata.obs["cell_type"].astype(str).to_numpy(),
                "condition": conditions.to_numpy(),
            }
        ).drop_duplicates("key")
        named = {k: (c, p) for k, c, p in pairs.itertuples(index=False)}
    by_cell_type: dict[str, dict[str, list[str]]] = {}
    for key, values in dict(adata.uns.get(GEARS_DE_KEY, {})).items():
        found = named.get(key)
        if found is None:
            parsed = _split_key(str(key), cell_types)
            found = None if parsed is None else parsed[:2]
        if found is None:
            continue  # not a ranking of a condition of this file
        label = gears_label(found[1])
        if label != CONTROL:
            by_cell_type.setdefault(found[0], {})[label] = _genes(values, rename)
    _store_de(adata, by_cell_type)
    return adata


def _numeric(values) -> np.ndarray:
    return pd.to_numeric(pd.Series(np.asarray(values).astype(str)), errors="coerce").to_numpy(dtype=float)


def chemcpa_to_doloris(adata: ad.AnnData) -> ad.AnnData:
    """Convert a chemCPA sci-Plex ``.h5ad`` in place (see :func:`sciplex3`, Notes) and return it."""
    _require(adata, ("condition", "SMILES", "cell_type", "dose_val"), "chemCPA sci-Plex")
    condition = adata.obs["condition"].astype(str).to_numpy()
    dose_val = _numeric(adata.obs["dose_val"])
    treated = dose_val[condition != CONTROL]
    normalised = treated.size == 0 or np.isnan(treated).all() or np.nanmax(treated) <= 1.0
    from_dose_val = dose_val * SCIPLEX3_MAX_DOSE_NM if normalised else dose_val
    dose = _numeric(adata.obs["dose"]) if "dose" in adata.obs else from_dose_val
    dose = np.where(np.isnan(dose), from_dose_val, dose)
    control = (condition == CONTROL) | (dose == 0)
    dose = np.where(control, 0.0, dose)
    adata.obs["perturbation"] = _categorical(np.where(control, CONTROL, condition))
    adata.obs["cell_type"] = _categorical(adata.obs["cell_type"].to_numpy())
    adata.obs["dose"] = dose
    adata.obs["smiles"] = adata.obs["SMILES"].astype(str).to_numpy()
    rename = _use_gene_symbols(adata)
    cell_types = list(adata.obs["cell_type"].cat.categories)
    best: dict[tuple[str, str], tuple[float, list[str]]] = {}
    for key, values in dict(adata.uns.get(CHEMCPA_DE_KEY, {})).items():
        parsed = _split_key(str(key), cell_types)
        if parsed is None or parsed[1] == CONTROL:
            continue
        cell_type, drug, dose_text = parsed
        level = float(_numeric([dose_text])[0])
        level = -np.inf if np.isnan(level) else level
        if (cell_type, drug) not in best or level > best[cell_type, drug][0]:
            best[cell_type, drug] = (level, _genes(values, rename))
    by_cell_type: dict[str, dict[str, list[str]]] = {}
    for (cell_type, drug), (_, genes) in best.items():
        by_cell_type.setdefault(cell_type, {})[drug] = genes
    _store_de(adata, by_cell_type)
    return adata
