"""Fit Doloris and the baselines on the same split and seeds; score every held-out condition."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import baselines, metrics
from .._validation import check_count, check_flags, check_seeds
from ..data import to_dense
from ..metrics._de import wilcoxon_adjusted_pvalues
from ..perturbation import dosed_label
from ._splits import SINGLE_CELL_TYPE, Split

# The four metrics of the paper's tables; :data:`DEFAULT_METRICS` adds the floor columns, the centred
# correlation and the field's metrics (docs/evaluation.md).
PAPER_METRICS = ("e_distance", "emd", "mean_rmse", "pearson_delta")
# The field's metrics of one condition: of the mean change, of the distribution, and of Wilcoxon DE calls.
FIELD_METRICS = (
    "cosine_delta",
    "top_expressed_l2",
    "zero_fraction_error",
    "spread_ratio",
    "n_de_predicted",
    "n_de_real",
    "de_overlap",
)
# Metrics across the conditions of a cell type (PerturBench's rank metric), scored on all genes.
RANK_METRICS = ("rank_mse", "rank_e_distance")
DEFAULT_METRICS = (
    "e_distance",
    "e_distance_floor",
    "e_distance_excess",
    "emd",
    "mean_rmse",
    "pearson_delta",
    "pearson_delta_centred",
    *FIELD_METRICS,
    *RANK_METRICS,
)
# Each metric of the predicted cells alone as a function of (predicted, real, control); the others
# ("e_distance_floor", "e_distance_excess", "pearson_delta_centred", the DE calls) need more and are
# made in score_condition.
METRICS = {
    "e_distance": lambda p, r, c: metrics.e_distance(p, r),
    "emd": lambda p, r, c: metrics.emd(p, r),
    "mean_rmse": lambda p, r, c: metrics.mean_rmse(p, r),
    "pearson_delta": metrics.pearson_delta,
    "cosine_delta": metrics.cosine_delta,
    "top_expressed_l2": metrics.top_expressed_l2,
    "zero_fraction_error": lambda p, r, c: metrics.zero_fraction_error(p, r),
    "spread_ratio": lambda p, r, c: metrics.spread_ratio(p, r),
}
# Scored on all genes only: "the 1,000 most expressed" and a DE test's calls are statements about all genes.
ALL_GENES_ONLY = frozenset({"top_expressed_l2", "n_de_predicted", "n_de_real", "de_overlap"})
# Closer to 1 is better for the spread ratio; the tables show it as is.
HIGHER_IS_BETTER = frozenset({"pearson_delta", "pearson_delta_centred", "cosine_delta", "de_overlap"})
# Benjamini-Hochberg level of the Wilcoxon DE calls (predicted or real cells vs control), as cell-eval's.
DE_ALPHA = 0.05
# Where Doloris' anchored predictions say which estimate anchored each condition and the gate taken;
# the runner records it per condition (BenchmarkResult.gates).
ANCHORING_KEY = "doloris_anchoring"
# The bar every table compares the default with, and the default's name in the tables.
DEFAULT_METHOD = "doloris"
BAR_METHOD = "anchor"


class DolorisMethod:
    """Doloris behind the same ``fit(adata, split, *, seed)`` / ``predict(...)`` interface as the baselines.

    Parameters
    ----------
    model_kwargs
        Passed to :class:`scdoloris.Doloris` (e.g. ``gene_graph``, ``n_hidden``).
    train_kwargs
        Passed to :meth:`scdoloris.Doloris.train` (e.g. ``max_steps``, ``batch_size``).
    predict_kwargs
        Passed to :meth:`scdoloris.Doloris.predict_perturbation` (e.g. ``mask_strategy``).
    name
        Name of the method in the tables.

    Examples
    --------
    Two ways of sampling the mask from one trained model, scored side by side:

    >>> doloris = DolorisMethod(train_kwargs={"max_steps": 500})
    >>> methods = [doloris, doloris.variant("doloris_bernoulli", mask_strategy="bernoulli")]
    >>> [method.name for method in methods]
    ['doloris', 'doloris_bernoulli']
    """

    def __init__(
        self,
        model_kwargs: Mapping | None = None,
        train_kwargs: Mapping | None = None,
        *,
        predict_kwargs: Mapping | None = None,
        name: str = "doloris",
    ):
        self.model_kwargs = dict(model_kwargs or {})
        self.train_kwargs = dict(train_kwargs or {})
        self.predict_kwargs = dict(predict_kwargs or {})
        self.name = name
        self.model = None
        self.fitted_seed: int | None = None

    def variant(self, name: str, **predict_kwargs) -> SharedDolorisMethod:
        """The same trained model predicting with other ``predict_kwargs``; list it after this method."""
        return SharedDolorisMethod(self, name, predict_kwargs)

    @staticmethod
    def registered(train: ad.AnnData, split: Split) -> ad.AnnData:
        """A copy of ``train`` set up for :class:`~scdoloris.Doloris` with ``split``'s keys (to train or load onto)."""
        from ..model import Doloris

        train = train.copy()
        Doloris.setup_anndata(
            train,
            perturbation_key=split.perturbation_key,
            control_value=split.control_value,
            cell_type_key=split.cell_type_key,
            dose_key=split.dose_key,
            smiles_key=split.smiles_key,
        )
        return train

    def fit(self, train: ad.AnnData, split: Split, *, seed: int) -> DolorisMethod:
        """Register ``train`` (a copy), build and train a model with ``seed``."""
        import scvi

        from ..model import Doloris

        train = self.registered(train, split)
        previous = scvi.settings.seed
        scvi.settings.seed = seed  # also seeds the initial weights
        try:
            self.model = Doloris(train, **self.model_kwargs)
            self.model.train(**{"enable_progress_bar": False, **self.train_kwargs, "seed": seed})
        finally:
            scvi.settings.seed = previous
        self.fitted_seed = seed
        return self

    def predict(
        self,
        perturbations: Sequence[str],
        *,
        cell_type: str | None,
        n_cells: int,
        seed: int,
        dose=None,
        smiles=None,
    ) -> ad.AnnData:
        """Generated cells of ``perturbations`` in ``cell_type`` (at ``dose``; ``smiles`` of molecules)."""
        return self._predict(perturbations, cell_type, n_cells, seed, dose, smiles, self.predict_kwargs)

    def _predict(self, perturbations, cell_type, n_cells, seed, dose, smiles, predict_kwargs) -> ad.AnnData:
        predicted = self.model.predict_perturbation(
            list(perturbations),
            cell_type=cell_type,
            n_cells=n_cells,
            seed=seed,
            dose=dose,
            smiles=smiles or None,
            **predict_kwargs,
        )
        anchoring = predicted.uns.get(ANCHORING_KEY)
        if anchoring is not None:
            # How many held-out calibration conditions each gate rests on, beside the gate.
            counts = getattr(self.model, "calibration_", {}).get("n_conditions", {})
            anchoring["n_calibration"] = [int(counts.get(kind, 0)) for kind in anchoring["kind"]]
        return predicted


