"""DDIM steps against quality and time: one trained default model per split and seed, predicted at several step counts.

Prediction runs the DDIM bridge twice per cell (inversion of the control cell, then sampling), each
``n_steps`` network calls (``PREDICTION_N_STEPS``, 50, by default). This script predicts the held-out
conditions of suite splits with the same trained model at each ``--steps`` value and prints, per
split and step count, the mean over held-out conditions of the E-distance (all genes, DE20) of the
default's cells (``X``) and of the generated layer (``layers["doloris_generated"]``, the paper's
cells), with the seconds the prediction took (median of ``--repeats`` calls, alternating step counts
within each repeat).

The gates stay those of the model's calibration, made at ``PREDICTION_N_STEPS``: where a gate is 0
the default's ``X`` does not depend on the network, so only splits with non-zero gates (the drug
splits) test the default's ``X``; every split tests the generated cells.

Models come from ``--models`` (``benchmarks/anchored_cells.py`` keeps them there; trained once if
absent).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ddim_steps.py --splits norman_doubles kang_CD4T --seeds 0 \
        --steps 10 20 50 --models /tmp/models --out benchmarks/results/ddim_steps
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from anchored_cells import SOURCE, suite_split

from scdoloris.benchmark._scoring import _de_gene_sets
from scdoloris.benchmark._splits import SINGLE_CELL_TYPE
from scdoloris.benchmark._suite import RunSettings
from scdoloris.data import to_dense
from scdoloris.metrics import e_distance


def _predict(model, records, n_steps: int, n_cells: int, seed: int, smiles: dict | None):
    """Every held-out condition predicted at ``n_steps``: the AnnData per condition and the total seconds."""
    out, start = [], time.perf_counter()
    for record in records:
        cell_type = None if record["cell_type"] == SINGLE_CELL_TYPE else record["cell_type"]
        dose = record.get("dose")
        dose = None if dose is None or pd.isna(dose) else float(dose)
        out.append(
            model.predict_perturbation(
                record["perturbation"],
                cell_type=cell_type,
                dose=dose,
                n_cells=n_cells,
                seed=seed,
                n_steps=n_steps,
                smiles=smiles,
            )
        )
    return out, time.perf_counter() - start


def run(name: str, seed: int, steps: list[int], repeats: int, models: Path, settings: RunSettings) -> pd.DataFrame:
    data, current, method = suite_split(name, seed, settings, models)
    method.fit(current.train_data(data.adata), current, seed=seed)
    model = method.model
    records = current.test.to_dict("records")
    smiles = current.smiles(data.adata) or None  # molecules never trained are predicted from their structure
    real, de20 = [], []
    genes = data.adata.var_names
    for record in records:
        cell_type = None if record["cell_type"] == SINGLE_CELL_TYPE else record["cell_type"]
        real.append(to_dense(current.cells(data.adata, record["perturbation"], cell_type, record.get("dose")).X))
        # The DE20 genes of the suite's tables (real vs control cells of the condition's cell type).
        top = _de_gene_sets(data.adata, current, record["perturbation"], cell_type, [20], record.get("dose"))["DE20"]
        de20.append(genes.get_indexer(top))
    seconds: dict[int, list[float]] = {n: [] for n in steps}
    predictions = {}
    for _ in range(repeats):
        for n in steps:
            predictions[n], took = _predict(model, records, n, settings.n_cells, seed, smiles)
            seconds[n].append(took)
    rows = []
    for n in steps:
        scores: dict[str, list[float]] = {}
        for predicted, truth, top in zip(predictions[n], real, de20, strict=True):
            truth = np.asarray(truth, dtype=np.float64)
            for cells, x in [("default", predicted.X), ("generated layer", predicted.layers["doloris_generated"])]:
                x = to_dense(x).astype(np.float64)
                scores.setdefault(f"{cells}: E-distance", []).append(e_distance(x, truth))
                scores.setdefault(f"{cells}: E-distance DE20", []).append(e_distance(x[:, top], truth[:, top]))
        row = {"split": name, "seed": seed, "n_steps": n, "seconds": float(np.median(seconds[n]))}
        rows.append(row | {k: float(np.mean(v)) for k, v in scores.items()})
    table = pd.DataFrame(rows)
    table["gates"] = json.dumps(model.calibration_.get("gates", {}))
    table["conditions"] = len(records)
    table["source"] = SOURCE
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 30, 50])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", default="/tmp/models")
    parser.add_argument("--out", default="benchmarks/results/ddim_steps")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.splits:
        for seed in args.seeds:
            table = run(name, seed, args.steps, args.repeats, Path(args.models), RunSettings())
            table.to_csv(out / f"{name}_seed{seed}.csv", index=False)
            with pd.option_context("display.width", 200, "display.max_columns", 20):
                print(table.drop(columns=["source", "gates"]).round(4).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
