"""Scoring one held-out condition: the metrics, their gene sets (all genes, DE top n) and the rank metric."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .. import metrics
from ..data import to_dense
from ._splits import Split

# The four metrics of the paper's tables; :data:`DEFAULT_METRICS` adds the floor columns, the centred
# correlation and the field's metrics (docs/evaluation.md).
PAPER_METRICS = ("e_distance", "emd", "mean_rmse", "pearson_delta")
# The field's metrics of one condition: of the mean change, of the distribution, and of Wilcoxon DE calls.
FIELD_METRICS = (
    "cosine_delta",
    "top_expressed_l2",
    "zero_fraction_error",
    "spread_ratio",
    "n_de_predicted",
    "n_de_real",
    "de_overlap",
)
# Metrics across the conditions of a cell type (PerturBench's rank metric), scored on all genes.
RANK_METRICS = ("rank_mse", "rank_e_distance")
DEFAULT_METRICS = (
    "e_distance",
    "e_distance_floor",
    "e_distance_excess",
    "emd",
    "mean_rmse",
    "pearson_delta",
    "pearson_delta_centred",
    *FIELD_METRICS,
    *RANK_METRICS,
)
# Each metric of the predicted cells alone as a function of (predicted, real, control); the others
# ("e_distance_floor", "e_distance_excess", "pearson_delta_centred", the DE calls) need more and are
# made in score_condition.
METRICS = {
    "e_distance": lambda p, r, c: metrics.e_distance(p, r),
    "emd": lambda p, r, c: metrics.emd(p, r),
    "mean_rmse": lambda p, r, c: metrics.mean_rmse(p, r),
    "pearson_delta": metrics.pearson_delta,
    "cosine_delta": metrics.cosine_delta,
    "top_expressed_l2": metrics.top_expressed_l2,
    "zero_fraction_error": lambda p, r, c: metrics.zero_fraction_error(p, r),
    "spread_ratio": lambda p, r, c: metrics.spread_ratio(p, r),
}
# Scored on all genes only: "the 1,000 most expressed" and a DE test's calls are statements about all genes.
ALL_GENES_ONLY = frozenset({"top_expressed_l2", "n_de_predicted", "n_de_real", "de_overlap"})
# Closer to 1 is better for the spread ratio; the tables show it as is.
HIGHER_IS_BETTER = frozenset({"pearson_delta", "pearson_delta_centred", "cosine_delta", "de_overlap"})
# Benjamini-Hochberg level of the Wilcoxon DE calls (predicted or real cells vs control), as cell-eval's.
DE_ALPHA = 0.05


def score_condition(
    predicted: ad.AnnData,
    real: ad.AnnData,
    control: ad.AnnData,
    gene_sets: Mapping[str, Sequence[str] | None],
    *,
    metric_names: Sequence[str] = DEFAULT_METRICS,
    reference_shift: pd.Series | np.ndarray | None = None,
    floor_cache: dict | None = None,
) -> list[dict]:
    r"""Every metric over every gene set for one condition (log1p scale).

    Besides the metrics of :mod:`scdoloris.metrics`, three columns put the E-distance and the
    Pearson delta in context:

    - ``"e_distance_floor"``: :func:`scdoloris.metrics.e_distance_floor` of the real cells for as
      many predicted cells as given, the expected E-distance of a perfect generator of the real
      distribution, :math:`\hat\delta (1/n + 1/m)`;
    - ``"e_distance_excess"``: ``e_distance - e_distance_floor``; near 0 (or below) the prediction
      is as good as a fresh sample of the real distribution, and the condition cannot be won;
    - ``"pearson_delta_centred"``: the Pearson correlation over genes of
      :math:`\bar x - \bar c - s` and :math:`\bar y - \bar c - s` (predicted, real and control
      means; :math:`s` = ``reference_shift``, the average shift of the training perturbations): does
      the prediction get the perturbation-specific part of the shift, beyond the average response?
      ``nan`` without a ``reference_shift``, or where a centred change is constant over genes
      (a prediction equal to control plus the average shift).

    Parameters
    ----------
    predicted, real, control
        Predicted cells, real cells of the condition and control cells of its cell type.
    gene_sets
        ``{name: genes}``; ``None`` scores all genes.
    metric_names
        Metrics to compute, among ``"e_distance"``, ``"e_distance_floor"``, ``"e_distance_excess"``,
        ``"emd"``, ``"mean_rmse"``, ``"pearson_delta"`` and ``"pearson_delta_centred"``.
    reference_shift
        Average shift of the training perturbations in the condition's cell type over the genes of
        ``real`` (a Series is aligned by gene name), e.g. from
        :meth:`scdoloris.baselines.MeanShift.predict_shift`; needed by ``"pearson_delta_centred"``.
    floor_cache
        A dict kept by the caller for this condition (same real cells): floors are stored in it by
        ``(gene set, number of predicted cells)`` and reused, as they do not depend on the method.

    Returns
    -------
    list of dict
        One ``{"gene_set", "metric", "value"}`` row per gene set and metric.

    Raises
    ------
    KeyError
        If a gene set names genes that are not in ``real``, or ``reference_shift`` lacks some.
    ValueError
        For an unknown metric.

    Examples
    --------
    The real cells scored as their own prediction:

    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> real = adata[adata.obs["perturbation"] == "G001+G002"]
    >>> control = adata[adata.obs["perturbation"] == "control"]
    >>> gene_sets = {"all": None, "first5": list(adata.var_names[:5])}
    >>> rows = sd.benchmark.score_condition(real, real, control, gene_sets, metric_names=["e_distance", "mean_rmse"])
    >>> [(row["gene_set"], row["metric"], round(row["value"], 6)) for row in rows]
    [('all', 'e_distance', 0.0), ('all', 'mean_rmse', 0.0), ('first5', 'e_distance', 0.0), ('first5', 'mean_rmse', 0.0)]

    With the floor columns and the centred correlation (the reference shift of a mean-shift
    baseline fitted on the other perturbations): the real cells are below the floor (their
    E-distance to themselves is 0) and get the perturbation-specific shift exactly:

    >>> train = adata[adata.obs["perturbation"] != "G001+G002"]
    >>> shift = sd.baselines.MeanShift().fit(train).predict_shift(["G001+G002"]).iloc[0]
    >>> names = ["e_distance", "e_distance_floor", "e_distance_excess", "pearson_delta_centred"]
    >>> rows = sd.benchmark.score_condition(
    ...     real, real, control, {"all": None}, metric_names=names, reference_shift=shift
    ... )
    >>> values = {row["metric"]: row["value"] for row in rows}
    >>> values["e_distance_excess"] == -values["e_distance_floor"] < 0, round(values["pearson_delta_centred"], 6)
    (True, 1.0)
    """
    metric_names = [name for name in metric_names if name not in RANK_METRICS]  # made across conditions
    unknown = [name for name in metric_names if name not in DEFAULT_METRICS]
    if unknown:
        raise ValueError(f"Unknown metric {unknown[0]!r}; choose from {sorted(DEFAULT_METRICS)}.")
    shift = None
    if reference_shift is not None:
        if isinstance(reference_shift, pd.Series):
            missing = real.var_names.difference(reference_shift.index)
            if len(missing):
                raise KeyError(f"reference_shift lacks {len(missing)} gene(s) of the data, e.g. {list(missing[:5])}.")
            shift = reference_shift.reindex(real.var_names).to_numpy(dtype=np.float64)
        else:
            shift = np.asarray(reference_shift, dtype=np.float64).ravel()
            if shift.shape != (real.n_vars,):
                raise ValueError(f"reference_shift must have one value per gene ({real.n_vars}), got {shift.shape}.")
    cache = {} if floor_cache is None else floor_cache
    rows = []
    for gene_set, genes in gene_sets.items():
        columns = slice(None) if genes is None else real.var_names.get_indexer(list(genes))
        if genes is not None and (columns < 0).any():
            raise KeyError(f"Genes of set {gene_set!r} are not in the data.")
        p = to_dense(predicted[:, columns].X)
        r = to_dense(real[:, columns].X)
        c = to_dense(control[:, columns].X)
        ref = None if shift is None else shift[columns]
        names = [n for n in metric_names if genes is None or n not in ALL_GENES_ONLY]
        values = _gene_set_scores(names, p, r, c, ref, cache, gene_set)
        rows.extend({"gene_set": gene_set, "metric": name, "value": values[name]} for name in names)
    return rows


def _gene_set_scores(names, p, r, c, shift, cache: dict, gene_set: str) -> dict[str, float]:
    """The metrics ``names`` on one gene set (dense predicted, real and control cells), each computed once."""
    values: dict[str, float] = {}

    def value(name: str) -> float:
        if name not in values:
            if name in METRICS:
                result = METRICS[name](p, r, c)
            elif name == "e_distance_floor":
                key = (gene_set, p.shape[0])
                if key not in cache:
                    cache[key] = metrics.e_distance_floor(r, n_predicted=p.shape[0])
                result = cache[key]
            elif name == "e_distance_excess":
                result = value("e_distance") - value("e_distance_floor")
            elif name in ("n_de_predicted", "n_de_real", "de_overlap"):
                # The real cells' DE calls do not depend on the method: made once per condition.
                key = (gene_set, "de_real")
                if key not in cache:
                    cache[key] = metrics.wilcoxon_adjusted_pvalues(r, c) < DE_ALPHA
                real_de = cache[key]
                predicted_de = metrics.wilcoxon_adjusted_pvalues(p, c) < DE_ALPHA
                values["n_de_predicted"] = float(predicted_de.sum())
                values["n_de_real"] = float(real_de.sum())
                overlap = (predicted_de & real_de).sum() / real_de.sum() if real_de.any() else float("nan")
                values["de_overlap"] = float(overlap)
                result = values[name]
            else:  # pearson_delta_centred: the Pearson delta from control shifted by the reference shift
                result = float("nan") if shift is None else metrics.pearson_delta(p, r, c + shift)
            values[name] = float(result)
        return values[name]

    return {name: value(name) for name in names}


def _rank_rows(ranked: dict, metric_names: Sequence[str]) -> list[dict]:
    """PerturBench's rank metric of each condition among the conditions of one cell type (all genes).

    Undefined with one condition (e.g. a held-out cell type with one stimulation): no rows.
    """
    wanted = [name for name in RANK_METRICS if name in metric_names]
    if len(ranked) < 2 or not wanted:
        return []
    predicted = {key: to_dense(p) for key, (_, p, _) in ranked.items()}
    real = {key: to_dense(r) for key, (_, _, r) in ranked.items()}
    rows = []
    for name in wanted:
        ranks = metrics.rank_metric(predicted, real, distance=name.removeprefix("rank_"))
        # In the order of ``real``, which is that of ``ranked``.
        for (ids, _, _), value in zip(ranked.values(), ranks.to_numpy(), strict=True):
            rows.append(ids | {"gene_set": "all", "metric": name, "value": float(value)})
    return rows


def _de_gene_sets(adata, split: Split, perturbation: str, cell_type, sizes, dose=None) -> dict:
    """``{"all": None, "DE20": [...], ...}`` for one condition, DE from the real cells."""
    sets: dict = {"all": None}
    sizes = [n for n in sizes if n < adata.n_vars]  # a "top n" of all genes would repeat "all"
    if not sizes:
        return sets
    real = split.cells(adata, perturbation, cell_type, dose)
    control = split.controls(adata, cell_type)
    both = ad.concat({"condition": real, "control": control}, label="_group", index_unique="-")
    largest = metrics.de_genes(both, groupby="_group", group="condition", reference="control", n=max(sizes))
    for n in sizes:
        sets[f"DE{n}"] = list(largest[:n])
    return sets