class SharedDolorisMethod:
    """Another prediction setting of a :class:`DolorisMethod`'s trained model (no second training).

    Built by :meth:`DolorisMethod.variant`; the runner must fit the parent first, on the same seed.

    Examples
    --------
    >>> import scdoloris as sd
    >>> doloris = sd.benchmark.DolorisMethod(train_kwargs={"max_steps": 500})
    >>> bernoulli = doloris.variant("doloris_bernoulli", mask_strategy="bernoulli")
    >>> bernoulli.parent is doloris, bernoulli.predict_kwargs
    (True, {'mask_strategy': 'bernoulli'})

    Fitting it before its parent is an error (the runner fits methods in list order):

    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> split = sd.benchmark.singles_to_doubles(adata)
    >>> bernoulli.fit(split.train_data(adata), split, seed=0)
    Traceback (most recent call last):
    ...
    ValueError: 'doloris_bernoulli' shares 'doloris''s model: list 'doloris' before it.
    """

    def __init__(self, parent: DolorisMethod, name: str, predict_kwargs: Mapping):
        self.parent = parent
        self.name = name
        self.predict_kwargs = dict(predict_kwargs)

    def fit(self, train: ad.AnnData, split: Split, *, seed: int) -> SharedDolorisMethod:
        """Check that the parent was fitted on this seed (methods are fitted in list order)."""
        if self.parent.model is None or self.parent.fitted_seed != seed:
            raise ValueError(f"{self.name!r} shares {self.parent.name!r}'s model: list {self.parent.name!r} before it.")
        return self

    def predict(
        self,
        perturbations: Sequence[str],
        *,
        cell_type: str | None,
        n_cells: int,
        seed: int,
        dose=None,
        smiles=None,
    ) -> ad.AnnData:
        """Generated cells from the parent's model with this variant's settings."""
        kwargs = {**self.parent.predict_kwargs, **self.predict_kwargs}
        return self.parent._predict(perturbations, cell_type, n_cells, seed, dose, smiles, kwargs)


