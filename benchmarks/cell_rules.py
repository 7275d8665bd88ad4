"""How much of the distance is the cell rule, and how much the mean it aims at (no training: seconds).

For each held-out condition of a suite split, the Anchor baseline's source cells and shift make the
cells in two ways, ``shifted`` (each source cell plus the shift, clipped at 0: the Anchor's own
cells) and ``sources`` (the package's zero-aware rule, ``anchored_cells="sources"`` with gate 0), each
aimed at two means: the Anchor's, and the real cells' own mean (an oracle no method has, which
isolates the rule). Printed: the mean E-distance (all genes) over the held-out conditions and the
zero fraction, per split.

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
from scdoloris.model._anchoring import SUMMED_KINDS, _moved_without_filling

N_CELLS = 100


def _dosed_label(perturbation: str, dose) -> str:
    from scdoloris.perturbation import dosed_label

    return perturbation if dose is None else dosed_label(perturbation, float(dose))


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
        label = _dosed_label(record["perturbation"], dose)
        pred = anchor.predict([label], cell_type=cell_type, n_cells=N_CELLS, seed=seed, include_sources=True)
        source = ~pred.obs["is_predicted"].to_numpy()
        x = to_dense(pred.X[source]).astype(np.float64)
        types = list(dict.fromkeys(pred.obs[anchor.cell_type_key_][source].astype(str)))
        shift = anchor.predict_shift([label], cell_type=types[0]).to_numpy()[0]
        shifted = np.clip(x + shift, 0.0, None)
        summed = anchor.kind(label, types[0]) in SUMMED_KINDS
        target = shifted.mean(axis=0) if summed else np.clip(x.mean(axis=0) + shift, 0.0, None)
        real = to_dense(current.cells(data.adata, record["perturbation"], cell_type, dose).X).astype(np.float64)
        oracle = real.mean(axis=0)
        cells = {
            "shifted": shifted,
            "sources": _moved_without_filling(x, target, np.random.default_rng(seed)),
            "shifted, real mean": np.clip(x + (oracle - x.mean(axis=0)), 0.0, None),
            "sources, real mean": _moved_without_filling(x, oracle, np.random.default_rng(seed)),
        }
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
