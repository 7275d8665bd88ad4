"""Command line: ``scdoloris demo`` and ``scdoloris benchmark``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from ._constants import MASK_STRATEGIES
from ._version import __version__

# The demo's training steps. Every gate is 0 there, so its table (the default's X against the baselines)
# does not depend on them; its paper cells (layers["doloris_generated"]) score a mean E-distance of 1.088
# at 2,000 steps against 1.047 at 4,000, and it runs in 94 s against 163 s at 4,000 (in-process, each alone
# on the 2-core machine; BENCHMARKS.md, "Demo").
DEMO_STEPS = 2000
# Training steps of the benchmark command: the suite's setting.
BENCHMARK_STEPS = 4000


def _demo(args: argparse.Namespace) -> int:
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import scvi

    import scdoloris as sd

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    scvi.settings.seed = args.seed
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    adata = sd.datasets.norman2019_subset(k562_only=True)
    is_double = adata.obs["perturbation"].astype(str).str.contains("+", regex=False)
    train = adata[~is_double].copy()
    doubles = sorted(adata.obs.loc[is_double, "perturbation"].astype(str).unique())
    print(
        f"Norman 2019 K562 subset: {adata.n_obs} cells x {adata.n_vars} genes. Training on "
        f"{train.n_obs} cells (controls + {train.obs['perturbation'].nunique() - 1} single activations); "
        f"predicting {len(doubles)} unseen double activations."
    )
    sd.Doloris.setup_anndata(train, perturbation_key="perturbation", control_value="control", cell_type_key="cell_type")
    model = sd.Doloris(train)
    print(model)
    model.train(max_steps=args.max_steps, batch_size=64)
    train_seconds = time.perf_counter() - start

    pred = model.predict_perturbation(doubles, cell_type="k562", n_cells=args.n_cells, seed=args.seed)
    # The baselines from the same control cells (the same seeded draw): the average shift, and the
    # Anchor, the population estimate the default starts from and the bar it must clear.
    keys = {"perturbation_key": "perturbation", "control_value": "control", "cell_type_key": "cell_type"}
    draw = {"cell_type": "k562", "n_cells": args.n_cells, "seed": args.seed}
    shifted = sd.baselines.MeanShift().fit(train, **keys).predict(doubles, **draw)
    anchored = sd.baselines.Anchor().fit(train, **keys).predict(doubles, **draw)
    gates = pd.DataFrame(pred.uns.get("doloris_anchoring", {}))
    control = adata[adata.obs["perturbation"] == "control"]
    rows = []
    for p in doubles:
        real = adata[adata.obs["perturbation"] == p].X
        generated = (pred.obs["perturbation"] == p).to_numpy()
        predicted = pred.X[generated]
        # "No change" = the very control cells the prediction started from: like with like, since
        # the E-distance of Eq. 20 depends on the number of cells compared.
        unchanged = adata[pred.obs["control_cell"][generated].to_numpy()].X
        mean_shift = shifted.X[(shifted.obs["perturbation"] == p).to_numpy()]
        anchor = anchored.X[(anchored.obs["perturbation"] == p).to_numpy()]
        rows.append(
            {
                "perturbation": p,
                "n_real": real.shape[0],
                "edistance_doloris": sd.metrics.e_distance(predicted, real),
                "edistance_anchor": sd.metrics.e_distance(anchor, real),
                "edistance_no_change": sd.metrics.e_distance(unchanged, real),
                "edistance_mean_shift": sd.metrics.e_distance(mean_shift, real),
                "edistance_floor": sd.metrics.e_distance_floor(real, n_predicted=predicted.shape[0]),
                "emd_doloris": sd.metrics.emd(predicted, real),
                "emd_anchor": sd.metrics.emd(anchor, real),
                # Cells that look real: as many zeros as the real cells (the Anchor fills them by its shift).
                "zeros_doloris": float((predicted == 0).mean()),
                "zeros_anchor": float((anchor == 0).mean()),
                "zeros_real": float((sd.data.to_dense(real) == 0).mean()),
            }
        )
    table = pd.DataFrame(rows).set_index("perturbation")
    table.insert(2, "doloris_minus_anchor", table["edistance_doloris"] - table["edistance_anchor"])
    summary = table.drop(columns="n_real").agg(["mean", "std", "median"])
    wins = int((table["edistance_doloris"] < table["edistance_no_change"]).sum())

    pred_path = os.path.join(out, "norman_doubles_predicted.h5ad")
    table_path = os.path.join(out, "norman_doubles_metrics.csv")
    plot_path = os.path.join(out, "norman_doubles_pca.png")
    pred.write_h5ad(pred_path)
    table.to_csv(table_path)
    sd.pl.prediction_pca(
        pred,
        adata[is_double],
        control=control,
        panels=True,
        title=f"Norman 2019 K562: {len(doubles)} doubles never trained, predicted vs real cells",
        save=plot_path,
        show=False,
    )

    with pd.option_context("display.width", 140, "display.precision", 3):
        print("\nPer held-out double perturbation (E-distance: paper Eq. 20; EMD: mean per-gene Wasserstein-1):")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        print("\nOver the held-out doubles:")
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    beats_shift = int((table["edistance_doloris"] < table["edistance_mean_shift"]).sum())
    difference = table["doloris_minus_anchor"]
    beats_anchor, loses_anchor = int((difference < -1e-3).sum()), int((difference > 1e-3).sum())
    print(
        f"\nDoloris has a lower E-distance than 'no change' on {wins} and than 'mean shift' on {beats_shift} of "
        f"{len(doubles)} doubles (edistance_floor: what a perfect generator of the real cells would score)."
    )
    print(
        f"Against the Anchor baseline (control + calibrated population shift, no diffusion model): lower on "
        f"{beats_anchor}, higher on {loses_anchor}, within 0.001 on {len(doubles) - beats_anchor - loses_anchor}; "
        f"mean difference {difference.mean():+.3f}."
    )
    print(
        f"Zeros in X: Doloris {summary.loc['mean', 'zeros_doloris']:.1%}, the Anchor "
        f"{summary.loc['mean', 'zeros_anchor']:.1%}, the real cells {summary.loc['mean', 'zeros_real']:.1%}."
    )
    if not gates.empty:
        share = gates.groupby("kind")["gate"].first().to_dict()
        print(f"Share of the diffusion model's own shift taken per kind of condition (gates): {share}.")
        if not any(share.values()):
            print(
                "Every gate is 0: each double's mean is the Anchor's, made of real control cells; the trained "
                "diffusion model does not change these numbers (its cells are in layers['doloris_generated'])."
            )
    print(f"Training took {train_seconds:.0f} s, everything {time.perf_counter() - start:.0f} s.")
    print(f"Wrote:\n  {pred_path}\n  {table_path}\n  {plot_path}")
    return 0


SPLITS = (
    "singles_to_doubles",
    "unseen_perturbations",
    "unseen_cell_type",
    "unseen_molecules",
    "unseen_drug_cell_dose",
)
# What --methods accepts: the names of sd.benchmark.default_methods(doses=True) (a test keeps the two
# equal), listed here so that argparse refuses an unknown name before anything is imported or loaded.
METHOD_NAMES = ("doloris", "doloris_paper", "anchor", "no_change", "mean_shift", "additive", "linear", "nearest_dose")
# Arguments of a single benchmark that --suite, which names its own data sets and splits, would ignore.
_NOT_WITH_SUITE = (
    "dataset",
    "split",
    "cell_type",
    "perturbation_key",
    "control_value",
    "cell_type_key",
    "mask_variants",
)
# Splits of drugs at doses: they read these obs columns (the split functions' defaults).
_DOSE_COLUMNS = {"unseen_molecules": ("dose", "smiles"), "unseen_drug_cell_dose": ("dose", "smiles")}

Error = Callable[[str], NoReturn]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2), without the long usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# Written under the tables of `scdoloris benchmark` when they have these columns (see docs/evaluation.md).
_METRIC_LEGEND = {
    "e_distance_floor": "- `e_distance_floor`: expected E-distance of a perfect generator of the real cells "
    "(same numbers of cells).",
    "e_distance_excess": "- `e_distance_excess`: `e_distance - e_distance_floor`; near 0, the condition cannot be won.",
    "pearson_delta_centred": "- `pearson_delta_centred`: Pearson delta after subtracting the average shift of the "
    "training perturbations: does the method get the perturbation-specific part of the shift?",
}


def _check_args(args: argparse.Namespace, error: Error) -> None:
    """The arguments that need no data, checked before anything heavy is imported, loaded or trained.

    A bad argument ends the command at once with one line on stderr (``error``: the subcommand's
    ``parser.error``, exit status 2), not with a traceback after a run whose results are then lost.
    """
    from ._validation import check_count, check_seeds, check_writable_folder

    try:
        check_writable_folder(path=args.out, name="--out")
        check_count("--max-steps", args.max_steps)
        check_count("--n-cells", args.n_cells)
        if args.command == "demo":
            check_seeds(seeds=args.seed, name="--seed")
            return
        check_count("--batch-size", args.batch_size)
        check_count("--jobs", args.jobs)
        args.seeds = check_seeds(seeds=args.seeds, name="--seeds")
        if not 0 < args.fraction < 1:
            raise ValueError(f"--fraction must be in (0, 1), got {args.fraction}.")
    except ValueError as problem:
        error(str(problem))
    if args.suite:
        given = [f"--{name.replace('_', '-')}" for name in _NOT_WITH_SUITE if getattr(args, name)]
        if given:
            error(f"--suite runs its own data sets and splits; {', '.join(given)} cannot be used with it.")
        from .benchmark._suite import SUITE

        if args.suite != ["all"]:
            unknown = [name for name in args.suite if name not in SUITE]
            if unknown:
                error(f"unknown --suite name(s) {unknown}; choose 'all' or from {list(SUITE)}.")
            if len(set(args.suite)) < len(args.suite):
                error(f"--suite names a split more than once: {args.suite}.")
        return
    if args.jobs != 1 or args.no_summary:
        error("--jobs and --no-summary are for --suite.")
    if not args.dataset or not args.split:
        error("needs --dataset and --split (or --suite).")
    if args.split == "unseen_cell_type" and args.cell_type is None:
        error("--split unseen_cell_type needs --cell-type.")
    if args.split != "unseen_cell_type" and args.cell_type is not None:
        error("--cell-type is only used by --split unseen_cell_type.")
    if args.mask_variants and args.methods and "doloris" not in args.methods:
        error("--mask-variants scores other samplers of Doloris' model: add doloris to --methods.")


def _check_data(adata, keys: dict, split: str, error: Error) -> None:
    """The data set has the columns and the control label the arguments name (before a split is made)."""
    from ._validation import check_obs_columns

    hint = " Name the columns with --perturbation-key and --cell-type-key (none: no cell types)."
    columns = {"--perturbation-key": keys["perturbation_key"], "--cell-type-key": keys["cell_type_key"]}
    columns |= {f"--split {split} (its {c} column)": c for c in _DOSE_COLUMNS.get(split, ())}
    try:
        check_obs_columns(adata=adata, **columns)
    except ValueError as problem:
        error(str(problem) + hint)
    labels = set(adata.obs[keys["perturbation_key"]].astype(str))
    if keys["control_value"] not in labels:
        error(
            f"--control-value {keys['control_value']!r} is not a label of adata.obs[{keys['perturbation_key']!r}] "
            f"(labels include {sorted(labels)[:10]})."
        )


def _make_split(args: argparse.Namespace, adata, keys: dict):
    """The split of ``--split`` (a function of the seed for seeded splits)."""
    import scdoloris as sd

    from .benchmark._datasets import DRUG_PAIRS

    if args.split == "singles_to_doubles":
        return sd.benchmark.singles_to_doubles(adata, **keys)
    if args.split == "unseen_perturbations":
        return lambda seed: sd.benchmark.unseen_perturbations(adata, **keys, fraction=args.fraction, seed=seed)
    if args.split == "unseen_molecules":
        held_out = [second for _, second in DRUG_PAIRS] if args.dataset == "synthetic_drugs" else None
        return sd.benchmark.unseen_molecules(adata, held_out, **keys, fraction=args.fraction)
    if args.split == "unseen_drug_cell_dose":
        return lambda seed: sd.benchmark.unseen_drug_cell_dose(adata, **keys, fraction=args.fraction, seed=seed)
    return sd.benchmark.unseen_cell_type(adata, args.cell_type, **keys)


def _benchmark(args: argparse.Namespace, error: Error) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import scdoloris as sd

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.suite:
        return _suite(args)
    from .benchmark._datasets import load_dataset
    from .benchmark._runner import _check_arguments
    from .benchmark._scoring import DEFAULT_METRICS

    try:
        data = load_dataset(args.dataset)
    except (ValueError, OSError) as problem:  # an unknown name, or a file that is not an .h5ad
        error(f"--dataset {args.dataset!r}: {problem}")
    adata, keys, gene_graph = data.adata, data.keys, data.gene_graph
    if args.perturbation_key:
        keys["perturbation_key"] = args.perturbation_key
    if args.control_value:
        keys["control_value"] = args.control_value
    if args.cell_type_key:
        keys["cell_type_key"] = None if args.cell_type_key == "none" else args.cell_type_key
    _check_data(adata, keys, args.split, error)
    try:
        split = _make_split(args, adata, keys)
        first = split(args.seeds[0]) if callable(split) else split
    except (KeyError, ValueError) as problem:  # e.g. an unknown --cell-type, no combination to hold out
        error(f"--split {args.split}: {problem.args[0] if problem.args else problem}")
    methods = sd.benchmark.default_methods(
        train_kwargs={"max_steps": args.max_steps, "batch_size": args.batch_size},
        gene_graph=gene_graph,
        # Every method named in --methods is kept: one that does not apply to the split is reported as such.
        doses=first.dose_key is not None or bool(args.methods),
    )
    if args.methods:
        methods = [m for m in methods if m.name in args.methods]
    doloris = next((m for m in methods if m.name == "doloris"), None)
    if doloris is not None:
        # Other mask samplers score the same trained model, listed right after it.
        variants = [doloris.variant(f"doloris_{v}", mask_strategy=v) for v in args.mask_variants]
        at = methods.index(doloris) + 1
        methods[at:at] = variants
    # run_benchmark's own checks of what the command sets, before it starts (e.g. no --methods that
    # applies to this split); it runs them again, a moment later.
    try:
        _check_arguments(
            adata,
            split,
            methods,
            seeds=args.seeds,
            n_cells=args.n_cells,
            n_de_genes=(),
            metric_names=DEFAULT_METRICS,
            progress=True,
        )
    except (TypeError, ValueError) as problem:
        error(str(problem))
    result = sd.benchmark.run_benchmark(adata, split, methods, seeds=args.seeds, n_cells=args.n_cells)
    if result.scores.empty:
        reasons = result.failures.groupby("method")["error"].first().to_dict() if len(result.failures) else {}
        raise SystemExit(f"scdoloris benchmark: no method predicted any held-out condition; errors: {reasons}.")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(
        out, f"{os.path.basename(args.dataset).removesuffix('.h5ad')}_{result.split_name.replace(':', '-')}"
    )
    result.scores.to_csv(f"{stem}_scores.csv", index=False)
    result.summary().to_csv(f"{stem}_summary.csv", index=False)
    result.gates.to_csv(f"{stem}_gates.csv", index=False)  # per seed and condition: kind, gate, calibration size
    result.timings.to_csv(f"{stem}_timings.csv", index=False)
    command = "scdoloris " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("scdoloris") else "scdoloris benchmark ..."
    text = f"`{command}`\n\n{result.to_markdown()}\n"
    legend = [line for metric, line in _METRIC_LEGEND.items() if metric in set(result.scores.get("metric", ()))]
    if legend:
        text += "\n" + "\n".join(legend) + "\n"
    with open(f"{stem}.md", "w") as handle:
        handle.write(text)
    print(text)
    if "doloris" in set(result.scores["method"]):  # --methods may leave it out
        print("Doloris scores lower E-distance (all genes) than each method on this fraction of conditions x seeds:")
        print(result.wins().to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"Wrote:\n  {stem}.md\n  {stem}_scores.csv\n  {stem}_summary.csv\n  {stem}_gates.csv\n  {stem}_timings.csv")
    return 0


def _suite(args: argparse.Namespace) -> int:
    """``scdoloris benchmark --suite``: named splits x seeds, then the summary tables of every finished run."""
    from .benchmark import _suite as suite

    names = list(suite.SUITE) if args.suite == ["all"] else args.suite
    settings = suite.RunSettings(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        n_cells=args.n_cells,
        methods=tuple(args.methods) if args.methods else None,
    )
    try:
        suite.run_suite(names, args.seeds, args.out, settings, jobs=args.jobs)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(str(error)) from None
    if args.no_summary:
        return 0
    try:
        text = suite.summarize(args.out)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(text)
    print(f"Wrote {os.path.join(os.path.abspath(args.out), 'summary.md')}")
    return 0


def _threads() -> int:
    """Threads for torch: the free cores of this machine (by its load), 1 to 4.

    torch otherwise takes one thread per core whatever else runs; on a shared 2-core machine that
    made the demo ~30x slower than one thread. ``OMP_NUM_THREADS``, when set, decides instead.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return int(min(4, max(1, cores - round(busy))))