class BaselineMethod:
    """A :mod:`scdoloris.baselines` class behind the runner's interface.

    Parameters
    ----------
    name
        Name of the method in the tables.
    factory
        Called without arguments to make a fresh, unfitted baseline at each ``fit``.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> split = sd.benchmark.singles_to_doubles(adata)
    >>> method = sd.benchmark.BaselineMethod("additive", sd.baselines.Additive)
    >>> method = method.fit(split.train_data(adata), split, seed=0)
    >>> method.predict(["G001+G002"], cell_type=None, n_cells=10, seed=0).shape
    (10, 20)
    """

    def __init__(self, name: str, factory: Callable[[], object], *, doses: str | None = "labels"):
        if doses not in ("labels", "native", None):
            raise ValueError(f"`doses` must be 'labels', 'native' or None, got {doses!r}.")
        self.name = name
        self.factory = factory
        self.doses = doses
        self.fitted = None

    def not_applicable(self, split: Split) -> str | None:
        """Why this baseline does not apply to ``split`` (``None`` when it does).

        With ``doses=None`` a baseline has no meaning on dosed conditions (e.g. additive: a
        ``"drug@dose"`` label has no trained components to add), and the tables say so instead of
        listing a failure per condition.
        """
        if split.dose_key is not None and self.doses is None:
            return "not applicable to conditions with doses"
        if split.dose_key is None and self.doses == "native":
            return "needs conditions with doses"
        return None

    def fit(self, train: ad.AnnData, split: Split, *, seed: int) -> BaselineMethod:
        """Fit a fresh baseline on ``train``; with doses, each (perturbation, dose) is its own label.

        A baseline made with ``doses="native"`` is given the dose column instead (``dose_key``).
        """
        key = split.perturbation_key
        extra = {}
        if split.dose_key is not None and self.doses == "native":
            extra = {"dose_key": split.dose_key}
        elif split.dose_key is not None:
            train = train.copy()
            train.obs[DOSED_LABEL] = _dosed_labels(train, split)
            key = DOSED_LABEL
        self.fitted = self.factory().fit(
            train, perturbation_key=key, control_value=split.control_value, cell_type_key=split.cell_type_key, **extra
        )
        return self

    def predict(
        self,
        perturbations: Sequence[str],
        *,
        cell_type: str | None,
        n_cells: int,
        seed: int,
        dose=None,
        smiles=None,
    ) -> ad.AnnData:
        """Predicted cells of ``perturbations`` in ``cell_type`` (at ``dose``)."""
        if dose is not None and self.doses == "native":
            return self.fitted.predict(list(perturbations), cell_type=cell_type, n_cells=n_cells, seed=seed, dose=dose)
        if dose is not None:
            doses = [dose] * len(perturbations) if np.ndim(dose) == 0 else list(dose)
            perturbations = [_dosed(p, d) for p, d in zip(perturbations, doses, strict=True)]
        return self.fitted.predict(list(perturbations), cell_type=cell_type, n_cells=n_cells, seed=seed)


DOSED_LABEL = "_perturbation_at_dose"


def _dosed(perturbation: str, dose: float) -> str:
    """The label of ``perturbation`` at ``dose``, each component dosed (``"A@100+B@100"``), as the model's anchor."""
    return dosed_label(perturbation, float(dose))


