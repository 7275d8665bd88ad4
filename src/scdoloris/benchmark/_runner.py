"""Fit Doloris and the baselines on the same split and seeds; score every held-out condition."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import baselines
from .._validation import check_count, check_flags, check_seeds
from ._methods import ANCHORING_KEY, BaselineMethod, default_methods
from ._result import BenchmarkResult
from ._scoring import DEFAULT_METRICS, _de_gene_sets, _rank_rows, score_condition
from ._splits import SINGLE_CELL_TYPE, Split


def run_benchmark(
    adata: ad.AnnData,
    split: Split | Callable[[int], Split],
    methods: Sequence | None = None,
    *,
    seeds: Sequence[int] = (0,),
    n_cells: int = 100,
    n_de_genes: Sequence[int] = (20, 40),
    metric_names: Sequence[str] = DEFAULT_METRICS,
    progress: bool = True,
) -> BenchmarkResult:
    """Fit every method on the split's training cells and score its predictions of the held-out conditions.

    Every method gets the same training cells, seeds and number of generated cells. Methods that
    shift control cells and Doloris both start from ``n_cells`` control cells of the cell type,
    so distribution metrics compare like with like. DE genes (top ``n`` by Wilcoxon of the real
    cells vs the controls of the same cell type) come from :func:`scdoloris.metrics.de_genes`.

    Parameters
    ----------
    adata
        The whole data set (log1p expression in ``X``).
    split
        A :class:`Split`, or a function of the seed returning one (for seeded splits: every seed
        gets its own split). Not a name: a split needs the data's keys, so make it with
        :func:`singles_to_doubles` and the like.
    methods
        Objects with ``name``, ``fit(train, split, *, seed)`` and ``predict(perturbations, *,
        cell_type, n_cells, seed, dose, smiles)``, or names of :func:`default_methods` (``"anchor"``,
        ``"no_change"``, ...; Doloris then trains with its defaults), mixed as needed; names must be
        distinct. :func:`default_methods` by default.
    seeds
        Seeds, distinct integers from 0 to ``2**32 - 1``; each refits every method. One integer is
        one seed.
    n_cells
        Cells generated per condition, a positive integer.
    n_de_genes
        Sizes of the DE-gene sets scored besides all genes (positive integers; may be empty).
    metric_names
        Metrics to report (see :func:`score_condition`); by default all of them, the paper's four
        (``PAPER_METRICS``) and ``"e_distance_floor"``, ``"e_distance_excess"`` and
        ``"pearson_delta_centred"``, whose reference shift is the average shift of the split's
        training perturbations in the cell type (:class:`scdoloris.baselines.MeanShift`). The floor
        is computed once per condition, gene set and number of predicted cells.
    progress
        Show a progress bar.

    Returns
    -------
    BenchmarkResult
        Tidy scores, failures and timings; :meth:`BenchmarkResult.summary` averages them.

    Raises
    ------
    TypeError
        If ``adata`` is not an AnnData, ``split`` is not a split (e.g. a name), or a method is neither
        a name nor an object with ``name``, ``fit`` and ``predict``.
    ValueError
        Before any work, naming the argument: unknown or repeated method names, no method (or none
        that applies to the split), bad seeds, ``n_cells`` or ``n_de_genes``, unknown or no metrics,
        a split made for other data or holding out nothing.

    Examples
    --------
    Two baselines on a seeded split of the synthetic data (add ``default_methods()`` for Doloris):

    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations()
    >>> split = sd.benchmark.unseen_perturbations(adata, seed=0)
    >>> methods = [
    ...     sd.benchmark.BaselineMethod("no_change", sd.baselines.NoChange),
    ...     sd.benchmark.BaselineMethod("mean_shift", sd.baselines.MeanShift),
    ... ]
    >>> result = sd.benchmark.run_benchmark(adata, split, methods=methods, seeds=[0], progress=False)
    >>> sorted(result.scores["method"].unique())
    ['mean_shift', 'no_change']
    >>> result.summary().columns.tolist()
    ['gene_set', 'metric', 'method', 'mean', 'std', 'count']
    >>> print(result.to_markdown())  # doctest: +SKIP
    """
    seeds, first, methods, n_de_genes, metric_names = _check_arguments(
        adata,
        split,
        methods,
        seeds=seeds,
        n_cells=n_cells,
        n_de_genes=n_de_genes,
        metric_names=metric_names,
        progress=progress,
    )
    has_dose = first.dose_key is not None
    not_applicable = {}
    for method in methods:
        why = method.not_applicable(first) if hasattr(method, "not_applicable") else None
        if why is not None:
            not_applicable[method.name] = why
    methods = [method for method in methods if method.name not in not_applicable]
    rows, failures, seconds, gate_rows, timings = [], [], {}, [], []
    de_cache: dict = {}
    floor_cache: dict = {}  # per condition: {(gene set, n predicted cells): floor}, shared by the methods
    total = len(seeds) * len(methods)
    with tqdm(total=total, desc="benchmark", disable=not progress) as bar:
        for seed in seeds:
            current = split(seed) if callable(split) else split
            train = current.train_data(adata)
            smiles = current.smiles(adata)
            reference = _ReferenceShift(train, current) if "pearson_delta_centred" in metric_names else None
            for method in methods:
                bar.set_postfix_str(f"seed {seed}, {method.name}")
                start = time.perf_counter()
                try:
                    method.fit(train, current, seed=seed)
                except (KeyError, ValueError) as error:
                    # E.g. the linear baseline fits per cell type and cannot fit one never seen perturbed.
                    for condition in current.test.to_dict("records"):
                        failures.append({"method": method.name, "seed": seed} | condition | {"error": str(error)})
                    bar.update()
                    continue
                fitted = time.perf_counter()
                for cell_type, conditions in current.test.groupby("cell_type", sort=False):
                    ct = None if cell_type == SINGLE_CELL_TYPE else cell_type
                    control = current.controls(adata, ct)
                    records = conditions.to_dict("records")
                    shift = None if reference is None else reference.shift(ct)
                    ranked: dict = {}  # condition -> (ids, predicted, real): the rank metric needs them all
                    for condition, predicted, anchoring in _predict_conditions(
                        method, records, ct, n_cells, seed, smiles
                    ):
                        perturbation, dose = condition["perturbation"], condition.get("dose")
                        ids = {"method": method.name, "seed": seed, "perturbation": perturbation}
                        ids |= {"cell_type": cell_type} | ({"dose": dose} if dose is not None else {})
                        if isinstance(predicted, Exception):
                            failures.append(ids | {"error": str(predicted)})
                            continue
                        if anchoring is not None:
                            recorded = {k: v for k, v in anchoring.items() if k not in ("entry", "cell_type")}
                            gate_rows.append(ids | recorded)
                        real = current.cells(adata, perturbation, ct, dose)
                        key = (perturbation, cell_type, dose)
                        if key not in de_cache:
                            de_cache[key] = _de_gene_sets(adata, current, perturbation, ct, n_de_genes, dose)
                        scored = score_condition(
                            predicted,
                            real,
                            control,
                            de_cache[key],
                            metric_names=metric_names,
                            reference_shift=shift,
                            floor_cache=floor_cache.setdefault(key, {}),
                        )
                        rows.extend(ids | row for row in scored)
                        ranked[key] = (ids, predicted.X, real.X)
                    rows.extend(_rank_rows(ranked, metric_names))
                seconds[(seed, method.name)] = time.perf_counter() - start
                timings.append(
                    {
                        "method": method.name,
                        "seed": seed,
                        "fit_seconds": fitted - start,
                        "predict_seconds": time.perf_counter() - fitted,  # and scoring
                    }
                )
                bar.update()
    columns = ["method", "seed", "perturbation", "cell_type", "dose", "error"]
    failures_table = pd.DataFrame(failures).reindex(columns=[c for c in columns if c != "dose" or has_dose])
    result = BenchmarkResult(pd.DataFrame(rows), first.name, failures_table, seconds)
    if gate_rows:
        result.gates = pd.DataFrame(gate_rows)
    if timings:
        result.timings = pd.DataFrame(timings)
    result.not_applicable = not_applicable
    return result


# Split functions, named in the error for a split given by name.
_SPLIT_FUNCTIONS = (
    "singles_to_doubles",
    "unseen_perturbations",
    "unseen_cell_type",
    "unseen_molecules",
    "unseen_drug_cell_dose",
)


def _check_arguments(
    adata, split, methods, *, seeds, n_cells, n_de_genes, metric_names, progress
) -> tuple[list[int], Split, list, list[int], list[str]]:
    """:func:`run_benchmark`'s arguments, checked before anything is fitted.

    Returns the seeds, the first seed's split, the methods (names resolved to method objects), the
    DE-gene set sizes and the metric names, as lists. Without these checks a bad argument showed
    only later: an ``AttributeError`` for a method name, an ``IndexError`` for no seeds, or no
    scores at all (and a ``KeyError`` in :meth:`BenchmarkResult.summary`).
    """
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
    seeds = check_seeds(seeds=seeds)
    check_count("n_cells", n_cells)
    if isinstance(n_de_genes, int | np.integer) and not isinstance(n_de_genes, bool):
        n_de_genes = [n_de_genes]
    n_de_genes = list(n_de_genes)
    for n in n_de_genes:
        check_count("n_de_genes", n)
    metric_names = [metric_names] if isinstance(metric_names, str) else list(metric_names)
    unknown = [name for name in metric_names if name not in DEFAULT_METRICS]
    if unknown:
        raise ValueError(f"Unknown metric_names {unknown}; choose from {list(DEFAULT_METRICS)}.")
    if not metric_names:
        raise ValueError(f"metric_names is empty; choose from {list(DEFAULT_METRICS)}.")
    check_flags(progress=progress)
    first = _first_split(adata, split, seeds[0])
    return seeds, first, _resolve_methods(methods, first), n_de_genes, metric_names


def _first_split(adata: ad.AnnData, split, seed: int) -> Split:
    """The split of the first seed, checked against ``adata``."""
    if isinstance(split, str):
        hint = f"sd.benchmark.{split}(adata, ...)" if split in _SPLIT_FUNCTIONS else "sd.benchmark.singles_to_doubles"
        raise TypeError(
            f"split must be a Split or a function of the seed returning one, not the name {split!r}: a split needs "
            f"the data's keys; make it with {hint} (or a lambda seed: ... for seeded splits)."
        )
    if not isinstance(split, Split) and not callable(split):
        raise TypeError(f"split must be a Split or a function of the seed returning one, got {type(split).__name__}.")
    first = split(seed) if callable(split) else split
    if not isinstance(first, Split):
        raise TypeError(f"split({seed}) must return a Split, got {type(first).__name__}.")
    if len(first.train) != adata.n_obs:
        raise ValueError(
            f"split was made for data of {len(first.train)} cells, but adata has {adata.n_obs}; "
            "make the split from adata."
        )
    keys = (first.perturbation_key, first.cell_type_key, first.dose_key, first.smiles_key)
    missing = [key for key in keys if key is not None and key not in adata.obs.columns]
    if missing:
        raise ValueError(f"split's columns {missing} are not in adata.obs; columns: {list(adata.obs.columns)[:20]}.")
    if first.test.empty:
        raise ValueError(f"split {first.name!r} holds out no condition: there is nothing to score.")
    return first


def _resolve_methods(methods, first: Split) -> list:
    """``methods`` as method objects: ``None`` is :func:`default_methods`, a name is that method of it."""
    if methods is None:
        return default_methods(doses=first.dose_key is not None)
    if isinstance(methods, str) or hasattr(methods, "fit"):
        methods = [methods]  # one name or one method
    if not hasattr(methods, "__iter__"):
        raise TypeError(f"methods must be a list of methods or method names, got {type(methods).__name__}.")
    methods = list(methods)
    known = {method.name: method for method in default_methods(doses=True)}
    if not methods:
        raise ValueError(f"methods is empty; pass methods or names among {list(known)}, or None for all of them.")
    resolved, unknown = [], []
    for method in methods:
        if isinstance(method, str):
            if method in known:
                resolved.append(known[method])
            else:
                unknown.append(method)
        elif all(hasattr(method, attribute) for attribute in ("name", "fit", "predict")):
            resolved.append(method)
        else:
            raise TypeError(
                f"methods must hold method names or objects with name, fit and predict; got {type(method).__name__}."
            )
    if unknown:
        raise ValueError(f"Unknown method name(s) {unknown} in methods; choose from {list(known)}.")
    names = [method.name for method in resolved]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"methods has the name(s) {repeated} more than once; each method's scores are kept under its name."
        )
    reasons = {m.name: m.not_applicable(first) for m in resolved if hasattr(m, "not_applicable")}
    if all(reasons.get(name) is not None for name in names):
        why = "; ".join(f"{name} ({reasons[name]})" for name in names)
        raise ValueError(f"No method of methods applies to split {first.name!r}: {why}.")
    return resolved


class _ReferenceShift:
    """Average shift of a split's training perturbations per cell type (``pearson_delta_centred``'s reference).

    It is the shift of the mean-shift baseline, fitted the way the runner fits it (a (drug, dose)
    pair is one training perturbation), so the centring and that baseline agree. ``None`` where it
    cannot be made (no perturbed training cells): the centred correlation is then ``nan``.
    """

    def __init__(self, train: ad.AnnData, split: Split):
        try:
            self.model = BaselineMethod("mean_shift", baselines.MeanShift).fit(train, split, seed=0).fitted
        except (KeyError, ValueError):
            self.model = None

    def shift(self, cell_type: str | None) -> pd.Series | None:
        """The reference shift in ``cell_type`` (MeanShift's; its overall average for ``None`` or a new cell type)."""
        if self.model is None:
            return None
        known = self.model.mean_shift_
        return known.loc[cell_type] if cell_type in known.index else self.model.overall_shift_


def _anchoring(predicted: ad.AnnData, entry: int) -> dict | None:
    """The ``entry``-th row of a prediction's anchoring record (kind, gate, ...), if it has one.

    The runner asks for one cell type per call, so the record has one row per requested condition.
    """
    record = predicted.uns.get(ANCHORING_KEY)
    if record is None:
        return None
    return {column: values[entry] for column, values in record.items()}


def _predict_conditions(method, records: list[dict], cell_type, n_cells: int, seed: int, smiles: dict):
    """``(condition, predicted cells or the error, anchoring record or None)`` for every condition of one cell type.

    All conditions in one call first (Doloris then inverts the control cells once, paper A.4);
    if that fails (e.g. the additive baseline meets a gene it never saw), one call per condition.
    """
    perturbations = [r["perturbation"] for r in records]
    doses = [r["dose"] for r in records] if records and "dose" in records[0] else None
    needed = {c: smiles[c] for p in perturbations for c in p.split("+") if c in smiles}
    try:
        predicted = method.predict(
            perturbations, cell_type=cell_type, n_cells=n_cells, seed=seed, dose=doses, smiles=needed
        )
    except (KeyError, ValueError):
        predicted = None
    if predicted is not None and predicted.n_obs == len(records) * n_cells:
        # Both Doloris and the baselines return one block of n_cells per condition, in order.
        blocks = [predicted[i * n_cells : (i + 1) * n_cells] for i in range(len(records))]
        return [(r, block, _anchoring(predicted, i)) for i, (r, block) in enumerate(zip(records, blocks, strict=True))]
    results = []
    for r in records:
        dose = r.get("dose")
        needed = {c: smiles[c] for c in r["perturbation"].split("+") if c in smiles}
        try:
            predicted = method.predict(
                [r["perturbation"]], cell_type=cell_type, n_cells=n_cells, seed=seed, dose=dose, smiles=needed
            )
            results.append((r, predicted, _anchoring(predicted, 0)))
        except (KeyError, ValueError) as error:
            results.append((r, error, None))
    return results
