"""A per-condition evaluation table of predicted vs real cells (``sd.metrics.evaluate``)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from ..data import expression_matrix
from ._de import _obs_column, rank_genes
from ._distances import e_distance, emd, gene_positions, mean_rmse, pearson_delta
from ._inputs import Matrix

METRICS: tuple[str, ...] = ("e_distance", "emd", "mean_rmse", "pearson_delta")
COLUMNS: list[str] = ["perturbation", "cell_type", "gene_set", "metric", "value"]


def _group_rows(adata: AnnData, keys: list[str], name: str) -> dict:
    """Row positions of each group of ``adata.obs[keys]``, in order of first appearance."""
    for key in keys:
        _obs_column(adata, key, name)
    by = keys[0] if len(keys) == 1 else keys
    return adata.obs.groupby(by, observed=True, sort=False).indices


def _take(x: Matrix, rows: np.ndarray | None, cols: np.ndarray | None) -> Matrix:
    """``x[rows][:, cols]``; ``None`` keeps all rows or columns (without a copy)."""
    sub = x if rows is None else x[rows]
    return sub if cols is None else sub[:, cols]


def _check_options(n_de: int | Sequence[int], metrics: str | Sequence[str]) -> tuple[list[int], list[str]]:
    n_list = [n_de] if isinstance(n_de, int | np.integer) else list(n_de)
    for n in n_list:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"`n_de` must hold positive integers, got {n!r}.")
    if len(set(n_list)) != len(n_list):
        raise ValueError(f"`n_de` has duplicates: {n_list}.")
    metric_list = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metric_list if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {list(METRICS)}.")
    if not metric_list or len(set(metric_list)) != len(metric_list):
        raise ValueError(f"`metrics` must be a non-empty list without duplicates, got {metric_list}.")
    return [int(n) for n in n_list], metric_list


def evaluate(
    pred: AnnData,
    real: AnnData,
    control: AnnData,
    *,
    perturbation_key: str = "perturbation",
    cell_type_key: str | None = None,
    de_genes: Mapping[Hashable, Sequence] | None = None,
    n_de: int | Sequence[int] = (20, 40),
    metrics: str | Sequence[str] = METRICS,
    layer: str | None = None,
    sqrt: bool = False,
    rankby_abs: bool = True,
) -> pd.DataFrame:
    """Evaluate predicted cells against real cells, per condition, over all genes and DE genes.

    For every condition (value of ``pred.obs[perturbation_key]``, and cell type when
    ``cell_type_key`` is given) the predicted cells are compared with the real cells of the same
    condition (and cell type) using

    - ``"e_distance"``: :func:`e_distance` (paper Eq. 20; its square root if ``sqrt=True``),
    - ``"emd"``: :func:`emd` (paper Eq. 21),
    - ``"mean_rmse"``: :func:`mean_rmse`,
    - ``"pearson_delta"``: :func:`pearson_delta`, with the control cells (of the same cell type),

    on all genes (gene set ``"all"``) and on the top-``n`` DE genes of the condition
    (gene sets ``"DE20"``, ``"DE40"``, ... for ``n`` in ``n_de``). Unless given in ``de_genes``,
    the DE genes are computed from the *real* cells vs the control cells (of the same cell type)
    as in :func:`de_genes` (scanpy Wilcoxon test). No input is modified.

    Parameters
    ----------
    pred
        Predicted cells, with the condition in ``.obs[perturbation_key]``.
    real
        Real cells of (at least) every predicted condition, with ``.obs[perturbation_key]``. Other
        conditions are ignored. Must have the same genes as ``pred`` (they are aligned by name).
    control
        Control (unperturbed) cells, same genes. With ``cell_type_key``, they need
        ``.obs[cell_type_key]`` and are matched by cell type; its ``perturbation_key`` is not used.
    perturbation_key
        Column of ``pred.obs`` and ``real.obs`` with the condition labels.
    cell_type_key
        Column of ``.obs`` (all three objects) with cell types. If given, each (condition, cell
        type) of ``pred`` is evaluated on its own.
    de_genes
        Precomputed DE genes, ranked best first, as ``{condition: genes}`` or, with
        ``cell_type_key``, ``{(condition, cell_type): genes}`` (plain condition keys are accepted
        too). Each list needs at least ``max(n_de)`` genes; gene set ``"DE{n}"`` uses its first
        ``n``. If ``None`` (default), they are computed.
    n_de
        Sizes of the DE gene sets. Empty to evaluate on all genes only.
    metrics
        Names of the metrics to compute, any of ``"e_distance"``, ``"emd"``, ``"mean_rmse"``,
        ``"pearson_delta"``.
    layer
        Layer to use instead of ``.X`` (in all three objects).
    sqrt
        Report the square root of the E-distance (as the reference code does) instead of Eq. 20.
    rankby_abs
        Passed to :func:`de_genes` when DE genes are computed.

    Returns
    -------
    pandas.DataFrame
        Tidy table with one row per (condition, cell type, gene set, metric) and columns
        ``perturbation``, ``cell_type`` (``None`` without ``cell_type_key``), ``gene_set``
        (``"all"``, ``"DE20"``, ``"DE40"``, ...), ``metric`` and ``value``. Conditions are in
        order of first appearance in ``pred``.

    Raises
    ------
    KeyError
        If an ``.obs`` column or a layer is missing, or ``de_genes`` lacks a condition.
    ValueError
        If genes differ, a predicted condition (cell type) has no real or control cells, a DE
        gene list is too short or names unknown genes, or an option is invalid.

    Examples
    --------
    >>> import anndata as ad
    >>> import numpy as np
    >>> import pandas as pd
    >>> import scdoloris as sd
    >>> rng = np.random.default_rng(0)
    >>> var = pd.DataFrame(index=[f"g{j}" for j in range(50)])
    >>> def cells(n, label, shift=0.0):
    ...     x = np.log1p(rng.poisson(1.0, size=(n, 50)) + shift)
    ...     obs = pd.DataFrame({"perturbation": [label] * n}, index=[f"{label}{i}" for i in range(n)])
    ...     return ad.AnnData(x, obs=obs, var=var)
    >>> control = cells(40, "control")
    >>> real = ad.concat([cells(30, "A", shift=2.0), cells(30, "B")])
    >>> pred = ad.concat([cells(20, "A", shift=1.5), cells(20, "B")])
    >>> table = sd.metrics.evaluate(pred, real, control, n_de=(20,))
    >>> table.shape
    (16, 5)
    >>> wide = table.pivot_table(index=["perturbation", "gene_set"], columns="metric", values="value")
    >>> summary = table.groupby(["gene_set", "metric"])["value"].agg(["mean", "std"])
    """
    for obj, name in ((pred, "pred"), (real, "real"), (control, "control")):
        if not isinstance(obj, AnnData):
            raise TypeError(f"`{name}` must be an AnnData, got {type(obj).__name__}.")
    n_list, metric_list = _check_options(n_de, metrics)
    var_names = pred.var_names
    if n_list and max(n_list) > len(var_names):
        raise ValueError(f"Cannot select {max(n_list)} DE genes: the data have only {len(var_names)} genes.")
    real_cols = gene_positions(real, var_names, "real")
    control_cols = gene_positions(control, var_names, "control")
    x_pred, x_real, x_control = (expression_matrix(a, layer) for a in (pred, real, control))

    keys = [perturbation_key] if cell_type_key is None else [perturbation_key, cell_type_key]
    pred_groups = _group_rows(pred, keys, "pred")
    if not pred_groups:
        raise ValueError(f"`pred` has no cells with a label in `.obs[{perturbation_key!r}]`.")
    real_groups = _group_rows(real, keys, "real")
    if cell_type_key is None:
        control_groups = {None: np.arange(control.n_obs)}
    else:
        control_groups = _group_rows(control, [cell_type_key], "control")

    funcs: dict[str, Callable[[Matrix, Matrix, Matrix], float]] = {
        "e_distance": lambda p, r, c: e_distance(p, r, sqrt=sqrt),
        "emd": lambda p, r, c: emd(p, r),
        "mean_rmse": lambda p, r, c: mean_rmse(p, r),
        "pearson_delta": pearson_delta,
    }
    need_control = "pearson_delta" in metric_list or (bool(n_list) and de_genes is None)
    rows = []
    for key, pred_rows in pred_groups.items():
        condition, cell_type = (key, None) if cell_type_key is None else key
        where = f"{perturbation_key} == {condition!r}" + ("" if cell_type_key is None else f", cell type {cell_type!r}")
        if key not in real_groups:
            raise ValueError(f"`real` has no cells with {where}.")
        if need_control and cell_type not in control_groups:
            raise ValueError(f"`control` has no cells of cell type {cell_type!r}.")
        p = _take(x_pred, pred_rows, None)
        r = _take(x_real, real_groups[key], real_cols)
        c = _take(x_control, control_groups[cell_type], control_cols) if need_control else None

        gene_sets: list[tuple[str, np.ndarray | None]] = [("all", None)]
        if n_list:
            if de_genes is None:
                try:
                    ranked = rank_genes(r, c, var_names, rankby_abs=rankby_abs)
                except ValueError as err:
                    raise ValueError(f"Cannot compute DE genes for {where}: {err}") from err
            else:
                ranked = _lookup_de(de_genes, condition, cell_type, cell_type_key is not None)
                if len(ranked) < max(n_list):
                    raise ValueError(
                        f"`de_genes` has {len(ranked)} genes for {where}; `n_de` needs {max(n_list)} "
                        "(pass a smaller `n_de`)."
                    )
            positions = var_names.get_indexer(ranked[: max(n_list)])
            if (positions < 0).any():
                unknown = [g for g, i in zip(ranked, positions, strict=False) if i < 0]
                raise ValueError(f"DE genes for {where} not in `pred.var_names`: {unknown[:5]}.")
            gene_sets += [(f"DE{n}", positions[:n]) for n in n_list]

        for gene_set, cols in gene_sets:
            ps, rs = _take(p, None, cols), _take(r, None, cols)
            cs = None if c is None else _take(c, None, cols)
            for metric in metric_list:
                rows.append((condition, cell_type, gene_set, metric, funcs[metric](ps, rs, cs)))
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["value"] = table["value"].astype(np.float64)
    return table


def _lookup_de(de_genes: Mapping, condition: Hashable, cell_type: Hashable, by_cell_type: bool) -> list:
    if by_cell_type and (condition, cell_type) in de_genes:
        genes = de_genes[(condition, cell_type)]
    elif condition in de_genes:
        genes = de_genes[condition]
    else:
        wanted = f"({condition!r}, {cell_type!r}) or {condition!r}" if by_cell_type else repr(condition)
        raise KeyError(f"`de_genes` has no entry for {wanted}.")
    if isinstance(genes, str):
        raise TypeError(f"`de_genes[{condition!r}]` must be a sequence of gene names, not a string.")
    return list(genes)