def _dosed_labels(adata: ad.AnnData, split: Split) -> pd.Categorical:
    """Labels ``"drug@dose"``; unperturbed cells (control label or dose 0) keep the control label."""
    labels = adata.obs[split.perturbation_key].astype(str).to_numpy()
    doses = adata.obs[split.dose_key].to_numpy(dtype=np.float64)
    control = split.control_values[0]
    unperturbed = np.isin(labels, split.control_values) | (doses == 0)
    return pd.Categorical([control if u else _dosed(p, d) for p, d, u in zip(labels, doses, unperturbed, strict=True)])


def default_methods(
    *,
    model_kwargs: Mapping | None = None,
    train_kwargs: Mapping | None = None,
    gene_graph="auto",
    doses: bool = False,
) -> list:
    """Doloris (its default and ``preset="paper"``) and every baseline: anchor, no change, mean shift, additive, linear.

    With ``doses=True`` (drugs at doses) also the nearest-dose baseline
    (:class:`scdoloris.baselines.NearestDose`: the same drug at its nearest measured dose, or at the
    same dose in the other cell types); additive and linear are then listed as not applicable.

    Parameters
    ----------
    model_kwargs
        Passed to :class:`scdoloris.Doloris` (``gene_graph`` is set from ``gene_graph``).
    train_kwargs
        Passed to :meth:`scdoloris.Doloris.train`.
    gene_graph
        Gene-graph prior of Doloris and of the linear baseline.
    doses
        Whether the split's conditions have doses.

    Returns
    -------
    list
        The methods, ready for :func:`run_benchmark`; nothing is fitted yet. The Anchor, the bar
        the default is compared with in every table, comes right after Doloris' two presets.

    Examples
    --------
    >>> import scdoloris as sd
    >>> methods = sd.benchmark.default_methods(train_kwargs={"max_steps": 500})
    >>> [method.name for method in methods]
    ['doloris', 'doloris_paper', 'anchor', 'no_change', 'mean_shift', 'additive', 'linear']
    """
    model_kwargs = {"gene_graph": gene_graph, **(model_kwargs or {})}
    methods = [
        DolorisMethod(model_kwargs=model_kwargs, train_kwargs=train_kwargs),
        DolorisMethod(
            model_kwargs={**model_kwargs, "preset": "paper"}, train_kwargs=train_kwargs, name="doloris_paper"
        ),
        BaselineMethod(BAR_METHOD, baselines.Anchor),
        BaselineMethod("no_change", baselines.NoChange),
        BaselineMethod("mean_shift", baselines.MeanShift),
        BaselineMethod("additive", baselines.Additive, doses=None),
        BaselineMethod("linear", lambda: baselines.Linear(gene_graph=gene_graph), doses=None),
    ]
    if doses:
        methods.append(BaselineMethod("nearest_dose", baselines.NearestDose, doses="native"))
    return methods


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


