from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ._utils import category_colours, finish, new_axes, side_by_side


def _tidy_scores(scores) -> pd.DataFrame:
    """Scores as one tidy table with columns ``method``, ``metric``, ``value`` (and maybe ``gene_set``)."""
    if hasattr(scores, "scores") and isinstance(scores.scores, pd.DataFrame):  # a BenchmarkResult
        return scores.scores
    if isinstance(scores, Mapping):  # {method: sd.metrics.evaluate table}
        return pd.concat([pd.DataFrame(t).assign(method=m) for m, t in scores.items()], ignore_index=True)
    if not isinstance(scores, pd.DataFrame):
        kind = type(scores).__name__
        raise TypeError(f"Expected a BenchmarkResult, a DataFrame or a dict of DataFrames, got {kind}.")
    if {"metric", "value"} <= set(scores.columns):
        return scores if "method" in scores.columns else scores.assign(method="method")
    if "method" in scores.columns:  # wide: one column per metric
        value_columns = [c for c in scores.columns if c != "method" and pd.api.types.is_numeric_dtype(scores[c])]
        return scores.melt(id_vars=["method"], value_vars=value_columns, var_name="metric", value_name="value")
    raise ValueError(
        "A metrics DataFrame needs columns 'metric' and 'value' (tidy, as sd.metrics.evaluate returns, plus "
        "'method'), or a 'method' column and one numeric column per metric."
    )


def metric_bars(
    scores,
    *,
    metrics: str | Sequence[str] | None = None,
    gene_set: str | None = "all",
    methods: Sequence[str] | None = None,
    error: str = "std",
    ax: plt.Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | bool | None = None,
    return_fig: bool = False,
):
    """Bars of each method's mean score per metric, with error bars over conditions and seeds.

    Parameters
    ----------
    scores
        A :class:`~scdoloris.benchmark.BenchmarkResult`; a tidy DataFrame with columns ``method``,
        ``metric``, ``value`` (and optionally ``gene_set``), such as :func:`scdoloris.metrics.evaluate`
        tables concatenated with a ``method`` column; a dict ``{method: evaluate table}``; or a wide
        DataFrame with a ``method`` column and one numeric column per metric.
    metrics
        Metric(s) to show, in this order; all by default.
    gene_set
        Gene set to show when the scores have a ``gene_set`` column (``"all"``, ``"top20"``, ...);
        ``None`` pools every gene set.
    methods
        Methods to show, in this order; all by default.
    error
        Error bars: ``"std"`` (standard deviation), ``"sem"`` (standard error) or ``"none"``.
    ax, show, save, return_fig
        As in scanpy: Axes to draw in, show the figure, write it (a path, or ``True`` for
        ``scanpy.settings.figdir``), return the Figure.

    Returns
    -------
    The Figure with ``return_fig=True``; else the Axes when the plot is not shown; else ``None``.

    Examples
    --------
    >>> import scdoloris as sd  # doctest: +SKIP
    >>> result = sd.benchmark.run_benchmark(adata, split)  # doctest: +SKIP
    >>> sd.pl.metric_bars(result, metrics=["e_distance", "emd"], show=False)  # doctest: +SKIP
    """
    if error not in ("std", "sem", "none"):
        raise ValueError(f"error must be 'std', 'sem' or 'none', got {error!r}.")
    table = _tidy_scores(scores)
    if gene_set is not None and "gene_set" in table.columns:
        if gene_set not in set(table["gene_set"]):
            raise ValueError(f"No scores for gene_set={gene_set!r}; gene sets: {sorted(set(table['gene_set']))}.")
        table = table[table["gene_set"] == gene_set]
    if metrics is None:
        metrics = list(dict.fromkeys(table["metric"]))
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    methods = list(dict.fromkeys(table["method"])) if methods is None else list(methods)
    for name, asked, present in [("metric", metrics, set(table["metric"])), ("method", methods, set(table["method"]))]:
        unknown = [a for a in asked if a not in present]
        if unknown:
            raise ValueError(f"No scores for {name}(s) {unknown}; available: {sorted(present)}.")
    table = table[table["metric"].isin(metrics) & table["method"].isin(methods)]
    stats = table.groupby(["metric", "method"])["value"].agg(["mean", "std", "count"])

    fig, ax = new_axes(ax, (max(4.0, 1.0 + 0.4 * len(metrics) * len(methods)), 3.5))
    width = 0.8 / len(methods)
    colour_of = category_colours(len(methods))
    for j, method in enumerate(methods):
        rows = stats.reindex([(m, method) for m in metrics])
        spread = rows["std"].fillna(0.0).to_numpy()
        if error == "sem":
            spread = spread / np.sqrt(rows["count"].clip(lower=1).to_numpy())
        x = side_by_side(len(metrics), j, len(methods), width)
        ax.bar(
            x,
            rows["mean"].to_numpy(),
            width=width * 0.95,
            yerr=None if error == "none" else spread,
            capsize=2,
            color=colour_of(j),
            label=method,
        )
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_ylabel("mean over conditions" + ("" if error == "none" else f" (± {error})"))
    if gene_set is not None and "gene_set" in table.columns:
        ax.set_title(f"genes: {gene_set}", fontsize=10)
    ax.legend(fontsize=7)
    return finish(fig, ax, show, save, return_fig, "metric_bars")
