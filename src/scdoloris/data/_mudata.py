"""MuData input: perturbation labels from a guide-capture modality, and the expression modality Doloris trains on."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

logger = logging.getLogger(__name__)

DEFAULT_MODALITIES = {"rna": "rna", "guides": None}


def assign_guides(
    guides: AnnData,
    threshold: float = 1,
    gene_key: str | None = None,
    control_value: str = "control",
    layer: str | None = None,
    control_genes: Sequence[str] = (),
) -> pd.Series:
    """Perturbation label of each cell from its guide counts.

    A guide is assigned to a cell when its count is at least ``threshold``. Each assigned guide
    stands for its target gene (``guides.var[gene_key]``, or the guide's own name); a cell's label
    joins its distinct target genes with ``"+"`` in alphabetical order, so ``"A+B"`` and
    ``"B+A"`` are one combination. Cells without an assigned guide, and guides whose target is in
    ``control_genes`` (non-targeting guides), give ``control_value``.

    Parameters
    ----------
    guides
        Cells x guides AnnData of guide counts (UMIs, or 0/1 assignments).
    threshold
        Minimum count for a guide to count as present in a cell.
    gene_key
        Column of ``guides.var`` with each guide's target gene; ``None`` uses the guide names.
    control_value
        Label of cells without a targeting guide.
    layer
        Layer of ``guides`` with the counts; ``X`` by default.
    control_genes
        Target names of non-targeting guides (e.g. ``["non-targeting", "safe-targeting"]``); they
        are ignored, as is a guide whose target is ``control_value``.

    Returns
    -------
    Labels indexed by ``guides.obs_names``.

    Examples
    --------
    >>> import anndata as ad
    >>> import numpy as np
    >>> import pandas as pd
    >>> guides = ad.AnnData(
    ...     np.array([[0, 0, 0], [3, 0, 0], [2, 0, 5], [1, 1, 0]], dtype=np.float32),
    ...     var=pd.DataFrame({"gene": ["KLF1", "KLF1", "CBL"]}, index=["KLF1_g1", "KLF1_g2", "CBL_g1"]),
    ... )
    >>> list(assign_guides(guides, threshold=1, gene_key="gene"))
    ['control', 'KLF1', 'CBL+KLF1', 'KLF1']
    """
    counts = guides.X if layer is None else guides.layers[layer]
    if threshold <= 0:
        raise ValueError(f"guide threshold must be positive (a count of 0 means no guide), got {threshold}.")
    if gene_key is None:
        targets = np.asarray(guides.var_names, dtype=object)
    else:
        if gene_key not in guides.var:
            raise KeyError(
                f"guide_gene_key={gene_key!r} is not a column of the guide modality's var "
                f"(columns: {list(guides.var.columns)}); pass guide_gene_key=None to use the guide names."
            )
        targets = guides.var[gene_key].to_numpy(dtype=object)
        if pd.isna(targets).any():
            raise ValueError(f"guides.var[{gene_key!r}] has missing target genes; fill them in or drop those guides.")
    targets = np.array([str(t) for t in targets], dtype=object)
    ignored = set(control_genes) | {control_value}
    assigned = counts >= threshold
    assigned = sparse.csr_matrix(assigned) if sparse.issparse(assigned) else sparse.csr_matrix(np.asarray(assigned))
    assigned.eliminate_zeros()
    labels = []
    for i in range(assigned.shape[0]):
        columns = assigned.indices[assigned.indptr[i] : assigned.indptr[i + 1]]
        genes = sorted({targets[j] for j in columns} - ignored)
        labels.append("+".join(genes) if genes else control_value)
    return pd.Series(labels, index=guides.obs_names.copy(), name="perturbation", dtype=object)


def _modality(mdata, modalities: Mapping[str, str | None], role: str) -> AnnData | None:
    name = modalities.get(role)
    if name is None:
        return None
    if name not in mdata.mod:
        raise KeyError(f"modalities[{role!r}]={name!r} is not a modality of the MuData (has {list(mdata.mod)}).")
    return mdata.mod[name]


def _aligned_column(source: pd.Series, obs_names: pd.Index, what: str) -> np.ndarray:
    """``source`` re-indexed to ``obs_names``; every cell must be present."""
    missing = obs_names.difference(source.index)
    if len(missing):
        raise ValueError(
            f"{len(missing)} cells of the expression modality have no {what} (e.g. {list(missing[:3])}); keep only "
            "cells present in both modalities, e.g. with muon.pp.intersect_obs(mdata)."
        )
    return source.reindex(obs_names).to_numpy()


def prepare_mudata(
    mdata,
    perturbation_key: str,
    control_value: str | Sequence[str],
    other_keys: Sequence[str | None] = (),
    modalities: Mapping[str, str | None] | None = None,
    guide_threshold: float = 1,
    guide_gene_key: str | None = None,
    guide_layer: str | None = None,
    control_guides: Sequence[str] = (),
) -> AnnData:
    """The expression modality of ``mdata``, with every key Doloris reads present in its ``obs``.

    Columns come, in this order of preference, from the expression modality's ``obs``, from
    ``mdata.obs`` (matched by cell name, also under the ``"<modality>:<key>"`` names that
    ``mdata.update()`` writes), or, for ``perturbation_key`` only, from the guide modality through
    :func:`assign_guides`. Derived columns are written into the expression modality's ``obs`` (and
    the perturbation labels also into ``mdata.obs``); its expression is never touched.

    Parameters
    ----------
    mdata
        A :class:`mudata.MuData`.
    perturbation_key
        Column of perturbation labels (read, or written from guides).
    control_value
        Label(s) of unperturbed cells; the first labels cells without a guide.
    other_keys
        Further ``obs`` columns needed (cell type, dose, SMILES); ``None`` entries are skipped.
    modalities
        ``{"rna": name of the expression modality, "guides": name of the guide modality or None}``.
    guide_threshold, guide_gene_key, guide_layer, control_guides
        See :func:`assign_guides` (``threshold``, ``gene_key``, ``layer``, ``control_genes``).

    Returns
    -------
    The expression modality (the same object as in ``mdata.mod``).
    """
    modalities = {**DEFAULT_MODALITIES, **(modalities or {})}
    unknown_roles = set(modalities) - set(DEFAULT_MODALITIES)
    if unknown_roles:
        raise ValueError(f"modalities has unknown entries {sorted(unknown_roles)}; use the keys 'rna' and 'guides'.")
    rna = _modality(mdata, modalities, "rna")
    if rna is None:
        raise ValueError('modalities["rna"] must name the expression modality.')
    guides = _modality(mdata, modalities, "guides")
    controls = [control_value] if isinstance(control_value, str) else list(control_value)

    def from_global(key: str) -> pd.Series | None:
        for column in (key, f"{modalities['rna']}:{key}"):
            if column in mdata.obs:
                return mdata.obs[column]
        return None

    if guides is not None and perturbation_key in rna.obs:
        warnings.warn(
            f"The expression modality already has obs[{perturbation_key!r}]; the guide modality is not used. "
            "Drop that column or pass another perturbation_key to assign labels from guides.",
            UserWarning,
            stacklevel=3,
        )
    for key in [perturbation_key, *[k for k in other_keys if k is not None]]:
        if key in rna.obs:
            continue
        column = from_global(key)
        if column is not None:
            values = _aligned_column(column, rna.obs_names, f"value of mdata.obs[{key!r}]")
            rna.obs[key] = pd.Categorical(values) if isinstance(column.dtype, pd.CategoricalDtype) else values
            continue
        if key == perturbation_key and guides is not None:
            labels = assign_guides(guides, guide_threshold, guide_gene_key, controls[0], guide_layer, control_guides)
            values = _aligned_column(labels, rna.obs_names, "guide counts")
            rna.obs[key] = pd.Categorical(values)
            mdata.obs[key] = pd.Categorical(labels.reindex(mdata.obs_names).to_numpy())
            n_multi = int(pd.Series(values).str.contains("+", regex=False).sum())
            logger.info(
                "Assigned guides (count >= %s): %d control cells, %d perturbations, %d cells with several genes.",
                guide_threshold,
                int(np.isin(values, controls).sum()),
                len(set(values) - set(controls)),
                n_multi,
            )
            continue
        where = "the expression modality's obs or mdata.obs"
        if key == perturbation_key:
            where += ', and no guide modality was given (modalities={"guides": ...})'
        raise KeyError(f"{key!r} is not a column of {where}.")
    return rna


def registered_modality(mdata, is_registered) -> AnnData:
    """The one modality of ``mdata`` for which ``is_registered(modality)`` holds (set up by ``setup_mudata``)."""
    found = [name for name, mod in mdata.mod.items() if is_registered(mod)]
    if not found:
        raise ValueError("Set up this MuData with Doloris.setup_mudata(mdata, ...) first.")
    if len(found) > 1:
        raise ValueError(f"Several modalities {found} are set up for Doloris; pass one, e.g. mdata.mod[{found[0]!r}].")
    return mdata.mod[found[0]]