def score_condition(
    predicted: ad.AnnData,
    real: ad.AnnData,
    control: ad.AnnData,
    gene_sets: Mapping[str, Sequence[str] | None],
    *,
    metric_names: Sequence[str] = DEFAULT_METRICS,
    reference_shift: pd.Series | np.ndarray | None = None,
    floor_cache: dict | None = None,
) -> list[dict]:
    r"""Every metric over every gene set for one condition (log1p scale).

    Besides the metrics of :mod:`scdoloris.metrics`, three columns put the E-distance and the
    Pearson delta in context:

    - ``"e_distance_floor"``: :func:`scdoloris.metrics.e_distance_floor` of the real cells for as
      many predicted cells as given, the expected E-distance of a perfect generator of the real
      distribution, :math:`\hat\delta (1/n + 1/m)`;
    - ``"e_distance_excess"``: ``e_distance - e_distance_floor``; near 0 (or below) the prediction
      is as good as a fresh sample of the real distribution, and the condition cannot be won;
    - ``"pearson_delta_centred"``: the Pearson correlation over genes of
      :math:`\bar x - \bar c - s` and :math:`\bar y - \bar c - s` (predicted, real and control
      means; :math:`s` = ``reference_shift``, the average shift of the training perturbations): does
      the prediction get the perturbation-specific part of the shift, beyond the average response?
      ``nan`` without a ``reference_shift``, or where a centred change is constant over genes
      (a prediction equal to control plus the average shift).

    Parameters
    ----------
    predicted, real, control
        Predicted cells, real cells of the condition and control cells of its cell type.
    gene_sets
        ``{name: genes}``; ``None`` scores all genes.
    metric_names
        Metrics to compute, among ``"e_distance"``, ``"e_distance_floor"``, ``"e_distance_excess"``,
        ``"emd"``, ``"mean_rmse"``, ``"pearson_delta"`` and ``"pearson_delta_centred"``.
    reference_shift
        Average shift of the training perturbations in the condition's cell type over the genes of
        ``real`` (a Series is aligned by gene name), e.g. from
        :meth:`scdoloris.baselines.MeanShift.predict_shift`; needed by ``"pearson_delta_centred"``.
    floor_cache
        A dict kept by the caller for this condition (same real cells): floors are stored in it by
        ``(gene set, number of predicted cells)`` and reused, as they do not depend on the method.

    Returns
    -------
    list of dict
        One ``{"gene_set", "metric", "value"}`` row per gene set and metric.

    Raises
    ------
    KeyError
        If a gene set names genes that are not in ``real``, or ``reference_shift`` lacks some.
    ValueError
        For an unknown metric.

    Examples
    --------
    The real cells scored as their own prediction:

    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> real = adata[adata.obs["perturbation"] == "G001+G002"]
    >>> control = adata[adata.obs["perturbation"] == "control"]
    >>> gene_sets = {"all": None, "first5": list(adata.var_names[:5])}
    >>> rows = sd.benchmark.score_condition(real, real, control, gene_sets, metric_names=["e_distance", "mean_rmse"])
    >>> [(row["gene_set"], row["metric"], round(row["value"], 6)) for row in rows]
    [('all', 'e_distance', 0.0), ('all', 'mean_rmse', 0.0), ('first5', 'e_distance', 0.0), ('first5', 'mean_rmse', 0.0)]

    With the floor columns and the centred correlation (the reference shift of a mean-shift
    baseline fitted on the other perturbations): the real cells are below the floor (their
    E-distance to themselves is 0) and get the perturbation-specific shift exactly:

    >>> train = adata[adata.obs["perturbation"] != "G001+G002"]
    >>> shift = sd.baselines.MeanShift().fit(train).predict_shift(["G001+G002"]).iloc[0]
    >>> names = ["e_distance", "e_distance_floor", "e_distance_excess", "pearson_delta_centred"]
    >>> rows = sd.benchmark.score_condition(
    ...     real, real, control, {"all": None}, metric_names=names, reference_shift=shift
    ... )
    >>> values = {row["metric"]: row["value"] for row in rows}
    >>> values["e_distance_excess"] == -values["e_distance_floor"] < 0, round(values["pearson_delta_centred"], 6)
    (True, 1.0)
    """
    metric_names = [name for name in metric_names if name not in RANK_METRICS]  # made across conditions
    unknown = [name for name in metric_names if name not in DEFAULT_METRICS]
    if unknown:
        raise ValueError(f"Unknown metric {unknown[0]!r}; choose from {sorted(DEFAULT_METRICS)}.")
    shift = None
    if reference_shift is not None:
        if isinstance(reference_shift, pd.Series):
            missing = real.var_names.difference(reference_shift.index)
            if len(missing):
                raise KeyError(f"reference_shift lacks {len(missing)} gene(s) of the data, e.g. {list(missing[:5])}.")
            shift = reference_shift.reindex(real.var_names).to_numpy(dtype=np.float64)
        else:
            shift = np.asarray(reference_shift, dtype=np.float64).ravel()
            if shift.shape != (real.n_vars,):
                raise ValueError(f"reference_shift must have one value per gene ({real.n_vars}), got {shift.shape}.")
    cache = {} if floor_cache is None else floor_cache
    rows = []
    for gene_set, genes in gene_sets.items():
        columns = slice(None) if genes is None else real.var_names.get_indexer(list(genes))
        if genes is not None and (columns < 0).any():
            raise KeyError(f"Genes of set {gene_set!r} are not in the data.")
        p = to_dense(predicted[:, columns].X)
        r = to_dense(real[:, columns].X)
        c = to_dense(control[:, columns].X)
        ref = None if shift is None else shift[columns]
        names = [n for n in metric_names if genes is None or n not in ALL_GENES_ONLY]
        values = _gene_set_scores(names, p, r, c, ref, cache, gene_set)
        rows.extend({"gene_set": gene_set, "metric": name, "value": values[name]} for name in names)
    return rows


