"""How much of the distance is the cell rule, and how much the mean it aims at (no training: seconds).

For each held-out condition of a suite split, the Anchor baseline's source cells and shift make the
cells in two ways, ``shifted`` (each source cell plus the shift, clipped at 0: the Anchor's own
cells) and ``sources`` (the package's zero-aware rule with the perturbation's spread,
``anchored_cells="sources"`` with gate 0), each
aimed at two means: the Anchor's, and the real cells' own mean (an oracle no method has, which
isolates the rule). Printed: the mean E-distance (all genes) over the held-out conditions and the
zero fraction, per split, and where the Anchor's mean is wrong: the squared error of its mean summed
over the genes whose predicted change is below ``SMALL_CHANGE`` in absolute value, beside their true
squared change (when the first is larger, predicting no change there would be closer).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/cell_rules.py --splits kang_CD4T norman_doubles --seeds 0
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from scdoloris import baselines
from scdoloris.benchmark import BaselineMethod
from scdoloris.benchmark._datasets import load_dataset
from scdoloris.benchmark._splits import SINGLE_CELL_TYPE
from scdoloris.benchmark._suite import SUITE, make_split
from scdoloris.data import to_dense
from scdoloris.metrics import e_distance
from scdoloris.model._anchoring import anchored_cells
from scdoloris.perturbation import dosed_label

N_CELLS = 100
# Predicted changes of a gene's mean below this (log1p units) count as small.
SMALL_CHANGE = 0.05


def score_split(name: str, seed: int) -> dict:
    entry = SUITE[name]
    data = load_dataset(entry.dataset)
    split = make_split(entry, data)
    current = split(seed) if callable(split) else split
    anchor = BaselineMethod("anchor", baselines.Anchor).fit(current.train_data(data.adata), current, seed=seed).fitted
    scores: dict[str, list[float]] = {}
    for record in current.test.to_dict("records"):
        cell_type = None if record["cell_type"] == SINGLE_CELL_TYPE else record["cell_type"]
        dose = record.get("dose")
        dose = None if dose is None or pd.isna(dose) else dose
        label = record["perturbation"] if dose is None else dosed_label(record["perturbation"], float(dose))
        pred = anchor.predict([label], cell_type=cell_type, n_cells=N_CELLS, seed=seed, include_sources=True)
        source = ~pred.obs["is_predicted"].to_numpy()
        x = to_dense(pred.X[source]).astype(np.float64)
        types = list(dict.fromkeys(pred.obs[anchor.cell_type_key_][source].astype(str)))
        shift = anchor.predict_shift([label], cell_type=types[0]).to_numpy()[0]
        # The package's rule at gate 0 (one group of sources, the condition's kind for its target, the
        # perturbation's spread of the expressing cells).
        spreads = {(0, 0): anchor.spread_change(label, types[0])}
        made = {
            rule: anchored_cells(
                x, x, np.zeros(len(x), dtype=int), {(0, 0): shift}, {(0, 0): 0.0}, rule,
                {(0, 0): np.random.default_rng(seed)}, {(0, 0): anchor.kind(label, types[0])}, spreads,
            )[0]
            for rule in ("shifted", "sources")
        }  # fmt: skip
        real = to_dense(current.cells(data.adata, record["perturbation"], cell_type, dose).X).astype(np.float64)
        oracle = real.mean(axis=0)
        cells = {
            **made,
            "shifted, real mean": np.clip(x + (oracle - x.mean(axis=0)), 0.0, None),
            "sources, real mean": anchored_cells(
                x,
                x,
                np.zeros(len(x), dtype=int),
                {(0, 0): oracle - x.mean(axis=0)},
                {(0, 0): 0.0},
                "sources",
                {(0, 0): np.random.default_rng(seed)},
                None,
                spreads,
            )[0],
        }
        # The mean the default aims at (its cells have it), its error and the true change, per gene.
        aimed = made["sources"].mean(axis=0)
        small = np.abs(aimed - x.mean(axis=0)) < SMALL_CHANGE
        error, change = (aimed - oracle) ** 2, (oracle - x.mean(axis=0)) ** 2
        scores.setdefault("small changes: n genes", []).append(float(small.sum()))
        scores.setdefault("small changes: sq. error of mean", []).append(float(error[small].sum()))
        scores.setdefault("small changes: true sq. change", []).append(float(change[small].sum()))
        scores.setdefault("all genes: sq. error of mean", []).append(float(error.sum()))
        for method, predicted in cells.items():
            scores.setdefault(method, []).append(e_distance(predicted, real))
            scores.setdefault(f"zeros: {method}", []).append(float((predicted == 0).mean()))
        scores.setdefault("zeros: real", []).append(float((real == 0).mean()))
    return {"split": name, "seed": seed, "n": len(current.test)} | {k: float(np.mean(v)) for k, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", nargs="+", default=list(SUITE))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args()
    rows = [score_split(name, seed) for name in args.splits for seed in args.seeds]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(pd.DataFrame(rows).round(3).to_string(index=False))


if __name__ == "__main__":
    main()
