"""Synthetic drug-response data built on the real sci-Plex3 molecules, with a known ground truth."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from importlib import resources

import anndata
import numpy as np
import pandas as pd
from rdkit import Chem, rdBase
from rdkit.Chem import Crippen, rdFingerprintGenerator

from .._validation import label_list

#: The sci-Plex3 drugs (name, SMILES, pathway; no header line) as distributed by chemCPA (MIT).
DRUGS_FILE = "sciplex3_drugs_smiles_chemCPA.csv"

# Morgan fingerprint of every molecule: radius 2, 1024 bits.
_FP_RADIUS = 2
_FP_BITS = 1024
# Response modules (gene programs), the share of genes each one loads on and the range of its loadings.
_N_MODULES = 8
_MODULE_FRACTION = 0.15
_MODULE_LOADING = (0.5, 1.0)
# Module activations are soft-thresholded fingerprint projections: |projection| below this is no response.
_ACTIVATION_THRESHOLD = 1.0
_ACTIVATION_SCALE = 1.5
# Cell-type sensitivity of each module is drawn uniformly from this range.
_SENSITIVITY = (0.2, 1.6)
# log10 EC50 (nM) = centre - slope * (logP - 3) + spread * projection, clipped: EC50 between 10 nM and 10 µM.
_LOG10_EC50_CENTRE = 2.5
_LOG10_EC50_LOGP_SLOPE = 0.2
_LOG10_EC50_SPREAD = 0.5
_LOG10_EC50_RANGE = (1.0, 4.0)
# Cells: base profile + low-rank latent structure + gaussian noise, as in ``synthetic_perturbations``.
_BASE_RANGE = (0.5, 3.0)
_N_FACTORS = 3
_LOADING_SD = 0.25
_NOISE_SD = 0.25
_CONTROL = "control"
_VEHICLES = frozenset({"control", "dmso", "vehicle"})


def _parse_smiles(smiles: str) -> Chem.Mol | None:
    """RDKit molecule of ``smiles``, or ``None`` (without RDKit's log message) if it cannot be parsed."""
    if not smiles:
        return None
    with rdBase.BlockLogs():
        return Chem.MolFromSmiles(smiles)


def _parse_drug_table(text: str) -> pd.DataFrame:
    """Drugs with parseable SMILES from CSV text ``name,smiles[,pathway]``: index ``drug``, ``smiles``, ``pathway``.

    Tolerates a header line (a first row with a field called ``smiles``), a byte-order mark, blank lines, blanks
    around fields and rows without a pathway. The vehicle rows (``control``, ``DMSO``, ``vehicle``), rows whose
    SMILES RDKit cannot parse and repeated names (the first one is kept) are dropped. Order as in the text.
    """
    rows = [[field.strip() for field in row] for row in csv.reader(io.StringIO(text.lstrip("\ufeff")))]
    rows = [row for row in rows if len(row) >= 2 and row[0] and row[1]]
    if rows and any(field.lower() == "smiles" for field in rows[0]):
        rows = rows[1:]
    records: dict[str, tuple[str, str]] = {}
    for row in rows:
        name, smiles = row[0], row[1]
        pathway = row[2] if len(row) > 2 else ""
        if name.lower() in _VEHICLES or name in records or _parse_smiles(smiles) is None:
            continue
        records[name] = (smiles, pathway)
    table = pd.DataFrame(
        list(records.values()), index=pd.Index(list(records), name="drug"), columns=["smiles", "pathway"]
    )
    return table


def _read_drug_table() -> pd.DataFrame:
    """The bundled sci-Plex3 drugs (see :func:`_parse_drug_table`)."""
    return _parse_drug_table((resources.files("scdoloris.datasets") / "data" / DRUGS_FILE).read_text(encoding="utf-8"))


def _fingerprints(smiles: Sequence[str]) -> np.ndarray:
    """Morgan fingerprints (radius 2, 1024 bits) of parseable SMILES as a ``(n, 1024)`` float array of 0/1."""
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=_FP_RADIUS, fpSize=_FP_BITS)
    return np.stack([generator.GetFingerprintAsNumPy(_parse_smiles(s)) for s in smiles]).astype(np.float64)


