"""The methods a benchmark compares, behind one ``fit`` / ``predict`` interface: Doloris and the baselines."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from .. import baselines
from ..perturbation import dosed_label
from ._splits import Split

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
