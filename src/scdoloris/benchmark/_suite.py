"""The benchmark suite: named splits x seeds, one folder per run, and the summary tables made from the folders.

Every table of BENCHMARKS.md's summary comes from :func:`summarize` over the run folders that
:func:`run_suite` writes, all made from one version of the package's source: a run records the
fingerprint of the source that made it, and the summary refuses to mix fingerprints. Runs already
done for the same source and settings are skipped, so a suite can be completed over several sittings.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ._methods import BAR_METHOD, DEFAULT_METHOD
from ._result import paired_difference
from ._scoring import HIGHER_IS_BETTER

# Seeds the methods are developed on, and seeds looked at only once a method change is final (docs/evaluation.md).
DEVELOPMENT_SEEDS = (0, 1, 2)
CONFIRMATION_SEEDS = (10, 11, 12)
_PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SuiteSplit:
    """One named split of the suite: a data set, what is held out, and its title in the tables."""

    name: str
    dataset: str
    split: str
    title: str
    cell_type: str | None = None
    fraction: float | None = None
    group: str | None = None  # splits of one group also get a pooled row (e.g. Kang's 7 cell types)


KANG_CELL_TYPES = ("CD4T", "CD14+Mono", "B", "FCGR3A+Mono", "NK", "CD8T", "Dendritic")
SUITE = {
    split.name: split
    for split in [
        SuiteSplit(
            "norman_singles", "norman", "unseen_perturbations", "Norman K562, 30% of singles held out", fraction=0.3
        ),
        SuiteSplit("norman_doubles", "norman", "singles_to_doubles", "Norman K562, singles -> 15 doubles"),
        *[
            SuiteSplit(f"kang_{ct}", "kang", "unseen_cell_type", f"Kang, {ct} held out", cell_type=ct, group="kang")
            for ct in KANG_CELL_TYPES
        ],
        SuiteSplit("mcfaline_A172", "mcfaline", "unseen_cell_type", "McFaline, A172 held out", cell_type="A172"),
        SuiteSplit(
            "synthetic_doubles", "synthetic_strong", "singles_to_doubles", "synthetic (effect 2), singles -> doubles"
        ),
        SuiteSplit(
            "drugs_unseen_molecules", "synthetic_drugs", "unseen_molecules", "synthetic drugs, 13 unseen molecules"
        ),
        SuiteSplit(
            "drugs_unseen_dose",
            "synthetic_drugs",
            "unseen_drug_cell_dose",
            "synthetic drugs, 30% of (drug, cell type, dose) held out",
            fraction=0.3,
        ),
    ]
}
GROUP_TITLES = {"kang": "Kang, pooled over the 7 held-out cell types"}


@dataclass(frozen=True)
class RunSettings:
    """Settings shared by every run of a suite (a run is redone when they change)."""

    max_steps: int = 4000
    batch_size: int = 64
    n_cells: int = 100
    methods: tuple[str, ...] | None = None


def source_fingerprint() -> str:
    """A hash of the package's Python source: runs with the same fingerprint ran the same code."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=_PACKAGE, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=_PACKAGE, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def make_split(entry: SuiteSplit, data):
    """The :class:`~scdoloris.benchmark.Split` of ``entry`` on ``data`` (a function of the seed when seeded)."""
    from . import _splits
    from ._datasets import DRUG_PAIRS

    keys = data.keys
    adata = data.adata
    if entry.split == "singles_to_doubles":
        return _splits.singles_to_doubles(adata, **keys)
    if entry.split == "unseen_perturbations":
        return lambda seed: _splits.unseen_perturbations(adata, **keys, fraction=entry.fraction, seed=seed)
    if entry.split == "unseen_cell_type":
        return _splits.unseen_cell_type(adata, entry.cell_type, **keys)
    if entry.split == "unseen_molecules":
        held_out = [second for _, second in DRUG_PAIRS] if entry.dataset == "synthetic_drugs" else None
        return _splits.unseen_molecules(adata, held_out, **keys)
    if entry.split == "unseen_drug_cell_dose":
        return lambda seed: _splits.unseen_drug_cell_dose(adata, **keys, fraction=entry.fraction, seed=seed)
    raise ValueError(f"Unknown split {entry.split!r}.")


