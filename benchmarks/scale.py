"""How the cost of Doloris grows with the number of perturbations P and cells N (issue 26).

Each configuration (P perturbations x ``--cells`` cells each, plus controls, G genes, one cell type,
``gene_graph=None``) runs in its own subprocess, on synthetic log1p CSR data, in memory or backed
(an h5ad file read with ``backed="r"``). Stages, each timed apart with its peak resident memory
(sampled every 20 ms by a thread):

* ``data``: making the data (and writing the h5ad, backed);
* ``summary``: ``Doloris.setup_anndata`` + ``Doloris(adata)`` (the training summary);
* ``calibration``: the calibration inside ``train()`` (``Doloris._calibrate``, timed by a wrapper);
* ``training``: the rest of ``train(max_steps=--steps)``: the steps themselves, Lightning, validation;
* ``prediction``: ``predict_perturbation`` of ``--predict`` trained perturbations x 100 cells (with
  learned categories and no gene graph a perturbation never trained has no embedding; the cost per
  condition is the same).

Results: one JSON line per configuration in ``<out>/scale.jsonl``; ``--table`` prints the growth
table (seconds and peak GB per stage) and each stage's fitted growth exponent in P (log-log least
squares over the configurations; N grows with P).

Examples
--------
Smoke test::

    OMP_NUM_THREADS=1 python benchmarks/scale.py --P 20 40 --genes 200 --steps 5 --predict 5 --out /tmp/scale
    python benchmarks/scale.py --table --out /tmp/scale

The issue's grid (long: hours on a 2-core CPU)::

    OMP_NUM_THREADS=1 python benchmarks/scale.py --P 100 400 1600 6400 10000 --genes 2000 8000 --backed both
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


class PeakMemory:
    """The peak resident memory of this process while the block runs (a sampling thread, every 20 ms)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(self.interval)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def make_data(n_perturbations: int, n_genes: int, cells: int, seed: int = 0):
    """Log1p CSR data: ``cells`` cells per perturbation plus as many controls, one cell type.

    Each perturbation shifts 20 random genes' rates; counts are Poisson around gene rates with a
    library size per cell, normalised to 10,000 and log1p-transformed (about 90% zeros).
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.3, 1.0, size=n_genes) * 0.5
    n_cells = (n_perturbations + 1) * cells
    labels = np.repeat(["control"] + [f"P{i:05d}" for i in range(n_perturbations)], cells)
    rows, cols, vals = [], [], []
    for p in range(n_perturbations + 1):
        rate = rates.copy()
        if p:
            genes = rng.choice(n_genes, 20, replace=False)
            rate[genes] *= rng.choice([0.2, 4.0], size=20)
        library = rng.lognormal(0.0, 0.3, size=(cells, 1))
        counts = rng.poisson(rate[None, :] * library)
        r, c = np.nonzero(counts)
        rows.append(r + p * cells)
        cols.append(c)
        vals.append(counts[r, c].astype(np.float32))
    counts = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_cells, n_genes)
    )
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = 1e4 / np.maximum(totals, 1.0)
    counts = sparse.diags(scale.astype(np.float32)) @ counts
    counts.data = np.log1p(counts.data)
    obs = pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    return ad.AnnData(X=counts.astype(np.float32).tocsr(), obs=obs, var=var)


def run_one(n_perturbations: int, n_genes: int, cells: int, steps: int, n_predict: int, backed: bool) -> dict:
    """Time and measure each stage of one configuration (in this process)."""
    import warnings

    import anndata as ad
    import scvi

    import scdoloris as sd

    warnings.filterwarnings("ignore")
    scvi.settings.seed = 0
    stages: dict[str, dict] = {}

    @contextlib.contextmanager
    def stage(name):
        with PeakMemory() as memory:
            start = time.perf_counter()
            yield
            seconds = time.perf_counter() - start
        stages[name] = {"seconds": seconds, "peak_gb": memory.peak / 1e9}

    with tempfile.TemporaryDirectory() as folder:
        with stage("data"):
            adata = make_data(n_perturbations, n_genes, cells)
            if backed:
                path = Path(folder) / "data.h5ad"
                adata.write_h5ad(path)
                adata = ad.read_h5ad(path, backed="r")
        with stage("summary"):
            sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
            model = sd.Doloris(adata, gene_graph=None)
        calibrate = type(model)._calibrate
        spent = {"seconds": 0.0}

        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return calibrate(self, *args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start

        type(model)._calibrate = timed
        try:
            with stage("train"):
                model.train(max_steps=steps, batch_size=64, seed=0, enable_progress_bar=False)
        finally:
            type(model)._calibrate = calibrate
        train = stages.pop("train")
        # One process-wide peak for the two parts of train(): the sampler cannot tell them apart.
        stages["calibration"] = {"seconds": spent["seconds"], "peak_gb": train["peak_gb"]}
        stages["training"] = {"seconds": train["seconds"] - spent["seconds"], "peak_gb": train["peak_gb"]}
        asked = [f"P{i:05d}" for i in range(min(n_predict, n_perturbations))]
        with stage("prediction"):
            model.predict_perturbation(asked, n_cells=min(100, cells), seed=0, progress_bar=False)
    return {
        "P": n_perturbations,
        "N": (n_perturbations + 1) * cells,
        "G": n_genes,
        "backed": backed,
        "steps": steps,
        "predicted": len(asked),
        "stages": stages,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


STAGES = ("data", "summary", "calibration", "training", "prediction")


def table(records: list[dict]) -> str:
    """The growth table: per (G, backed) and P, seconds and peak GB per stage; then the fitted exponents."""
    lines = []
    for (genes, backed), group in _groups(records).items():
        group = sorted(group, key=lambda r: r["P"])
        lines += [f"**G = {genes}, {'backed' if backed else 'in memory'}** (seconds / peak GB per stage)", ""]
        lines += ["| stage | " + " | ".join(f"P={r['P']:,}, N={r['N']:,}" for r in group) + " | exponent in P |"]
        lines += ["|---|" + "---:|" * len(group) + "---:|"]
        for name in STAGES:
            cells = [f"{r['stages'][name]['seconds']:.2f} s / {r['stages'][name]['peak_gb']:.2f}" for r in group]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_exponent(group, name)} |")
        lines.append("")
    return "\n".join(lines)


def _groups(records):
    groups: dict = {}
    for record in records:
        groups.setdefault((record["G"], record["backed"]), []).append(record)
    return groups


def _exponent(group: list[dict], name: str) -> str:
    """Least-squares slope of log(seconds) on log(P): 1 is linear (N grows with P here)."""
    points = [(r["P"], r["stages"][name]["seconds"]) for r in group if r["stages"][name]["seconds"] > 0]
    if len(points) < 2:
        return "–"
    x, y = np.log([p for p, _ in points]), np.log([s for _, s in points])
    return f"{np.polyfit(x, y, 1)[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--P", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--genes", type=int, nargs="+", default=[2000])
    parser.add_argument("--cells", type=int, default=50, help="Cells per perturbation (and controls).")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--predict", type=int, default=50)
    parser.add_argument("--backed", choices=["no", "yes", "both"], default="no")
    parser.add_argument("--out", default="benchmarks/results/scale")
    parser.add_argument("--table", action="store_true", help="Print the table of <out>/scale.jsonl.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a configuration, run in this subprocess
    args = parser.parse_args()
    out = Path(args.out)
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return
    if args.table:
        print(table([json.loads(line) for line in (out / "scale.jsonl").read_text().splitlines() if line]))
        return
    out.mkdir(parents=True, exist_ok=True)
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.backed]
    for genes in args.genes:
        for backed in modes:
            for n in args.P:
                config = {
                    "n_perturbations": n,
                    "n_genes": genes,
                    "cells": args.cells,
                    "steps": args.steps,
                    "n_predict": args.predict,
                    "backed": backed,
                }
                done = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(config)], capture_output=True, text=True
                )
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"configuration {config} failed")
                record = done.stdout.strip().splitlines()[-1]
                with open(out / "scale.jsonl", "a") as handle:
                    handle.write(record + "\n")
                stages = json.loads(record)["stages"]
                print(config, {k: round(v["seconds"], 2) for k, v in stages.items()}, flush=True)


if __name__ == "__main__":
    main()
