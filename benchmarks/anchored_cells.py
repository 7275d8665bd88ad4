"""How the anchored default makes its cells: source cells at the anchored mean, and the alternatives.

One trained default model per split and seed predicts in several ways (no second training):

- ``doloris``: the default, ``anchored_cells="sources"``: the source control cells, each gene moved to
  the anchored mean without filling zeros and its expressing cells given the perturbation's spread
  (docs/method.md), gates resting on 5 or more calibration conditions;
- ``doloris_generated_cells``: ``anchored_cells="generated"``, the model's generated cells moved the same way;
- ``doloris_shifted_cells``: ``anchored_cells="shifted"``, each source cell moved by the anchored shift;
- ``previous_default``: the default until issue 23, shifted cells with gates fitted on 2 or more
  calibration conditions;
- ``doloris_generated``: the generated cells themselves (``layers["doloris_generated"]``, the paper's
  cells from the calibrated model),

beside the Anchor, mean shift and no change. It prints the mean over held-out conditions of the
E-distance (all genes, DE20), EMD on DE20, the zero fraction of the predicted and real cells, the
per-gene zero-fraction error, the spread ratio on DE20 and the DE calls, per split.

Development seeds choose (docs/evaluation.md); confirmation seeds (10-12) only confirm.

With ``--models DIR`` each trained model is kept under ``DIR`` and re-used by the next run, so that
another way of making the cells costs a prediction, not a training. A kept model's gates are fitted
again from its calibration record with today's rule (a model trained before a rule changed keeps
its statistics, not its verdict), and its anchor is fitted again with today's Anchor.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/anchored_cells.py --splits norman_doubles kang_CD4T --seeds 0 \
        --models /tmp/models --out benchmarks/results/anchored_cells
    python benchmarks/anchored_cells.py --summarize --out benchmarks/results/anchored_cells
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scdoloris import baselines
from scdoloris.benchmark import BaselineMethod, DolorisMethod, run_benchmark
from scdoloris.benchmark._datasets import load_dataset
from scdoloris.benchmark._splits import SINGLE_CELL_TYPE
from scdoloris.benchmark._suite import SUITE, RunSettings, make_split, source_fingerprint
from scdoloris.data import to_dense
from scdoloris.model._anchoring import MIN_GATE_CONDITIONS, gates_from_statistics

COLUMNS = [
    ("e_distance", "all"),
    ("e_distance", "DE20"),
    ("emd", "DE20"),
    ("zero_fraction_error", "all"),
    ("spread_ratio", "DE20"),
    ("n_de_predicted", "all"),
    ("n_de_real", "all"),
    ("de_overlap", "all"),
    ("rank_e_distance", "all"),
    ("rank_mse", "all"),
]

# The package source this process runs, taken at start: an edit during a long run must not relabel it.
SOURCE = source_fingerprint()


class Recorded:
    """A method whose predictions' zero fractions are recorded (and, optionally, whose X is a layer)."""

    def __init__(self, method, name: str | None = None, layer: str | None = None):
        self.method = method
        self.name = name or method.name
        self.layer = layer
        self.zeros: list[float] = []

    def fit(self, train, split, *, seed):
        self.method.fit(train, split, seed=seed)
        return self

    def predict(self, perturbations, **kwargs):
        predicted = self.method.predict(perturbations, **kwargs)
        if self.layer is not None:
            predicted = predicted.copy()
            predicted.X = predicted.layers[self.layer]
            predicted.uns.pop("doloris_anchoring", None)
        n = kwargs["n_cells"]
        x = to_dense(predicted.X)
        self.zeros.extend(float((x[i * n : (i + 1) * n] == 0).mean()) for i in range(len(perturbations)))
        return predicted


