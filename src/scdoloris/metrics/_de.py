"""Differentially expressed (DE) genes of a condition vs control, for gene-set restricted metrics."""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..data import expression_matrix, to_dense
from ._inputs import Matrix, MatrixLike, as_matrix, check_genes

# Upper bound on the float64 entries of one densified block of genes in the Wilcoxon test (~32 MB);
# the test's ranking makes a few temporaries of that size.
_BLOCK_ENTRIES = 4_000_000


def _obs_column(adata: AnnData, key: str, name: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise KeyError(f"Column {key!r} not found in `{name}.obs` (columns: {list(adata.obs.columns)}).")
    return adata.obs[key]


def _check_n(n: int, n_genes: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}.")
    if n > n_genes:
        raise ValueError(f"Cannot select {n} DE genes: the data have only {n_genes} genes.")
    return int(n)


@contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Restore torch's thread count after the block.

    scanpy's Wilcoxon test (numba) resets the OpenMP thread count torch shares, to one per core: a
    notebook that chose ``torch.set_num_threads(1)`` would silently get its training slowed or changed.
    Without torch loaded there is nothing to keep (and this package of metrics does not load it).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rank_genes(
    group: Matrix,
    reference: Matrix,
    var_names: pd.Index,
    *,
    layer_log1p: Mapping | None = None,
    rankby_abs: bool = True,
) -> list:
    """All genes ranked by the Wilcoxon score of ``group`` vs ``reference`` (scanpy), best first.

    Works on a new, minimal AnnData that holds only the two sets of cells, so the caller's data are
    never modified. Gene names are handled by position, so duplicated names are fine.
    """
    import scanpy as sc

    if group.shape[0] < 2 or reference.shape[0] < 2:
        raise ValueError(
            "The Wilcoxon test needs at least 2 cells in both the condition and the reference, got "
            f"{group.shape[0]} and {reference.shape[0]}."
        )
    if sp.issparse(group) or sp.issparse(reference):
        x = sp.vstack([sp.csr_matrix(group), sp.csr_matrix(reference)], format="csr")
    else:
        x = np.vstack([np.asarray(group), np.asarray(reference)])
    labels = pd.Categorical(
        ["group"] * group.shape[0] + ["reference"] * reference.shape[0], categories=["group", "reference"]
    )
    obs = pd.DataFrame({"_de_group": labels}, index=pd.RangeIndex(x.shape[0]).astype(str))
    var = pd.DataFrame(index=pd.RangeIndex(x.shape[1]).astype(str))
    tmp = AnnData(X=x, obs=obs, var=var)
    if isinstance(layer_log1p, Mapping):
        # Only used by scanpy for the (unused here) log fold changes; avoids a spurious warning.
        tmp.uns["log1p"] = dict(layer_log1p)
    with _torch_threads_kept():
        sc.tl.rank_genes_groups(
            tmp,
            "_de_group",
            groups=["group"],
            reference="reference",
            method="wilcoxon",
            n_genes=x.shape[1],
            rankby_abs=rankby_abs,
            use_raw=False,
            pts=False,
        )
    positions = tmp.uns["rank_genes_groups"]["names"]["group"].astype(int)
    return list(var_names[positions])


def de_genes(
    adata: AnnData,
    groupby: str,
    group: Hashable,
    reference: Hashable,
    *,
    n: int = 20,
    cell_type_key: str | None = None,
    cell_type: Hashable | None = None,
    layer: str | None = None,
    rankby_abs: bool = True,
) -> list:
    """Top-``n`` differentially expressed genes of a condition vs control.

    Genes are ranked with :func:`scanpy.tl.rank_genes_groups` (``method="wilcoxon"``) comparing
    the cells with ``adata.obs[groupby] == group`` to those with ``adata.obs[groupby] ==
    reference``, restricted to one cell type when ``cell_type_key`` is given. The test runs on a
    new AnnData holding only those cells: ``adata`` (including ``.uns``) is never modified.

    All genes are ranked once and the first ``n`` returned, so ``de_genes(..., n=20)`` is always the
    prefix of ``de_genes(..., n=40)``. Expression should be log-normalised (log1p), as for any
    Wilcoxon DE test in scanpy.

    Parameters
    ----------
    adata
        Annotated data with real cells of the condition and of the control.
    groupby
        Column of ``adata.obs`` with the condition labels (e.g. ``"perturbation"``).
    group
        The condition whose DE genes are wanted.
    reference
        The control label in ``adata.obs[groupby]`` (e.g. ``"control"``).
    n
        Number of genes to return (20 and 40 are the usual choices).
    cell_type_key
        Column of ``adata.obs`` with cell types. If given, both the condition and the control cells
        are restricted to ``cell_type``.
    cell_type
        The cell type to use with ``cell_type_key``. If ``None``, the condition's cells must all
        have one cell type, which is used.
    layer
        Layer of ``adata`` to use instead of ``.X``.
    rankby_abs
        Rank genes by the absolute value of the Wilcoxon score (default), i.e. up- and
        down-regulated genes together, as in GEARS and CPA. If ``False``, rank by the signed score
        (scanpy's default), i.e. up-regulated genes first.

    Returns
    -------
    list
        ``n`` gene names (from ``adata.var_names``), most differentially expressed first.

    Raises
    ------
    KeyError
        If a column or layer is missing.
    ValueError
        If ``group`` equals ``reference``, there are fewer than 2 cells of the condition or of the
        control (in the cell type), the cell type is ambiguous, or ``n`` is not in
        ``1..adata.n_vars``.

    Examples
    --------
    >>> import anndata as ad
    >>> import numpy as np
    >>> import pandas as pd
    >>> import scdoloris as sd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.poisson(1.0, size=(60, 50)).astype(float)
    >>> x[:30, [3, 7]] += 5.0  # genes g3 and g7 go up in the perturbed cells
    >>> adata = ad.AnnData(
    ...     np.log1p(x),
    ...     obs=pd.DataFrame({"perturbation": ["KO"] * 30 + ["control"] * 30}, index=[f"c{i}" for i in range(60)]),
    ...     var=pd.DataFrame(index=[f"g{j}" for j in range(50)]),
    ... )
    >>> sorted(sd.metrics.de_genes(adata, "perturbation", "KO", "control", n=2))
    ['g3', 'g7']
    """
    if group == reference:
        raise ValueError(f"`group` and `reference` are the same label ({group!r}).")
    n = _check_n(n, adata.n_vars)
    labels = _obs_column(adata, groupby, "adata")
    in_group = labels.isin([group]).to_numpy()
    in_reference = labels.isin([reference]).to_numpy()
    if cell_type_key is not None:
        types = _obs_column(adata, cell_type_key, "adata")
        if cell_type is None:
            present = pd.unique(types[in_group])
            if len(present) != 1:
                raise ValueError(
                    f"Cells of {group!r} have {len(present)} cell types ({list(present)}); pass `cell_type`."
                )
            cell_type = present[0]
        in_type = types.isin([cell_type]).to_numpy()
        in_group &= in_type
        in_reference &= in_type
    where = "" if cell_type_key is None else f" of cell type {cell_type!r}"
    if not in_group.any():
        raise ValueError(f"No cells with {groupby} == {group!r}{where}.")
    if not in_reference.any():
        raise ValueError(f"No cells with {groupby} == {reference!r}{where}.")
    x = expression_matrix(adata, layer)
    ranked = rank_genes(
        x[np.flatnonzero(in_group)],
        x[np.flatnonzero(in_reference)],
        adata.var_names,
        layer_log1p=adata.uns.get("log1p") if layer is None else None,
        rankby_abs=rankby_abs,
    )
    return ranked[:n]


def differential_expression(
    predicted: AnnData,
    real: AnnData | None = None,
    *,
    groupby: str = "perturbation",
    reference: str = "control",
    method: str = "wilcoxon",
) -> pd.DataFrame:
    """Differential expression of predicted cells, in scanpy's format (:func:`scanpy.get.rank_genes_groups_df`).

    Without ``real``: each predicted perturbation against the ``reference`` cells of ``predicted``
    (predict with ``include_sources=True`` to have the source controls there). With ``real``: each
    predicted perturbation against the real cells of the same label, i.e. which genes the
    prediction gets wrong. Runs :func:`scanpy.tl.rank_genes_groups` on copies: the inputs are not
    modified.

    Parameters
    ----------
    predicted
        Predicted cells (log1p), e.g. from :meth:`scdoloris.Doloris.predict_perturbation`.
    real
        Real cells with the same genes, labelled in ``real.obs[groupby]``.
    groupby
        Column with the perturbation labels.
    reference
        Label of the control cells (without ``real``).
    method
        Test of :func:`scanpy.tl.rank_genes_groups`.

    Returns
    -------
    pandas.DataFrame
        Columns ``group`` (the perturbation), ``names``, ``scores``, ``logfoldchanges``, ``pvals``,
        ``pvals_adj``; every gene of every group.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=0)
    >>> pred = sd.baselines.MeanShift().fit(adata).predict(["G001"], n_cells=30, include_sources=True)
    >>> table = sd.metrics.differential_expression(pred)
    >>> list(table.columns)[:3], len(table)
    (['group', 'names', 'scores'], 20)
    """
    import scanpy as sc

    labels = _obs_column(predicted, groupby, "predicted").astype(str)
    with _torch_threads_kept():
        if real is None:
            groups = [g for g in pd.unique(labels) if g != reference]
            if reference not in set(labels) or not groups:
                raise ValueError(
                    f"predicted.obs[{groupby!r}] needs {reference!r} cells and predicted ones; predict with "
                    "include_sources=True, or pass the real cells as real= to compare with them."
                )
            obs = pd.DataFrame({groupby: labels.to_numpy()}, index=predicted.obs_names)
            data = AnnData(X=expression_matrix(predicted, None), obs=obs)
            data.obs[groupby] = pd.Categorical(data.obs[groupby])
            data.var_names = predicted.var_names
            sc.tl.rank_genes_groups(data, groupby, groups=groups, reference=reference, method=method, use_raw=False)
            table = sc.get.rank_genes_groups_df(data, group=groups)
            if "group" not in table:  # scanpy leaves it out for a single group
                table.insert(0, "group", groups[0])
            return table.reset_index(drop=True)
        if not real.var_names.equals(predicted.var_names):
            raise ValueError("real and predicted must have the same genes (var_names) in the same order.")
        real_labels = _obs_column(real, groupby, "real").astype(str)
        tables = []
        for group in [g for g in pd.unique(labels) if g in set(real_labels) and g != reference]:
            mine, theirs = (labels == group).to_numpy(), (real_labels == group).to_numpy()
            stack = sp.vstack if sp.issparse(real.X) and sp.issparse(predicted.X) else np.vstack
            sets = pd.Categorical(["predicted"] * int(mine.sum()) + ["real"] * int(theirs.sum()))
            obs = pd.DataFrame({"set": sets}, index=pd.RangeIndex(len(sets)).astype(str))
            both = AnnData(X=stack([predicted.X[mine], real.X[theirs]]), obs=obs)
            both.var_names = predicted.var_names
            sc.tl.rank_genes_groups(both, "set", groups=["predicted"], reference="real", method=method, use_raw=False)
            tables.append(sc.get.rank_genes_groups_df(both, group="predicted").assign(group=group))
        if not tables:
            raise ValueError(f"No label of predicted.obs[{groupby!r}] is also in real.obs[{groupby!r}].")
        table = pd.concat(tables, ignore_index=True)
        return table[["group", *[c for c in table.columns if c != "group"]]]


def wilcoxon_adjusted_pvalues(group: Matrix, reference: Matrix) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values of a two-sided Wilcoxon rank-sum test of every gene, group vs reference.

    The normal approximation with tie correction and without continuity correction
    (:func:`scipy.stats.mannwhitneyu`, ``method="asymptotic"``, ``use_continuity=False``, vectorised
    over genes in blocks), which is :func:`scanpy.tl.rank_genes_groups` with ``method="wilcoxon",
    tie_correct=True``. Genes that are constant over both sets (no test possible) get p = 1, as in
    scanpy; adjustment by :func:`scipy.stats.false_discovery_control` (``method="bh"``). ``group``
    and ``reference`` are cells x genes, dense or sparse (CSC slices fastest), same genes.
    """
    from scipy.stats import false_discovery_control, mannwhitneyu

    n_cells = group.shape[0] + reference.shape[0]
    n_genes = group.shape[1]
    genes_per_block = max(1, _BLOCK_ENTRIES // (4 * n_cells))
    pvals = np.ones(n_genes)
    for start in range(0, n_genes, genes_per_block):
        cols = slice(start, min(start + genes_per_block, n_genes))
        a = to_dense(group[:, cols])
        b = to_dense(reference[:, cols])
        with np.errstate(divide="ignore", invalid="ignore"):  # constant genes: 0 / 0
            pvals[cols] = mannwhitneyu(a, b, axis=0, method="asymptotic", use_continuity=False).pvalue
    pvals[np.isnan(pvals)] = 1.0
    return false_discovery_control(pvals, method="bh")


def de_agreement(pred: MatrixLike, real: MatrixLike, control: MatrixLike, *, alpha: float = 0.05) -> dict[str, float]:
    r"""Agreement of the genes called differentially expressed (DE) in the predicted and the real cells.

    Each of ``pred`` and ``real`` is tested against ``control``, gene by gene, with a two-sided
    Wilcoxon rank-sum test (normal approximation with tie correction, no continuity correction:
    :func:`scanpy.tl.rank_genes_groups` with ``method="wilcoxon", tie_correct=True``; scanpy's
    default, ``tie_correct=False``, overestimates the variance of genes with many zeros and calls a
    subset of these genes). p-values are adjusted over genes with Benjamini-Hochberg, and a gene is
    DE when its adjusted p-value is below ``alpha``. With :math:`P` and :math:`R` the DE sets of the
    prediction and of the real cells,

    .. math::

        \mathrm{de\_overlap} = \frac{|P \cap R|}{|R|},

    the fraction of the real DE genes the prediction also calls DE (a recall; the direction of
    the change is not compared). Read it with ``n_de_predicted``: calling every gene DE gives an
    overlap of 1. A prediction made of control cells plus one small shift vector is called DE on
    almost every gene, because the shift separates its zeros from the control's tied zeros.

    Both tests depend on the numbers of cells (more cells, more power): compare methods with the
    same numbers of predicted cells. Cost: two rank tests over ``(cells, genes)``, about a
    second for 1000 + 1000 cells and 2000 genes.

    Parameters
    ----------
    pred
        Predicted cells (log1p), shape ``(n, n_genes)``: a dense array, a scipy sparse
        matrix/array, or an :class:`~anndata.AnnData` (its ``.X`` is used).
    real
        Real perturbed cells, shape ``(m, n_genes)``, same kinds as ``pred``.
    control
        Control cells, shape ``(k, n_genes)``, same kinds as ``pred``.
    alpha
        Threshold on the Benjamini-Hochberg adjusted p-value (false discovery rate).

    Returns
    -------
    dict
        ``{"n_de_predicted": int, "n_de_real": int, "de_overlap": float}``; ``de_overlap`` is
        ``nan`` when the real cells have no DE gene.

    Raises
    ------
    ValueError
        If an input is not 2-D, has fewer than 2 cells, the gene counts differ, or ``alpha`` is not
        in ``(0, 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> rng = np.random.default_rng(0)
    >>> control = rng.normal(size=(100, 5))
    >>> real = rng.normal(size=(100, 5)) + np.array([2.0, 2.0, 0.0, 0.0, 0.0])  # genes 0 and 1 change
    >>> pred = rng.normal(size=(100, 5)) + np.array([2.0, 0.0, 0.0, 0.0, 0.0])  # only gene 0
    >>> sd.metrics.de_agreement(pred, real, control)
    {'n_de_predicted': 1, 'n_de_real': 2, 'de_overlap': 0.5}
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
    mats = {
        "pred": as_matrix(pred, "pred", sparse_format="csc"),
        "real": as_matrix(real, "real", sparse_format="csc"),
        "control": as_matrix(control, "control", sparse_format="csc"),
    }
    check_genes(mats)
    for name, mat in mats.items():
        if mat.shape[0] < 2:
            raise ValueError(f"The Wilcoxon test needs at least 2 cells, `{name}` has {mat.shape[0]}.")
    de_pred = wilcoxon_adjusted_pvalues(mats["pred"], mats["control"]) < alpha
    de_real = wilcoxon_adjusted_pvalues(mats["real"], mats["control"]) < alpha
    n_real = int(de_real.sum())
    overlap = float((de_pred & de_real).sum() / n_real) if n_real else float("nan")
    return {"n_de_predicted": int(de_pred.sum()), "n_de_real": n_real, "de_overlap": overlap}
