"""What a benchmark run returns: the tidy scores, their summaries and the paired difference of two methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._methods import BAR_METHOD, DEFAULT_METHOD
from ._scoring import HIGHER_IS_BETTER


@dataclass
class BenchmarkResult:
    """Scores of every method on every held-out condition, seed, gene set and metric.

    ``scores`` is tidy: columns ``method``, ``seed``, ``perturbation``, ``cell_type``, ``gene_set``,
    ``metric``, ``value``. Methods that could not predict a condition (e.g. the additive baseline
    for a gene it never saw) are listed in ``failures`` instead.

    Examples
    --------
    :func:`run_benchmark` returns one; here one is made by hand to show its tables:

    >>> import pandas as pd
    >>> from scdoloris.benchmark import BenchmarkResult
    >>> scores = pd.DataFrame(
    ...     {
    ...         "method": ["doloris", "no_change", "doloris", "no_change"],
    ...         "seed": 0,
    ...         "perturbation": ["A", "A", "B", "B"],
    ...         "cell_type": "all",
    ...         "gene_set": "all",
    ...         "metric": "e_distance",
    ...         "value": [0.5, 1.0, 2.0, 1.5],
    ...     }
    ... )
    >>> result = BenchmarkResult(scores, "unseen_perturbations")
    >>> result.summary()[["method", "mean", "count"]]
          method  mean  count
    0    doloris  1.25      2
    1  no_change  1.25      2
    >>> result.wins().to_dict()  # Doloris is better on A, worse on B
    {'no_change': 0.5}
    >>> print(result.to_markdown())
    **unseen_perturbations, genes: all** (mean ± std over conditions and seeds)
    <BLANKLINE>
    | method | e_distance |
    |---|---|
    | doloris | 1.250 ± 1.061 |
    | no_change | 1.250 ± 0.354 |
    <BLANKLINE>
    """

    scores: pd.DataFrame
    split_name: str
    failures: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["method", "seed", "perturbation", "error"])
    )
    seconds: dict = field(default_factory=dict)
    gates: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["method", "seed", "perturbation", "cell_type", "kind", "gate"])
    )
    timings: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["method", "seed", "fit_seconds", "predict_seconds"])
    )
    not_applicable: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Mean, std and count over conditions and seeds, per method, gene set and metric."""
        grouped = self.scores.groupby(["gene_set", "metric", "method"], sort=False)["value"]
        return grouped.agg(["mean", "std", "count"]).reset_index()

    def paired_difference(
        self,
        method: str = DEFAULT_METHOD,
        reference: str = BAR_METHOD,
        *,
        metric: str = "e_distance",
        gene_set: str = "all",
    ) -> tuple[float, float, int]:
        """Mean and standard error of ``method - reference`` over the (condition, seed) pairs both scored.

        Returns ``(nan, nan, 0)`` when they share no pair. Negative is better for distances.
        """
        return paired_difference(self.scores, method, reference, metric=metric, gene_set=gene_set)

    def to_markdown(self, *, digits: int = 3) -> str:
        """One table per gene set: methods as rows, ``mean ± std`` per metric as columns.

        When both Doloris' default and the Anchor were scored, a last row gives their paired
        difference (``doloris - anchor``, mean ± standard error over conditions and seeds).
        """
        summary = self.summary()
        lines = []
        for gene_set, table in summary.groupby("gene_set", sort=False):
            cells = table.assign(
                text=[
                    f"{m:.{digits}f} ± {0.0 if np.isnan(s) else s:.{digits}f}"
                    for m, s in zip(table["mean"], table["std"], strict=True)
                ]
            )
            wide = cells.pivot(index="method", columns="metric", values="text")
            wide = wide.reindex(
                index=list(dict.fromkeys(table["method"])), columns=list(dict.fromkeys(table["metric"]))
            )
            lines.append(f"**{self.split_name}, genes: {gene_set}** (mean ± std over conditions and seeds)\n")
            lines.append("| method | " + " | ".join(wide.columns) + " |")
            lines.append("|---|" + "---|" * len(wide.columns))
            for method, row in wide.iterrows():
                lines.append(f"| {method} | " + " | ".join(str(v) for v in row.to_numpy()) + " |")
            if {DEFAULT_METHOD, BAR_METHOD} <= set(wide.index):
                differences = []
                for metric in wide.columns:
                    mean, se, n = self.paired_difference(metric=metric, gene_set=gene_set)
                    differences.append("" if n == 0 else f"{mean:+.{digits}f} ± {se:.{digits}f}")
                lines.append(f"| {DEFAULT_METHOD} − {BAR_METHOD} (paired, ± s.e.) | " + " | ".join(differences) + " |")
            lines.append("")
        if self.not_applicable:
            lines.extend(f"Not applicable: {method} ({why})." for method, why in self.not_applicable.items())
        if len(self.failures):
            lines.append(f"Not predicted: {self.failures.groupby('method').size().to_dict()} condition(s) per method.")
        return "\n".join(lines)

    def wins(self, *, metric: str = "e_distance", gene_set: str = "all", against: str | None = None) -> pd.Series:
        """For each method, the fraction of (condition, seed) pairs where Doloris scores better.

        Better is lower, except for the correlations (``HIGHER_IS_BETTER``: ``"pearson_delta"``,
        ``"pearson_delta_centred"``), where it is higher. ``"e_distance_excess"`` ranks like
        ``"e_distance"`` when every method predicts as many cells (the floor is then shared).
        """
        table = self.scores[(self.scores["metric"] == metric) & (self.scores["gene_set"] == gene_set)]
        index = [c for c in ("seed", "perturbation", "cell_type", "dose") if c in table.columns]
        wide = table.pivot_table(index=index, columns="method", values="value")
        others = [m for m in wide.columns if m != "doloris"] if against is None else [against]
        better = np.greater if metric in HIGHER_IS_BETTER else np.less
        # Each pair over the conditions both methods predicted.
        wins = {
            m: float(better(pair["doloris"], pair[m]).mean())
            for m in others
            if len(pair := wide[["doloris", m]].dropna())
        }
        return pd.Series(wins, name=f"doloris_wins_{metric}")


