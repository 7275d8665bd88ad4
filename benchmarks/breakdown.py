"""Break a `scdoloris benchmark` scores table down by a column or by which components were trained.

Examples
--------
python benchmarks/breakdown.py results/norman_singles_to_doubles_scores.csv --trained norman
python benchmarks/breakdown.py results/synthetic_drugs_unseen_molecules_scores.csv --by dose
"""

from __future__ import annotations

import argparse

import pandas as pd


def trained_singles(dataset: str) -> set[str]:
    """Single perturbations of a bundled data set (what ``singles_to_doubles`` trains on)."""
    import scdoloris as sd

    if dataset != "norman":
        raise SystemExit(f"--trained knows only 'norman', got {dataset!r}.")
    labels = sd.datasets.norman2019_subset(k562_only=True).obs["perturbation"].astype(str)
    return {p for p in labels if "+" not in p and p != "control"}


def breakdown(
    scores: pd.DataFrame, by: str, gene_set: str = "all", metrics: list[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``mean ± std`` per group, metric and method, and Doloris' share of lower E-distances.

    Every metric of the table is a column (with ``scdoloris benchmark``'s defaults also
    ``e_distance_floor``, ``e_distance_excess`` and ``pearson_delta_centred``), in the order of the
    table, or only ``metrics``.
    """
    table = scores[scores["gene_set"] == gene_set]
    order = list(dict.fromkeys(table["metric"])) if metrics is None else metrics
    stats = table.groupby([by, "metric", "method"])["value"].agg(["mean", "std", "count"])
    text = stats["mean"].map("{:.3f}".format) + " ± " + stats["std"].fillna(0).map("{:.3f}".format)
    wide = text.unstack("metric").reindex(columns=order)
    e = table[table["metric"] == "e_distance"]
    index = [c for c in ("seed", "perturbation", "cell_type", "dose") if c in e.columns]
    pairs = e.pivot_table(index=[*index], columns="method", values="value")
    groups = e.drop_duplicates(index).set_index(index)[by] if by not in index else None
    wins = {}
    for method in pairs.columns.drop("doloris"):
        both = pairs[["doloris", method]].dropna()
        key = both.index.get_level_values(by) if groups is None else groups.loc[both.index]
        wins[method] = (both["doloris"] < both[method]).groupby(key).mean()
    wide["n"] = stats["count"].xs("e_distance", level="metric")
    return wide, pd.DataFrame(wins).round(2)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scores", help="*_scores.csv written by `scdoloris benchmark`.")
    parser.add_argument("--by", default="perturbation", help="Column to group by (perturbation, dose, cell_type).")
    parser.add_argument("--trained", help="Group combinations by whether every component was trained ('norman').")
    parser.add_argument("--gene-set", default="all", help="all, DE20 or DE40.")
    parser.add_argument("--metrics", nargs="+", help="Metric columns to show (default: every metric of the table).")
    args = parser.parse_args()
    scores = pd.read_csv(args.scores)
    by = args.by
    if args.trained:
        singles = trained_singles(args.trained)
        scores["components"] = scores["perturbation"].map(
            lambda p: "all trained" if all(c in singles for c in p.split("+")) else "one never trained"
        )
        by = "components"
    table, wins = breakdown(scores, by, args.gene_set, args.metrics)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"genes: {args.gene_set}; mean ± std over conditions and seeds\n")
        print(table.to_string())
        print("\nShare of (condition, seed) pairs where Doloris has the lower E-distance:\n")
        print(wins.to_string())


if __name__ == "__main__":
    main()