class CachedDoloris(DolorisMethod):
    """The default model, trained once per split and seed and kept under ``models`` (re-used when there).

    Trying another way of making the cells then costs a prediction, not a training.
    """

    def __init__(self, *args, models: Path | None = None, key: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.models, self.key = models, key

    def fit(self, train, split, *, seed):
        path = None if self.models is None else self.models / f"{self.key}_seed{seed}"
        if path is None or not (path / "model.pt").exists():
            super().fit(train, split, seed=seed)
            if path is not None:
                self.model.save(str(path), overwrite=True)
            return self
        from scdoloris import Doloris

        train = self.registered(train, split)
        self.model = Doloris.load(str(path), adata=train)
        self.model.calibration_ = refitted(self.model.calibration_)  # today's rule on the kept statistics
        # Today's anchor, fitted as train() fits it at its end (the gates' statistics keep the anchor of their fold).
        self.model.anchor_ = self.model._fit_anchor(np.ones(self.model.adata.n_obs, dtype=bool)).state()
        self.fitted_seed = seed
        return self


def refitted(calibration: dict, min_conditions: int = MIN_GATE_CONDITIONS) -> dict:
    """``calibration`` with its gates fitted again from its record of held-out conditions (unchanged without one)."""
    record = calibration.get("conditions")
    if not record:
        return calibration
    gates, counts = gates_from_statistics(record, record["kind"], min_conditions=min_conditions)
    return {**calibration, "gates": gates, "n_conditions": counts}


class OtherGates:
    """The parent's trained model predicting with the gates that rest on ``min_conditions`` or more conditions.

    Gates are fitted again from the calibration record (:func:`gates_from_statistics`), so this gives
    the gates of another minimum than the package's ``MIN_GATE_CONDITIONS`` on the same trained model.
    """

    def __init__(self, parent: DolorisMethod, name: str, min_conditions: int, **predict_kwargs):
        self.parent, self.name, self.min_conditions = parent, name, min_conditions
        self.predict_kwargs = predict_kwargs
        self.gates: dict = {}

    def fit(self, train, split, *, seed):
        return self

    def predict(self, perturbations, *, cell_type, n_cells, seed, dose=None, smiles=None):
        model = self.parent.model
        saved = model.calibration_
        model.calibration_ = refitted(saved, self.min_conditions)
        self.gates = model.calibration_["gates"]
        try:
            kwargs = {**self.parent.predict_kwargs, **self.predict_kwargs}
            return self.parent._predict(perturbations, cell_type, n_cells, seed, dose, smiles, kwargs)
        finally:
            model.calibration_ = saved


def suite_split(name: str, seed: int, settings: RunSettings, models: Path | None):
    """The data of suite split ``name``, its split at ``seed`` and the default model for it (kept under ``models``)."""
    entry = SUITE[name]
    data = load_dataset(entry.dataset)
    split = make_split(entry, data)
    current = split(seed) if callable(split) else split
    doloris = CachedDoloris(
        {"gene_graph": data.gene_graph},
        {"max_steps": settings.max_steps, "batch_size": settings.batch_size},
        models=models,
        key=name,
    )
    return data, current, doloris


def run(name: str, seed: int, settings: RunSettings, models: Path | None = None) -> tuple[pd.DataFrame, dict]:
    data, current, doloris = suite_split(name, seed, settings, models)
    methods = [
        Recorded(doloris),
        Recorded(doloris.variant("doloris_generated_cells", anchored_cells="generated")),
        Recorded(doloris.variant("doloris_shifted_cells", anchored_cells="shifted")),
        Recorded(OtherGates(doloris, "previous_default", min_conditions=2, anchored_cells="shifted")),
        Recorded(doloris.variant("doloris_generated_layer"), name="doloris_generated", layer="doloris_generated"),
        Recorded(BaselineMethod("anchor", baselines.Anchor)),
        Recorded(BaselineMethod("mean_shift", baselines.MeanShift)),
        Recorded(BaselineMethod("no_change", baselines.NoChange)),
    ]
    start = time.perf_counter()
    result = run_benchmark(data.adata, current, methods, seeds=[seed], n_cells=settings.n_cells, progress=False)
    real = []
    for record in current.test.to_dict("records"):
        ct = None if record["cell_type"] == SINGLE_CELL_TYPE else record["cell_type"]
        cells = current.cells(data.adata, record["perturbation"], ct, record.get("dose"))
        real.append(float((to_dense(cells.X) == 0).mean()))
    zeros = {m.name: float(np.mean(m.zeros)) for m in methods} | {"real": float(np.mean(real))}
    scores = result.scores
    rows = []
    for method in scores["method"].unique():
        row = {"split": name, "seed": seed, "method": method, "zeros": zeros.get(method)}
        for metric, gene_set in COLUMNS:
            chosen = scores[(scores.method == method) & (scores.metric == metric) & (scores.gene_set == gene_set)]
            values = chosen["value"].to_numpy(dtype=float)
            row[f"{metric}:{gene_set}"] = float(
                np.nanmedian(values) if metric.startswith("n_de") else np.nanmean(values)
            )
        rows.append(row)
    table = pd.DataFrame(rows)
    table["real_zeros"] = zeros["real"]
    calibration = doloris.model.calibration_
    record = calibration.get("conditions")
    info = {
        "seconds": time.perf_counter() - start,
        "source": SOURCE,
        "gates": calibration["gates"],
        "previous_default_gates": methods[3].method.gates,
        "validated_gates": gates_from_statistics(record, record["kind"], validate=True)[0] if record else {},
        "n_conditions": calibration["n_conditions"],
        "conditions": calibration.get("conditions"),
    }
    return table, info


SHORT = {
    "doloris": "default",
    "doloris_generated_cells": "generated",
    "doloris_shifted_cells": "shifted",
    "previous_default": "previous default",
    # Names of runs before the default changed (issue 23): the default was then "shifted", min-2 gates.
    "doloris_sources_cells": "sources",
    "min5_generated_cells": "generated, min-5 gates",
    "min5_sources_cells": "sources, min-5 gates",
    "doloris_generated": "generated layer",
    "anchor": "anchor",
    "mean_shift": "mean shift",
    "no_change": "no change",
}


def summarize(out: Path) -> str:
    """Markdown tables of every ``<split>_seed<s>.csv`` under ``out``: distances, then distributions."""
    tables = sorted(out.glob("*_seed*.csv"))
    if not tables:
        raise SystemExit(f"No results under {out}.")
    frames = []
    for path in tables:
        frame = pd.read_csv(path)
        if "min5_sources_cells" in set(frame["method"]):  # run before issue 23: "doloris" was the shifted default
            frame["method"] = frame["method"].replace({"doloris": "previous_default"})
        frames.append(frame)
    results = pd.concat(frames)
    sources = {json.loads(path.with_suffix(".json").read_text())["source"] for path in tables}
    methods = [m for m in SHORT if m in set(results["method"])]
    lines = [f"Source fingerprint(s): {', '.join(sorted(sources))}; {len(tables)} runs.", ""]
    for title, metric, lower in [
        ("E-distance, all genes", "e_distance:all", True),
        ("E-distance, DE20", "e_distance:DE20", True),
        ("EMD, DE20", "emd:DE20", True),
    ]:
        lines += [f"**{title}** (mean over the held-out conditions; bold: the strictly lowest)", ""]
        lines += ["| split | seed | " + " | ".join(SHORT[m] for m in methods) + " |"]
        lines += ["|---|---|" + "---:|" * len(methods)]
        for (split, seed), rows in results.groupby(["split", "seed"], sort=False):
            values = rows.set_index("method")[metric]
            rounded = {m: round(float(values[m]), 3) for m in methods if m in values.index}
            best = min(rounded.values()) if lower else max(rounded.values())
            bold = [m for m in rounded if rounded[m] == best]
            cells = [
                "–" if m not in rounded else f"**{rounded[m]:.3f}**" if bold == [m] else f"{rounded[m]:.3f}"
                for m in methods
            ]
            lines.append(f"| {split} | {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    shown = [
        m
        for m in [
            "doloris",
            "previous_default",
            "min5_generated_cells",
            "min5_sources_cells",
            "doloris_generated_cells",
            "doloris_generated",
            "anchor",
        ]
        if m in set(results["method"])
    ]
    columns = [
        ("zeros", "zero fraction"),
        ("zero_fraction_error:all", "zero-fraction error"),
        ("spread_ratio:DE20", "spread ratio, DE20"),
        ("n_de_predicted:all", "DE genes found (median)"),
        ("de_overlap:all", "DE overlap"),
        ("rank_e_distance:all", "rank (E-distance)"),
    ]
    lines += ["**Distributions** (per method: " + ", ".join(SHORT[m] for m in shown) + ")", ""]
    lines += ["| split | seed | real zeros | real DE genes | " + " | ".join(t for _, t in columns) + " |"]
    lines += ["|---|---|---:|---:|" + "---|" * len(columns)]
    for (split, seed), rows in results.groupby(["split", "seed"], sort=False):
        rows = rows.set_index("method")
        cells = []
        for column, _ in columns:
            values = [rows.loc[m, column] for m in shown if m in rows.index]
            digits = 0 if column.startswith("n_de") else 3
            cells.append(" / ".join("–" if pd.isna(v) else f"{v:.{digits}f}" for v in values))
        real_de = rows["n_de_real:all"].iloc[0]
        lines.append(
            f"| {split} | {seed} | {rows['real_zeros'].iloc[0]:.3f} | {real_de:.0f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--splits", nargs="+")
    parser.add_argument("--summarize", action="store_true", help="Print the tables of the results under --out.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="benchmarks/results/anchored_cells")
    parser.add_argument("--max-steps", type=int, default=RunSettings.max_steps)
    parser.add_argument(
        "--models", help="Keep each trained model under this folder and re-use it when there (no second training)."
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.summarize:
        print(summarize(out), end="")
        return
    if not args.splits:
        parser.error("--splits is required (or --summarize).")
    settings = RunSettings(max_steps=args.max_steps)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.splits:
        for seed in args.seeds:
            table, info = run(name, seed, settings, Path(args.models) if args.models else None)
            table.to_csv(out / f"{name}_seed{seed}.csv", index=False)
            (out / f"{name}_seed{seed}.json").write_text(json.dumps(info, indent=1, default=str))
            with pd.option_context("display.width", 250, "display.max_columns", 30):
                print(table.round(3).to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