def paired_difference(
    scores: pd.DataFrame,
    method: str,
    reference: str,
    *,
    metric: str = "e_distance",
    gene_set: str = "all",
) -> tuple[float, float, int]:
    """Mean and standard error of ``method - reference`` over the (seed, condition) pairs both scored.

    Parameters
    ----------
    scores
        Tidy scores as in :attr:`BenchmarkResult.scores` (a ``split`` column, when present, is
        part of the pairing, so scores of several splits can be pooled).
    method, reference
        The two methods compared.
    metric, gene_set
        Which scores.

    Returns
    -------
    mean, standard_error, n
        ``(nan, nan, 0)`` without shared pairs; the standard error is ``nan`` for one pair.

    Examples
    --------
    >>> import pandas as pd
    >>> from scdoloris.benchmark import paired_difference
    >>> scores = pd.DataFrame(
    ...     {
    ...         "method": ["doloris", "anchor"] * 2,
    ...         "seed": 0,
    ...         "perturbation": ["A", "A", "B", "B"],
    ...         "cell_type": "all",
    ...         "gene_set": "all",
    ...         "metric": "e_distance",
    ...         "value": [1.0, 1.5, 2.0, 2.1],
    ...     }
    ... )
    >>> [round(v, 3) for v in paired_difference(scores, "doloris", "anchor")]
    [-0.3, 0.2, 2]
    """
    table = scores[(scores["metric"] == metric) & (scores["gene_set"] == gene_set)]
    index = [c for c in ("split", "seed", "perturbation", "cell_type", "dose") if c in table.columns]
    table = table[table["method"].isin([method, reference])]
    if "dose" in table:  # splits without doses pooled with dosed ones: NaN doses would drop out of the pairing
        table = table.assign(dose=table["dose"].fillna(-1.0))
    if table.empty:
        return float("nan"), float("nan"), 0
    wide = table.pivot_table(index=index, columns="method", values="value", dropna=False)
    if method not in wide or reference not in wide:
        return float("nan"), float("nan"), 0
    difference = (wide[method] - wide[reference]).dropna().to_numpy(dtype=np.float64)
    n = len(difference)
    if n == 0:
        return float("nan"), float("nan"), 0
    se = float(difference.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return float(difference.mean()), se, n