def run_directory(out: str | os.PathLike, name: str, seed: int) -> Path:
    """Where the run of split ``name`` at ``seed`` is written."""
    return Path(out) / "runs" / name / f"seed{seed}"


def _is_done(directory: Path, fingerprint: str, settings: RunSettings) -> bool:
    meta = directory / "meta.json"
    if not meta.exists():
        return False
    recorded = json.loads(meta.read_text())
    return recorded.get("source") == fingerprint and recorded.get("settings") == _settings_record(settings)


def _settings_record(settings: RunSettings) -> dict:
    record = asdict(settings)
    record["methods"] = None if settings.methods is None else list(settings.methods)
    return record


def run_one(name: str, seed: int, out: str | os.PathLike, settings: RunSettings = RunSettings()) -> Path:
    """Run split ``name`` of :data:`SUITE` at ``seed``; write its scores, gates, timings and provenance.

    Returns the run's folder: ``scores.csv.gz`` (tidy scores), ``gates.csv`` (per condition: the
    anchoring kind, the gate and the calibration conditions behind it), ``timings.csv`` (fit and
    predict seconds per method), ``failures.csv`` and ``meta.json`` (source fingerprint, commit,
    settings, machine, date, wall time).
    """
    from ._datasets import load_dataset
    from ._methods import default_methods
    from ._runner import run_benchmark

    entry = SUITE[name]
    start = time.perf_counter()
    source, commit = source_fingerprint(), _git_commit()  # what runs, read before it runs
    data = load_dataset(entry.dataset)
    split = make_split(entry, data)
    first = split(seed) if callable(split) else split
    methods = default_methods(
        train_kwargs={"max_steps": settings.max_steps, "batch_size": settings.batch_size},
        gene_graph=data.gene_graph,
        doses=first.dose_key is not None,
    )
    if settings.methods is not None:
        methods = [m for m in methods if m.name in settings.methods]
    result = run_benchmark(data.adata, split, methods, seeds=[seed], n_cells=settings.n_cells, progress=False)
    directory = run_directory(out, name, seed)
    directory.mkdir(parents=True, exist_ok=True)
    result.scores.to_csv(directory / "scores.csv.gz", index=False)
    result.gates.to_csv(directory / "gates.csv", index=False)
    result.timings.to_csv(directory / "timings.csv", index=False)
    result.failures.to_csv(directory / "failures.csv", index=False)
    meta = {
        "split": name,
        "seed": seed,
        "source": source,
        "commit": commit,
        "settings": _settings_record(settings),
        "not_applicable": result.not_applicable,
        "n_conditions": len(first.test),
        "seconds": time.perf_counter() - start,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
    }
    # Written last: a run without meta.json is unfinished and is redone.
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    return directory