def _tanimoto(fps: np.ndarray) -> np.ndarray:
    """Pairwise Tanimoto similarity of 0/1 fingerprint rows (1 on the diagonal, 0 between two empty ones)."""
    inter = fps @ fps.T
    counts = fps.sum(axis=1)
    union = counts[:, None] + counts[None, :] - inter
    sim = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    np.fill_diagonal(sim, 1.0)
    return sim


def drug_similarity(adata: anndata.AnnData | None = None) -> pd.DataFrame:
    """Tanimoto similarity (Morgan fingerprints, radius 2, 1024 bits) between the drugs of ``adata``.

    Handy for choosing held-out drugs that are structurally related to the training drugs (a Tanimoto of
    0.4 or more is a close analogue; most unrelated pairs of sci-Plex3 drugs are below 0.2).

    Parameters
    ----------
    adata
        Data with ``obs['perturbation']`` (drug name, ``"control"`` for controls) and ``obs['smiles']``, such as
        the output of :func:`synthetic_drug_perturbations` or the sci-Plex3 loader. Controls, cells with an empty
        SMILES and SMILES that RDKit cannot parse are ignored. ``None`` gives all sci-Plex3 drugs that
        :func:`synthetic_drug_perturbations` can draw from.

    Returns
    -------
    pandas.DataFrame
        Symmetric drugs x drugs similarity in [0, 1] with 1 on the diagonal, drugs in order of appearance
        (``None``: in the order of the bundled table).

    Raises
    ------
    KeyError
        If ``obs`` lacks ``perturbation`` or ``smiles``.
    ValueError
        If a drug has more than one SMILES.

    Examples
    --------
    >>> adata = synthetic_drug_perturbations(n_genes=20, n_drugs=5, n_cells_per_condition=2, seed=0)
    >>> sim = drug_similarity(adata)
    >>> sim.shape
    (5, 5)
    >>> bool((sim.to_numpy().diagonal() == 1.0).all())
    True
    """
    if adata is None:
        smiles_of = _read_drug_table()["smiles"]
    else:
        missing = [key for key in ("perturbation", "smiles") if key not in adata.obs]
        if missing:
            raise KeyError(f"`adata.obs` lacks the column(s) {missing}.")
        pairs = pd.DataFrame(
            {
                "drug": adata.obs["perturbation"].astype(str).to_numpy(),
                "smiles": adata.obs["smiles"].astype(str).to_numpy(),
            }
        ).drop_duplicates()
        pairs = pairs[(pairs["drug"] != _CONTROL) & (pairs["smiles"].str.strip() != "")]
        pairs = pairs[[_parse_smiles(s) is not None for s in pairs["smiles"]]]
        repeated = pairs["drug"][pairs["drug"].duplicated()].unique()
        if len(repeated):
            raise ValueError(f"Drugs with more than one SMILES: {sorted(repeated)[:5]}.")
        smiles_of = pairs.set_index("drug")["smiles"]
    names = list(smiles_of.index)
    sim = _tanimoto(_fingerprints(list(smiles_of))) if names else np.zeros((0, 0))
    return pd.DataFrame(sim, index=pd.Index(names, name="drug"), columns=pd.Index(names, name="drug"))


def _hill(dose: float | np.ndarray, ec50: np.ndarray, hill: np.ndarray) -> np.ndarray:
    """Fraction of the maximal effect at ``dose``: ``dose**h / (ec50**h + dose**h)``, exactly 0 at dose 0."""
    dose = np.asarray(dose, dtype=np.float64)
    return np.where(dose > 0, 1.0 / (1.0 + (ec50 / np.where(dose > 0, dose, 1.0)) ** hill), 0.0)