def _gene_set_scores(names, p, r, c, shift, cache: dict, gene_set: str) -> dict[str, float]:
    """The metrics ``names`` on one gene set (dense predicted, real and control cells), each computed once."""
    values: dict[str, float] = {}

    def value(name: str) -> float:
        if name not in values:
            if name in METRICS:
                result = METRICS[name](p, r, c)
            elif name == "e_distance_floor":
                key = (gene_set, p.shape[0])
                if key not in cache:
                    cache[key] = metrics.e_distance_floor(r, n_predicted=p.shape[0])
                result = cache[key]
            elif name == "e_distance_excess":
                result = value("e_distance") - value("e_distance_floor")
            elif name in ("n_de_predicted", "n_de_real", "de_overlap"):
                # The real cells' DE calls do not depend on the method: made once per condition.
                key = (gene_set, "de_real")
                if key not in cache:
                    cache[key] = wilcoxon_adjusted_pvalues(r, c) < DE_ALPHA
                real_de = cache[key]
                predicted_de = wilcoxon_adjusted_pvalues(p, c) < DE_ALPHA
                values["n_de_predicted"] = float(predicted_de.sum())
                values["n_de_real"] = float(real_de.sum())
                overlap = (predicted_de & real_de).sum() / real_de.sum() if real_de.any() else float("nan")
                values["de_overlap"] = float(overlap)
                result = values[name]
            else:  # pearson_delta_centred: the Pearson delta from control shifted by the reference shift
                result = float("nan") if shift is None else metrics.pearson_delta(p, r, c + shift)
            values[name] = float(result)
        return values[name]

    return {name: value(name) for name in names}


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


def _rank_rows(ranked: dict, metric_names: Sequence[str]) -> list[dict]:
    """PerturBench's rank metric of each condition among the conditions of one cell type (all genes).

    Undefined with one condition (e.g. a held-out cell type with one stimulation): no rows.
    """
    wanted = [name for name in RANK_METRICS if name in metric_names]
    if len(ranked) < 2 or not wanted:
        return []
    predicted = {key: to_dense(p) for key, (_, p, _) in ranked.items()}
    real = {key: to_dense(r) for key, (_, _, r) in ranked.items()}
    rows = []
    for name in wanted:
        ranks = metrics.rank_metric(predicted, real, distance=name.removeprefix("rank_"))
        # In the order of ``real``, which is that of ``ranked``.
        for (ids, _, _), value in zip(ranked.values(), ranks.to_numpy(), strict=True):
            rows.append(ids | {"gene_set": "all", "metric": name, "value": float(value)})
    return rows


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


def _de_gene_sets(adata, split: Split, perturbation: str, cell_type, sizes, dose=None) -> dict:
    """``{"all": None, "DE20": [...], ...}`` for one condition, DE from the real cells."""
    sets: dict = {"all": None}
    sizes = [n for n in sizes if n < adata.n_vars]  # a "top n" of all genes would repeat "all"
    if not sizes:
        return sets
    real = split.cells(adata, perturbation, cell_type, dose)
    control = split.controls(adata, cell_type)
    both = ad.concat({"condition": real, "control": control}, label="_group", index_unique="-")
    largest = metrics.de_genes(both, groupby="_group", group="condition", reference="control", n=max(sizes))
    for n in sizes:
        sets[f"DE{n}"] = list(largest[:n])
    return sets