def run_suite(
    names: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    settings: RunSettings = RunSettings(),
    *,
    jobs: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Run every split of ``names`` at every seed not yet done for this source and these settings.

    With ``jobs > 1`` the runs go to that many subprocesses at once, one torch thread each; their
    logs are in ``out/logs``. Returns the folders of the runs made now.
    """
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise ValueError(f"Unknown suite split(s) {unknown}; choose from {list(SUITE)}.")
    fingerprint = source_fingerprint()
    pending = [(n, s) for n in names for s in seeds if not _is_done(run_directory(out, n, s), fingerprint, settings)]
    if progress:
        print(f"suite: {len(pending)} run(s) to make, {len(names) * len(seeds) - len(pending)} already done.")
    if jobs <= 1:
        made = []
        for i, (name, seed) in enumerate(pending):
            if progress:
                print(f"suite: [{i + 1}/{len(pending)}] {name} seed {seed}", flush=True)
            made.append(run_one(name, seed, out, settings))
        return made
    logs = Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def launch(job: tuple[str, int]) -> Path:
        name, seed = job
        command = [sys.executable, "-m", "scdoloris.cli", "benchmark", "--suite", name, "--seeds", str(seed)]
        command += ["--out", str(out), "--jobs", "1", "--no-summary", "--max-steps", str(settings.max_steps)]
        command += ["--batch-size", str(settings.batch_size), "--n-cells", str(settings.n_cells)]
        if settings.methods is not None:
            command += ["--methods", *settings.methods]
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(logs / f"{name}_seed{seed}.log", "w") as log:
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode
        if progress:
            print(f"suite: {name} seed {seed} {'done' if status == 0 else f'FAILED ({status})'}", flush=True)
        if status != 0:
            raise RuntimeError(f"Run {name} seed {seed} failed; see {logs / f'{name}_seed{seed}.log'}.")
        return run_directory(out, name, seed)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(launch, pending))


# --------------------------------------------------------------------------------------------- summary
def seed_group(seed: int) -> str:
    """``"development"``, ``"confirmation"`` or ``"other"``."""
    if seed in DEVELOPMENT_SEEDS:
        return "development"
    if seed in CONFIRMATION_SEEDS:
        return "confirmation"
    return "other"


@dataclass
class SuiteRuns:
    """Every finished run of a suite folder, pooled: scores, gates and timings with ``split`` and ``seed``."""

    scores: pd.DataFrame
    gates: pd.DataFrame
    timings: pd.DataFrame
    meta: pd.DataFrame


def read_runs(out: str | os.PathLike) -> SuiteRuns:
    """Read the finished runs under ``out/runs``; refuse runs of different sources or settings."""
    metas, scores, gates, timings = [], [], [], []
    for meta_path in sorted(Path(out).glob("runs/*/seed*/meta.json")):
        meta = json.loads(meta_path.read_text())
        directory = meta_path.parent
        ids = {"split": meta["split"], "seed": meta["seed"]}
        metas.append(meta | {"settings": json.dumps(meta["settings"], sort_keys=True)})
        scores.append(pd.read_csv(directory / "scores.csv.gz").assign(split=meta["split"]))
        for frames, file in ((gates, "gates.csv"), (timings, "timings.csv")):
            try:
                frames.append(pd.read_csv(directory / file).assign(**ids))
            except pd.errors.EmptyDataError:
                pass
    if not metas:
        raise ValueError(f"No finished run under {Path(out) / 'runs'}.")
    meta = pd.DataFrame(metas)
    for column in ("source", "settings"):
        if meta[column].nunique() > 1:
            table = meta.groupby(column)["split"].agg(lambda s: sorted(set(s)))
            raise ValueError(
                f"The runs under {out} come from {meta[column].nunique()} different {column}s; a summary is made "
                f"from one. Remove or redo the stale runs:\n{table.to_string()}"
            )
    return SuiteRuns(
        pd.concat(scores, ignore_index=True),
        pd.concat(gates, ignore_index=True) if gates else pd.DataFrame(),
        pd.concat(timings, ignore_index=True) if timings else pd.DataFrame(),
        meta,
    )


def _rows(runs: SuiteRuns) -> list[tuple[str, str, list[str], list[int]]]:
    """``(title, seed group, splits, seeds)`` of each summary row, in the suite's order, groups after their members."""
    done = runs.meta.groupby("split")["seed"].agg(list).to_dict()
    rows = []
    groups: dict[str, list[str]] = {}
    for name, entry in SUITE.items():
        if name not in done:
            continue
        for group in ("development", "confirmation", "other"):
            seeds = sorted(s for s in done[name] if seed_group(s) == group)
            if seeds:
                rows.append((entry.title, group, [name], seeds))
        if entry.group:
            groups.setdefault(entry.group, []).append(name)
        following = [e.group for e in list(SUITE.values())[list(SUITE).index(name) + 1 :]]
        if entry.group and entry.group not in following and len(groups[entry.group]) > 1:
            members = groups[entry.group]
            for group in ("development", "confirmation", "other"):
                seeds = sorted({s for m in members for s in done[m] if seed_group(s) == group})
                if seeds:
                    rows.append((GROUP_TITLES.get(entry.group, entry.group), group, members, seeds))
    return rows


def _mean(scores: pd.DataFrame, method: str, metric: str, gene_set: str) -> tuple[float, int]:
    values = scores.loc[
        (scores["method"] == method) & (scores["metric"] == metric) & (scores["gene_set"] == gene_set), "value"
    ]
    return (float(values.mean()), len(values)) if len(values) else (float("nan"), 0)


def _seeds_text(seeds: list[int]) -> str:
    return " ".join(map(str, seeds))


def _bold_strict_best(values: dict[str, float], higher_is_better: bool = False) -> set[str]:
    """The one name with the strictly best value (to the printed 3 decimals), or none on a tie."""
    finite = {k: round(v, 3) for k, v in values.items() if np.isfinite(v)}
    if not finite:
        return set()
    best = max(finite.values()) if higher_is_better else min(finite.values())
    winners = [k for k, v in finite.items() if v == best]
    return set(winners) if len(winners) == 1 else set()


SIMPLE_BASELINES = ("no_change", "mean_shift", "additive", "linear", "nearest_dose")


def distance_table(runs: SuiteRuns, *, gene_set: str = "all", metric: str = "e_distance") -> str:
    """Markdown: the default beside the Anchor (the bar), per split and seed group.

    Columns: their paired difference, the paper's preset, the best simple baseline, no change and
    the floor; the strictly lowest in bold (none on a tie at three decimals).
    """
    header = (
        f"| split | seeds | n | {DEFAULT_METHOD} | {BAR_METHOD} | {DEFAULT_METHOD} − {BAR_METHOD} (± s.e.) "
        "| doloris_paper | best simple baseline | no_change | floor |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    higher = metric in HIGHER_IS_BETTER
    for title, group, splits, seeds in _rows(runs):
        scores = runs.scores[runs.scores["split"].isin(splits) & runs.scores["seed"].isin(seeds)]
        values, n = {}, 0
        for method in (DEFAULT_METHOD, BAR_METHOD, "doloris_paper", "no_change"):
            values[method], count = _mean(scores, method, metric, gene_set)
            n = max(n, count)
        # The best simple baseline among those that predicted every condition the default did.
        simple = {}
        for method in SIMPLE_BASELINES:
            mean, count = _mean(scores, method, metric, gene_set)
            if count and count >= n:
                simple[method] = mean
        best_simple = (max if higher else min)(simple, key=simple.get) if simple else None
        shown = dict(values) | ({f"best:{best_simple}": simple[best_simple]} if best_simple else {})
        bold = _bold_strict_best(shown, higher)

        def cell(key: str, value: float, bold: set[str] = bold) -> str:
            if not np.isfinite(value):
                return "–"
            text = f"{value:.3f}"
            return f"**{text}**" if key in bold else text

        mean, se, pairs = paired_difference(scores, DEFAULT_METHOD, BAR_METHOD, metric=metric, gene_set=gene_set)
        difference = "–" if pairs == 0 else f"{mean:+.3f} ± {se:.3f}" if np.isfinite(se) else f"{mean:+.3f}"
        floor, _ = _mean(scores, DEFAULT_METHOD, "e_distance_floor", gene_set)
        best_text = "–"
        if best_simple is not None:
            best_text = f"{cell(f'best:{best_simple}', simple[best_simple])} ({best_simple})"
        cells = [cell(m, values[m]) for m in (DEFAULT_METHOD, BAR_METHOD)]
        cells += [difference, cell("doloris_paper", values["doloris_paper"]), best_text]
        cells += [cell("no_change", values["no_change"]), f"{floor:.3f}"]
        lines.append(f"| {title} | {group} {_seeds_text(seeds)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (column title, metric, gene set) of the field's metrics table.
FIELD_COLUMNS = (
    ("rank (mean MSE)", "rank_mse", "all"),
    ("rank (E-distance)", "rank_e_distance", "all"),
    ("cosine Δ", "cosine_delta", "all"),
    ("L2 Δ, top 1000", "top_expressed_l2", "all"),
    ("centred Pearson Δ", "pearson_delta_centred", "all"),
    ("zero-fraction error", "zero_fraction_error", "all"),
    ("zero-fraction error, DE20", "zero_fraction_error", "DE20"),
    ("spread ratio, DE20", "spread_ratio", "DE20"),
    ("DE genes found", "n_de_predicted", "all"),
    ("DE genes, real", "n_de_real", "all"),
    ("DE overlap", "de_overlap", "all"),
)
FIELD_METHODS = (DEFAULT_METHOD, BAR_METHOD, "doloris_paper", "no_change", "mean_shift")


def field_table(runs: SuiteRuns) -> str:
    """Markdown: the field's metrics (means over conditions and seeds) per split, seed group and method."""
    columns = [c for c in FIELD_COLUMNS if c[1] in set(runs.scores["metric"])]
    lines = [
        "| split | seeds | method | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|---|---|" + "---:|" * len(columns),
    ]
    for title, group, splits, seeds in _rows(runs):
        scores = runs.scores[runs.scores["split"].isin(splits) & runs.scores["seed"].isin(seeds)]
        for method in FIELD_METHODS:
            if method not in set(scores["method"]):
                continue
            cells = []
            for _, metric, gene_set in columns:
                value, count = _mean(scores, method, metric, gene_set)
                cells.append("–" if not count or not np.isfinite(value) else f"{value:.3f}")
            lines.append(f"| {title} | {group} {_seeds_text(seeds)} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gates_table(runs: SuiteRuns) -> str:
    """Markdown: per split and seed group, each anchoring kind's gate and the default's training time.

    A gate is shown as its mean and range over the seeds, with the number of calibration conditions
    behind it; times are the median fit seconds of Doloris' two presets.
    """
    lines = [
        "| split | seeds | kind: gate mean [min, max] (calibration conditions) | doloris fit s | doloris_paper fit s |",
        "|---|---|---|---:|---:|",
    ]
    for title, group, splits, seeds in _rows(runs):
        if len(splits) > 1:
            continue  # pooled rows: see their members
        cells = []
        if not runs.gates.empty:
            gates = runs.gates[
                runs.gates["split"].isin(splits)
                & runs.gates["seed"].isin(seeds)
                & (runs.gates["method"] == DEFAULT_METHOD)
            ]
            # One gate per kind and seed (all conditions of a kind share it).
            per_seed = gates.groupby(["kind", "seed"]).agg(gate=("gate", "first"), n=("n_calibration", "first"))
            for kind, table in per_seed.groupby(level="kind"):
                low, high = table["n"].min(), table["n"].max()
                n_range = f"{low}" if low == high else f"{low}-{high}"
                gate = table["gate"]
                cells.append(f"{kind}: {gate.mean():.2f} [{gate.min():.2f}, {gate.max():.2f}] ({n_range})")
        fit = {}
        if not runs.timings.empty:
            timings = runs.timings[runs.timings["split"].isin(splits) & runs.timings["seed"].isin(seeds)]
            for method in (DEFAULT_METHOD, "doloris_paper"):
                values = timings.loc[timings["method"] == method, "fit_seconds"]
                fit[method] = f"{values.median():.0f}" if len(values) else "–"
        lines.append(
            f"| {title} | {group} {_seeds_text(seeds)} | {'; '.join(cells) or '–'} "
            f"| {fit.get(DEFAULT_METHOD, '–')} | {fit.get('doloris_paper', '–')} |"
        )
    return "\n".join(lines)


def summarize(out: str | os.PathLike) -> str:
    """The suite's summary (markdown) from the finished runs under ``out``, also written to ``out/summary.md``."""
    runs = read_runs(out)
    meta = runs.meta
    commits = sorted(set(meta["commit"].fillna("unknown")))
    settings = json.loads(meta["settings"].iloc[0])
    parts = [
        f"Source fingerprint {meta['source'].iloc[0]} (commit {', '.join(commits)}); settings: {settings}; "
        f"{len(meta)} runs, {meta['seconds'].sum() / 3600:.1f} h of run time in all.",
        "",
        "**E-distance, all genes** (means over the held-out conditions and seeds; bold: the strictly lowest)",
        "",
        distance_table(runs, gene_set="all"),
        "",
        "**E-distance, the 20 DE genes of each condition**",
        "",
        distance_table(runs, gene_set="DE20"),
        "",
        "**The field's metrics** (all genes unless named; docs/evaluation.md defines each)",
        "",
        field_table(runs),
        "",
        "**Gates of the default and training time**",
        "",
        gates_table(runs),
        "",
    ]
    text = "\n".join(parts)
    Path(out, "summary.md").write_text(text)
    return text