def synthetic_drug_perturbations(
    *,
    n_genes: int = 100,
    n_drugs: int = 40,
    doses: Sequence[float] = (10.0, 100.0, 1000.0, 10000.0),
    n_cells_per_condition: int = 50,
    n_control_cells: int = 200,
    cell_types: Sequence[str] = ("A549", "K562", "MCF7"),
    dropout: float = 0.3,
    seed: int = 0,
    drugs: Sequence[str] | None = None,
    effect_size: float = 1.0,
) -> anndata.AnnData:
    """Simulate log-normalised drug-response data: real sci-Plex3 molecules, synthetic responses.

    The drugs are real sci-Plex3 molecules (the chemCPA SMILES table bundled with scdoloris); their responses
    are synthetic, with a ground truth driven by structure, so that structurally similar drugs respond
    similarly and a model can generalise to unseen drugs and doses:

    - Each molecule's Morgan fingerprint (radius 2, 1024 bits), centred on the mean fingerprint of the bundled
      table and scaled to unit length, is projected by a random gaussian matrix (fixed by ``seed``) onto 8
      response modules.
      The projections are about standard normal, correlated between two drugs as their centred fingerprints
      (hence as their Tanimoto similarity). Soft thresholding, ``1.5 * sign(p) * max(|p| - 1, 0)``, makes the
      *module activations* sparse: most drugs drive a few modules, some none (a spread of weak and strong drugs).
    - A module is a gene program: a signed loading (magnitude 0.5-1) on a random 15 % of the genes. Each cell
      type has its own sensitivity (0.2-1.6) per module. The *maximal effect* of drug ``d`` in cell type ``c``
      is ``effect_size * sum_m activation[d, m] * sensitivity[c, m] * loading[m, :]``.
    - Dose dependence is a Hill curve, ``shift(dose) = effect * dose**h / (EC50**h + dose**h)`` (0 at dose 0).
      ``log10 EC50`` (nM) is ``2.5 - 0.2 * (logP - 3) + 0.5 * q``, clipped to [1, 4] (10 nM to 10 µM), with
      the Crippen logP of the molecule and another fingerprint projection ``q``; the Hill coefficient is
      ``h = 1 + 1 / (1 + exp(-r))`` in (1, 2) with a third projection ``r``.

    A drug's activations, EC50 and Hill coefficient depend only on its structure and ``seed``, not on the
    other drugs chosen nor on ``n_genes``. Each cell is ``base profile of its cell type + low-rank latent
    structure + gaussian noise (sd 0.25) + shift``, clipped at 0; a few bimodal genes are switched off in a
    random half of the cells; finally each value is zeroed with probability ``dropout``, as in
    :func:`~scdoloris.datasets.synthetic_perturbations`.

    Parameters
    ----------
    n_genes
        Number of measured genes (``G000``, ``G001``, ...).
    n_drugs
        Number of drugs drawn at random (with ``seed``) from the bundled sci-Plex3 table (187 drugs with
        parseable SMILES). Ignored when ``drugs`` is given.
    doses
        Doses in nM, each positive; every drug is given at every dose.
    n_cells_per_condition
        Cells per drug, dose and cell type.
    n_control_cells
        Control (vehicle) cells per cell type.
    cell_types
        Cell-type names; each has its own base profile and module sensitivities (by position: the first cell
        type gets the same sensitivities whatever the names).
    dropout
        Probability that any value is set to zero.
    seed
        Seed for :class:`numpy.random.SeedSequence`; the same seed gives identical data.
    drugs
        Names of sci-Plex3 drugs to use instead of a random draw (see :func:`drug_similarity` with no argument
        for the whole table), in this order.
    effect_size
        Multiplier of every drug's maximal effect.

    Returns
    -------
    anndata.AnnData
        ``X`` is a dense non-negative float32 matrix, genes ``G000``, ... ``obs`` has ``perturbation``
        (categorical: drug name or ``"control"``), ``smiles`` (categorical: SMILES, the empty string ``""`` for
        controls), ``dose`` (float, nM, 0 for controls), ``cell_type`` (categorical) and ``condition``
        (categorical: ``f"{drug}_{dose}"`` with the dose as a float, e.g. ``"Dasatinib_100.0"``, or
        ``"control"``). ``uns["synthetic_drugs"]`` holds the ground truth:

        - ``"drugs"``: DataFrame indexed by drug with ``smiles``, ``pathway``, ``logp``, ``ec50`` (nM) and
          ``hill``;
        - ``"module_activations"`` (drugs x modules ``M0``, ...), ``"module_loadings"`` (modules x genes) and
          ``"sensitivity"`` (cell types x modules) DataFrames;
        - ``"effects"``: dict cell type -> DataFrame drugs x genes, the maximal effect (infinite dose);
        - ``"base"``: DataFrame cell types x genes, the base profiles; ``"bimodal_genes"``: their names;
        - ``"doses"``, ``"noise_sd"``, ``"effect_size"`` and ``"seed"``.

        The intended mean shift (before clipping, bimodality and dropout) of ``drug`` at ``dose`` in cell type
        ``ct`` is ``effects[ct].loc[drug] * dose**h / (ec50**h + dose**h)`` with ``ec50, h =
        drugs.loc[drug, ["ec50", "hill"]]``.

    Raises
    ------
    ValueError
        If the arguments are out of range or a drug in ``drugs`` is unknown.

    See Also
    --------
    drug_similarity : Tanimoto similarity between the drugs, to choose structurally related held-out drugs.

    Examples
    --------
    >>> adata = synthetic_drug_perturbations(n_genes=30, n_drugs=4, doses=(100.0, 1000.0), seed=1)
    >>> adata.shape
    (1800, 30)
    >>> truth = adata.uns["synthetic_drugs"]
    >>> drug = truth["drugs"].index[0]
    >>> ec50, h = truth["drugs"].loc[drug, ["ec50", "hill"]]
    >>> shift = truth["effects"]["A549"].loc[drug] * 100.0**h / (ec50**h + 100.0**h)
    >>> shift.shape
    (30,)
    """
    doses_arr = np.asarray(doses, dtype=np.float64).ravel()
    cell_types = [str(ct) for ct in cell_types]
    if n_genes < 2:
        raise ValueError(f"`n_genes` must be at least 2, got {n_genes}.")
    if doses_arr.size == 0 or not np.all(np.isfinite(doses_arr)) or np.any(doses_arr <= 0):
        raise ValueError(f"`doses` must be a non-empty sequence of positive finite numbers, got {doses}.")
    if len(np.unique(doses_arr)) != doses_arr.size:
        raise ValueError(f"`doses` must not repeat, got {doses}.")
    if n_cells_per_condition < 1 or n_control_cells < 1:
        raise ValueError("`n_cells_per_condition` and `n_control_cells` must both be at least 1.")
    if not cell_types or len(set(cell_types)) != len(cell_types) or "" in cell_types:
        raise ValueError(f"`cell_types` must be distinct non-empty names, got {cell_types}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
    if not (np.isfinite(effect_size) and effect_size >= 0):
        raise ValueError(f"`effect_size` must be non-negative, got {effect_size}.")

    table = _read_drug_table()
    truth_ss, pick_ss, cell_ss = np.random.SeedSequence(seed).spawn(3)
    if drugs is None:
        if not 1 <= n_drugs <= len(table):
            raise ValueError(f"`n_drugs` must be between 1 and {len(table)}, got {n_drugs}.")
        picked = np.sort(np.random.default_rng(pick_ss).choice(len(table), size=n_drugs, replace=False))
        names = list(table.index[picked])
    else:
        names = label_list(drugs, "drugs")
        unknown = [d for d in names if d not in table.index]
        if unknown:
            raise ValueError(f"Unknown sci-Plex3 drug(s) {unknown[:5]}; see `drug_similarity()` for the names.")
        if not names or len(set(names)) != len(names):
            raise ValueError("`drugs` must be a non-empty list of distinct names.")
    drug_table = table.loc[names].copy()

    # Ground truth. The per-drug parts are drawn first so that they do not depend on n_genes or n_cell_types.
    truth_rng = np.random.default_rng(truth_ss)
    projection = truth_rng.normal(size=(_FP_BITS, _N_MODULES + 2))
    centred = _fingerprints(list(drug_table["smiles"])) - _fingerprints(list(table["smiles"])).mean(axis=0)
    proj = centred @ projection / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    raw, q, r = proj[:, :_N_MODULES], proj[:, _N_MODULES], proj[:, _N_MODULES + 1]
    activations = _ACTIVATION_SCALE * np.sign(raw) * np.maximum(np.abs(raw) - _ACTIVATION_THRESHOLD, 0.0)
    logp = np.array([Crippen.MolLogP(_parse_smiles(s)) for s in drug_table["smiles"]])
    log10_ec50 = _LOG10_EC50_CENTRE - _LOG10_EC50_LOGP_SLOPE * (logp - 3.0) + _LOG10_EC50_SPREAD * q
    ec50 = 10.0 ** np.clip(log10_ec50, *_LOG10_EC50_RANGE)
    hill = 1.0 + 1.0 / (1.0 + np.exp(-r))

    loadings = np.zeros((_N_MODULES, n_genes))
    n_module_genes = max(2, round(_MODULE_FRACTION * n_genes))
    for m in range(_N_MODULES):
        genes = truth_rng.choice(n_genes, size=min(n_module_genes, n_genes), replace=False)
        signs = truth_rng.choice([-1.0, 1.0], size=genes.size)
        loadings[m, genes] = signs * truth_rng.uniform(*_MODULE_LOADING, size=genes.size)
    sensitivity = truth_rng.uniform(*_SENSITIVITY, size=(len(cell_types), _N_MODULES))
    effects = effect_size * np.einsum("dm,cm,mg->cdg", activations, sensitivity, loadings)

    gene_names = [f"G{i:03d}" for i in range(n_genes)]
    module_names = [f"M{m}" for m in range(_N_MODULES)]
    drug_table["logp"] = logp
    drug_table["ec50"] = ec50
    drug_table["hill"] = hill

    # Cells. Latent loadings and bimodal genes are shared by cell types; base profiles are not.
    rng = np.random.default_rng(cell_ss)
    latent_loadings = rng.normal(0.0, _LOADING_SD, size=(_N_FACTORS, n_genes))
    n_bimodal = max(1, n_genes // 10)
    bimodal = np.sort(rng.choice(n_genes, size=n_bimodal, replace=False))
    base = rng.uniform(*_BASE_RANGE, size=(len(cell_types), n_genes))
    fractions = _hill(doses_arr[None, :], ec50[:, None], hill[:, None])  # drugs x doses

    blocks: list[np.ndarray] = []
    obs_drug: list[str] = []
    obs_dose: list[float] = []
    obs_ct: list[str] = []
    for c, ct in enumerate(cell_types):
        conditions = [(_CONTROL, 0.0, np.zeros(n_genes), n_control_cells)]
        conditions += [
            (drug, float(dose), fractions[d, k] * effects[c, d], n_cells_per_condition)
            for d, drug in enumerate(names)
            for k, dose in enumerate(doses_arr)
        ]
        for drug, dose, shift, n in conditions:
            latent = rng.normal(size=(n, _N_FACTORS)) @ latent_loadings
            blocks.append(base[c] + latent + rng.normal(0.0, _NOISE_SD, size=(n, n_genes)) + shift)
            obs_drug += [drug] * n
            obs_dose += [dose] * n
            obs_ct += [ct] * n
    x = np.clip(np.concatenate(blocks, axis=0), 0.0, None)
    off = rng.random((x.shape[0], n_bimodal)) < 0.5
    x[:, bimodal] = np.where(off, 0.0, x[:, bimodal])
    x[rng.random(x.shape) < dropout] = 0.0

    smiles_of = {_CONTROL: "", **drug_table["smiles"].to_dict()}
    condition_names = [_CONTROL] + [f"{drug}_{float(dose)}" for drug in names for dose in doses_arr]
    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(obs_drug, categories=[_CONTROL, *names]),
            "smiles": pd.Categorical(
                [smiles_of[d] for d in obs_drug], categories=list(dict.fromkeys(smiles_of.values()))
            ),
            "dose": np.asarray(obs_dose, dtype=np.float64),
            "cell_type": pd.Categorical(obs_ct, categories=cell_types),
            "condition": pd.Categorical(
                [_CONTROL if d == _CONTROL else f"{d}_{dose}" for d, dose in zip(obs_drug, obs_dose, strict=True)],
                categories=condition_names,
            ),
        },
        index=[f"cell{i:06d}" for i in range(x.shape[0])],
    )
    adata = anndata.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(gene_names)))
    adata.uns["synthetic_drugs"] = {
        "drugs": drug_table,
        "module_activations": pd.DataFrame(activations, index=drug_table.index, columns=module_names),
        "module_loadings": pd.DataFrame(loadings, index=module_names, columns=gene_names),
        "sensitivity": pd.DataFrame(sensitivity, index=cell_types, columns=module_names),
        "effects": {
            ct: pd.DataFrame(effects[c], index=drug_table.index, columns=gene_names) for c, ct in enumerate(cell_types)
        },
        "base": pd.DataFrame(base, index=cell_types, columns=gene_names),
        "bimodal_genes": [gene_names[i] for i in bimodal],
        "doses": doses_arr.copy(),
        "noise_sd": _NOISE_SD,
        "effect_size": float(effect_size),
        "seed": seed,
    }
    return adata