def _stop_on_sigterm() -> None:
    """End with exit status 143 and a message on SIGTERM (a job scheduler, ``kill``), not mid-step."""

    def stop(signum, frame):
        print(f"\nscdoloris: stopped by signal {signum} (SIGTERM); outputs not yet written are lost.", file=sys.stderr)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``scdoloris`` command."""
    parser = _Parser(prog="scdoloris", description="Doloris single-cell perturbation prediction.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="Train on Norman 2019 K562 controls + single activations, predict the 15 unseen doubles.",
    )
    demo.add_argument("--out", default="doloris_demo", help="Output folder (default: ./doloris_demo).")
    demo.add_argument("--max-steps", type=int, default=DEMO_STEPS, help=f"Training steps (default {DEMO_STEPS}).")
    demo.add_argument("--n-cells", type=int, default=100, help="Predicted cells per double (default 100).")
    demo.add_argument("--seed", type=int, default=0, help="Seed (default 0).")
    bench = sub.add_parser(
        "benchmark",
        help="Fit Doloris and the baselines on a split; write markdown and CSV tables of the held-out scores.",
    )
    bench.add_argument(
        "--dataset",
        help="norman, mcfaline, kang, synthetic, synthetic_strong, synthetic_drugs, or a log1p-normalised .h5ad.",
    )
    bench.add_argument("--split", choices=SPLITS, help="What is held out.")
    bench.add_argument(
        "--suite",
        nargs="+",
        metavar="NAME",
        help="Named splits of the suite (or 'all'), run at every --seeds, then the summary of every finished run "
        "under --out (docs/evaluation.md); instead of --dataset/--split.",
    )
    bench.add_argument("--jobs", type=int, default=1, help="Suite runs at once, one thread each (default 1).")
    bench.add_argument("--no-summary", action="store_true", help="Suite: run only, write no summary.")
    bench.add_argument("--cell-type", help="The held-out cell type (--split unseen_cell_type).")
    bench.add_argument("--fraction", type=float, default=0.3, help="Held-out share of singles (default 0.3).")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds (default: 0).")
    bench.add_argument("--out", default="doloris_benchmark", help="Output folder (default: ./doloris_benchmark).")
    bench.add_argument(
        "--max-steps", type=int, default=BENCHMARK_STEPS, help=f"Doloris training steps ({BENCHMARK_STEPS})."
    )
    bench.add_argument("--batch-size", type=int, default=64, help="Doloris batch size (default 64).")
    bench.add_argument("--n-cells", type=int, default=100, help="Generated cells per condition (default 100).")
    bench.add_argument(
        "--methods",
        nargs="+",
        choices=METHOD_NAMES,
        metavar="NAME",
        help=f"Only these methods ({' '.join(METHOD_NAMES)}).",
    )
    bench.add_argument(
        "--mask-variants",
        nargs="*",
        default=[],
        choices=list(MASK_STRATEGIES[1:]),  # the default sampler is the 'doloris' row itself
        help="Also score Doloris' model with these other mask samplers (as doloris_<name>); default: none.",
    )
    bench.add_argument("--perturbation-key", help="obs column of the perturbation labels (for an .h5ad).")
    bench.add_argument("--control-value", help="Label of control cells (for an .h5ad).")
    bench.add_argument("--cell-type-key", help="obs column of cell types, or 'none' (for an .h5ad).")
    args = parser.parse_args(argv)
    _check_args(args, bench.error if args.command == "benchmark" else demo.error)
    # Before torch is imported: Lightning raises torch's threads to one per core when this is unset.
    threads = _threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    _stop_on_sigterm()
    import numpy as np  # after parsing: --help and --version need nothing heavy
    import torch

    torch.set_num_threads(threads)
    np.set_printoptions(precision=3)
    if args.command == "demo":
        return _demo(args)
    if args.command == "benchmark":
        return _benchmark(args, bench.error)
    return 1  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
