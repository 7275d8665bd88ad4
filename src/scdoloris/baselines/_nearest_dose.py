"""The nearest-dose baseline: a drug's measured shift at its nearest measured dose, or at that dose elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import check_doses
from ..perturbation import split_perturbation
from ..prediction import PredictedCells, Request, predicted_anndata, resolve_cell_types, resolve_request
from ._base import CONTROL_KEY, Baseline

#: What :meth:`NearestDose.kind` answers, from the most to the least specific rule.
KINDS = (
    "measured",
    "nearest_dose",
    "other_cell_types",
    "other_cell_types_nearest_dose",
    "dose_average",
    "cell_type_average",
    "average",
)
# Two doses are the same when they differ by less than this share (a float32 dose column against a
# float64 request differs in the 8th digit).
_DOSE_RTOL = 1e-6
# Two measured doses are equally near to the asked one when their log10 distances differ by less than this.
_TIE_ATOL = 1e-9
# obs column of the internal labels, one per (drug, dose), that the shared fit groups cells by.
_LABEL = "_nearest_dose_label"


def _same_dose(doses: np.ndarray, dose: float) -> np.ndarray:
    """Which of ``doses`` equal ``dose`` (up to :data:`_DOSE_RTOL`)."""
    return np.isclose(doses, dose, rtol=_DOSE_RTOL, atol=0.0)


def _nearest(doses: np.ndarray, dose: float) -> np.ndarray:
    """Positions in ``doses`` (positive) nearest to ``dose`` in log10: one, or a lower and a higher one on a tie."""
    distance = np.abs(np.log10(doses) - np.log10(dose))
    return np.flatnonzero(distance <= distance.min() + _TIE_ATOL)


class NearestDose(Baseline):
    """The same drug's measured shift at the nearest measured dose, else at that dose in the other cell types.

    A baseline for dosed drug data (sci-Plex-like: drugs given at several doses in several cell
    types). Fitting reduces every training condition (drug, cell type, dose) to its measured mean
    shift (mean expression minus the control mean of its cell type); cells of dose 0 or with a
    control label are the controls. A condition (drug, cell type ``t``, dose ``d``) is answered by
    the first rule that applies, its name given by :meth:`kind` (and :meth:`kinds`):

    1. ``"measured"``: the condition itself was trained; its measured shift.
    2. ``"nearest_dose"``: the drug was measured in ``t`` at other doses; its shift at the measured
       dose nearest to ``d`` in log10 dose. On an exact tie (a lower and a higher dose equally far
       in log10, e.g. 10 and 1000 for 100) the plain average of the two shifts.
    3. ``"other_cell_types"``: the drug was not measured in ``t`` but at ``d`` in other cell types;
       the plain average of its shifts there, every such cell type weighted equally.
    4. ``"other_cell_types_nearest_dose"``: the drug was measured only in other cell types, at other
       doses; in each of those cell types its shift at the nearest measured dose (rule 2, ties
       averaged), then the plain average over those cell types.
    5. ``"dose_average"``: the drug was never measured; the plain average of the shifts of the
       training drugs measured at ``d`` in ``t``.
    6. ``"cell_type_average"``: no training drug was measured at ``d`` in ``t``; the average shift of
       all training conditions of ``t`` (:class:`MeanShift`'s answer).
    7. ``"average"``: ``t`` had only control cells in training; the average shift of all training
       conditions (:class:`MeanShift`'s answer for such a cell type).

    Two doses are the same when they differ by less than a relative 1e-6; two measured doses tie
    when their log10 distances to ``d`` differ by less than 1e-9. No parameter is fitted: it is a
    baseline, the answer of a model that interpolates nothing, so that a model must do better than
    looking up the nearest measurement. Combinations of drugs (labels with ``"+"``) are out of
    scope.

    :meth:`predict` shifts real control cells like every baseline, drawing the same control cells
    for the same ``seed`` and cell types as the other baselines (and as Doloris), so predictions
    differ only by the shift. It needs ``dose=``, as do :meth:`predict_shift` and :meth:`kind`.

    Parameters
    ----------
    clip
        Clip shifted expression at 0 (log1p data is never negative).

    Attributes
    ----------
    shifts_
        Measured shift of every training condition, index ``(perturbation, cell_type, dose)``.
    condition_means_
        Mean expression of every training condition and of the controls (perturbation: the first
        control label, dose 0), same index.
    n_cells_
        Cells of each of these conditions.
    control_means_
        Mean control expression per cell type (cell types x genes).
    mean_shift_
        The average shift per cell type with perturbed training cells (rule 6).
    overall_shift_
        The average shift of all training conditions (rule 7).
    dose_key_
        The ``obs`` column of doses fitted on.

    Examples
    --------
    Three drugs at three doses in three cell types; hold out one drug's middle dose in one cell type
    and that drug altogether in another:

    >>> import numpy as np
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_drug_perturbations(
    ...     n_genes=20, n_drugs=3, doses=(10.0, 100.0, 1000.0), n_cells_per_condition=5, n_control_cells=20
    ... )
    >>> drug = str(adata.uns["synthetic_drugs"]["drugs"].index[0])
    >>> obs = adata.obs
    >>> held = (obs["perturbation"] == drug) & (
    ...     ((obs["cell_type"] == "A549") & (obs["dose"] == 100.0)) | (obs["cell_type"] == "K562")
    ... )
    >>> baseline = sd.baselines.NearestDose().fit(adata[~held.to_numpy()].copy(), cell_type_key="cell_type")
    >>> baseline.kind(drug, cell_type="A549", dose=100.0)  # 10 and 1000 are equally near: their average
    'nearest_dose'
    >>> shift = baseline.predict_shift([drug], cell_type="A549", dose=[100.0])
    >>> measured = baseline.shifts_.xs((drug, "A549"), level=("perturbation", "cell_type"))
    >>> bool(np.allclose(shift.iloc[0], measured.mean(axis=0)))
    True
    >>> baseline.kinds([drug], cell_type=["A549", "K562", "MCF7"], dose=100.0).tolist()
    ['nearest_dose', 'other_cell_types', 'measured']
    >>> baseline.kind(drug, cell_type="K562", dose=300.0), baseline.kind("NEW", cell_type="K562", dose=100.0)
    ('other_cell_types_nearest_dose', 'dose_average')
    >>> pred = baseline.predict([drug], cell_type="K562", n_cells=4, dose=100.0)
    >>> pred.shape, pred.obs["dose"].tolist()
    ((4, 20), [100.0, 100.0, 100.0, 100.0])
    """

    name = "nearest_dose"

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        adata: AnnData,
        *,
        perturbation_key: str = "perturbation",
        control_value: str | Sequence[str] = "control",
        cell_type_key: str | None = None,
        dose_key: str = "dose",
        layer: str | None = None,
    ) -> Self:
        """Fit the baseline: the measured mean shift of every training (drug, cell type, dose).

        Parameters
        ----------
        adata
            Control and drug-treated training cells (log1p expression), dense, sparse or backed.
        perturbation_key
            ``obs`` column of drug names; a control label, or a dose of 0, marks unperturbed cells.
        control_value
            Label(s) of unperturbed cells.
        cell_type_key
            Optional ``obs`` column of cell types; shifts are computed within each cell type.
            Without it all cells form one cell type named ``"0"``, as in Doloris.
        dose_key
            ``obs`` column of doses: numbers, finite and not negative on the treated cells (any
            unit; nearness is measured in log10 dose).
        layer
            Layer with the expression; ``adata.X`` by default.

        Returns
        -------
        NearestDose
            The fitted baseline (``self``).

        Raises
        ------
        ValueError
            If a key or layer is missing, doses are not numbers, missing or negative, a label is a
            combination (``"+"``), no drug-treated cell is found, no control cell is found, or a cell
            type has no control cells.
        """
        if not isinstance(adata, AnnData):
            raise ValueError(f"adata must be an AnnData, got {type(adata).__name__}.")
        for name, key in [
            ("perturbation_key", perturbation_key),
            ("cell_type_key", cell_type_key),
            ("dose_key", dose_key),
        ]:
            if key is not None and key not in adata.obs:
                raise ValueError(f"{name}={key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}).")
        if layer is not None and layer not in adata.layers:
            raise ValueError(f"layer={layer!r} is not a layer of adata (layers: {list(adata.layers)}).")
        controls = [control_value] if isinstance(control_value, str) else [str(c) for c in control_value]
        labels = adata.obs[perturbation_key].astype(str).to_numpy()
        drug_of = {label: split_perturbation(label, controls) for label in set(labels)}
        combinations = sorted(label for label, parts in drug_of.items() if len(parts) > 1)
        if combinations:
            raise ValueError(
                f"NearestDose answers single drugs; adata.obs[{perturbation_key!r}] has combinations "
                f"{combinations[:5]}. Fit it on the single-drug cells."
            )
        labelled_control = np.isin(labels, [label for label, parts in drug_of.items() if not parts])
        check_doses(adata.obs[dose_key][~labelled_control], dose_key)
        doses = adata.obs[dose_key].to_numpy(dtype=np.float64)
        unperturbed = labelled_control | (doses == 0)
        if not unperturbed.any():
            raise ValueError(
                f"NearestDose needs control cells: none is labelled {control_value!r} in "
                f"adata.obs[{perturbation_key!r}] or has dose 0 in adata.obs[{dose_key!r}]."
            )
        if unperturbed.all():
            raise ValueError(
                f"NearestDose needs drug-treated training cells (a drug label and a dose above 0 in "
                f"adata.obs[{perturbation_key!r}] and adata.obs[{dose_key!r}]); only controls were given."
            )

        # One internal label per (drug, dose); the shared fit (Baseline.fit) groups cells by it and cell type.
        treated = np.flatnonzero(~unperturbed)
        codes, pairs = pd.factorize(pd.MultiIndex.from_arrays([labels[treated], doses[treated]]))
        keys = np.array([f"{drug_of[label][0]}@{float(dose)!r}" for label, dose in pairs], dtype=object)
        parts = {key: (drug_of[label][0], float(dose)) for key, (label, dose) in zip(keys, pairs, strict=True)}
        internal = np.full(adata.n_obs, controls[0], dtype=object)
        internal[treated] = keys[codes]
        obs = pd.DataFrame({_LABEL: internal}, index=adata.obs_names)
        if cell_type_key is not None:
            obs[cell_type_key] = adata.obs[cell_type_key].to_numpy()
            if isinstance(adata.obs[cell_type_key].dtype, pd.CategoricalDtype):
                obs[cell_type_key] = obs[cell_type_key].astype(adata.obs[cell_type_key].dtype)
        X = adata.X if layer is None else adata.layers[layer]
        # The same matrix (not copied) under the internal labels; only the grouping differs.
        grouped = AnnData(X=X, obs=obs, var=pd.DataFrame(index=adata.var_names))
        super().fit(grouped, perturbation_key=_LABEL, control_value=controls, cell_type_key=cell_type_key)

        # The fitted state refers to the user's data, as every baseline's does.
        self.adata_ = adata
        self.layer_ = layer
        self.perturbation_key_ = perturbation_key
        self.dose_key_ = dose_key
        self.control_values_ = controls

        def index(old: pd.MultiIndex) -> pd.MultiIndex:
            rows = [
                (controls[0], t, 0.0) if key == CONTROL_KEY else (parts[key][0], t, parts[key][1]) for key, t in old
            ]
            return pd.MultiIndex.from_tuples(rows, names=["perturbation", "cell_type", "dose"])

        self.shifts_.index = index(self.shifts_.index)
        self.condition_means_.index = index(self.condition_means_.index)
        self.n_cells_.index = index(self.n_cells_.index)
        self.shifts_ = self.shifts_.sort_index()
        self.mean_shift_ = self.shifts_.groupby(level="cell_type").mean()
        self.overall_shift_ = self.shifts_.mean(axis=0)

        # Lookup tables: (drug, cell type) -> (doses, shifts) and cell type -> (drugs' doses, shifts).
        S = self.shifts_.to_numpy(dtype=np.float64)
        drugs = self.shifts_.index.get_level_values("perturbation").to_numpy()
        types = self.shifts_.index.get_level_values("cell_type").to_numpy()
        dose_values = self.shifts_.index.get_level_values("dose").to_numpy(dtype=np.float64)
        self._measured: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for (drug, t), rows in pd.Series(np.arange(len(S))).groupby([drugs, types]).groups.items():
            rows = np.asarray(rows)
            self._measured[str(drug), str(t)] = (dose_values[rows], S[rows])
        self._types_of: dict[str, list[str]] = {}
        for drug, t in self._measured:
            self._types_of.setdefault(drug, []).append(t)
        self._in_type = {str(t): (dose_values[types == t], S[types == t]) for t in set(types)}
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "_measured"):
            raise ValueError(f"This {type(self).__name__} is not fitted yet; call fit(adata, ..., dose_key=...) first.")

    # ------------------------------------------------------------------ the rules
    def _at_nearest(self, drug: str, cell_type: str, dose: float) -> np.ndarray:
        """The drug's shift in ``cell_type`` at its measured dose nearest to ``dose`` (a tie: the average)."""
        doses, shifts = self._measured[drug, cell_type]
        return shifts[_nearest(doses, dose)].mean(axis=0)

    def _answer(self, drug: str, cell_type: str, dose: float) -> tuple[str, np.ndarray]:
        """The rule that answers (``drug``, ``cell_type``, ``dose``) and its shift."""
        if (drug, cell_type) in self._measured:
            doses, shifts = self._measured[drug, cell_type]
            same = _same_dose(doses, dose)
            if same.any():
                return "measured", shifts[np.argmin(np.abs(doses - dose))]
            return "nearest_dose", self._at_nearest(drug, cell_type, dose)
        others = [t for t in self._types_of.get(drug, []) if t != cell_type]
        at_dose = []
        for t in others:
            doses, shifts = self._measured[drug, t]
            same = _same_dose(doses, dose)
            if same.any():
                at_dose.append(shifts[np.argmin(np.abs(doses - dose))])
        if at_dose:
            return "other_cell_types", np.mean(at_dose, axis=0)
        if others:
            return "other_cell_types_nearest_dose", np.mean([self._at_nearest(drug, t, dose) for t in others], axis=0)
        if cell_type not in self._in_type:
            return "average", self.overall_shift_.to_numpy(dtype=np.float64)
        doses, shifts = self._in_type[cell_type]
        same = _same_dose(doses, dose)
        if same.any():
            return "dose_average", shifts[same].mean(axis=0)
        return "cell_type_average", self.mean_shift_.loc[cell_type].to_numpy(dtype=np.float64)

    def _request(self, perturbations: str | Sequence[str], dose) -> Request:
        """The distinct (drug, dose) entries asked for, each a single drug at one positive dose."""
        if dose is None:
            raise ValueError("NearestDose predicts a drug at a dose: give dose= (one number, or one per perturbation).")
        request = resolve_request(perturbations, self.control_values_, dose=dose)
        combinations = [p for p, c in zip(request.perturbations, request.components, strict=True) if len(c) > 1]
        if combinations:
            raise ValueError(
                f"NearestDose answers single drugs, not combinations such as {combinations[:3]} (labels with '+')."
            )
        for p, d in zip(request.perturbations, request.doses, strict=True):
            if np.ndim(d) != 0:
                raise ValueError(f"NearestDose takes one number as the dose of {p!r}, got {d!r}.")
            if float(d) == 0.0:
                raise ValueError(f"Dose 0 of {p!r} is unperturbed (the controls); ask for a dose above 0.")
        return request

    def _cell_type(self, cell_type: str | None) -> str:
        if cell_type is None:
            if len(self.cell_types_) > 1:
                raise ValueError(f"Name the cell type; this NearestDose knows several: {self.cell_types_}.")
            return self.cell_types_[0]
        (t,) = resolve_cell_types(str(cell_type), self.cell_types_)
        return t

    def _shift(self, components, labels, cell_type):
        raise ValueError("NearestDose needs the dose: call predict_shift(perturbations, cell_type=..., dose=...).")

    # ------------------------------------------------------------------ prediction
    def kind(self, perturbation: str, *, cell_type: str | None = None, dose: float | None = None) -> str:
        """Which rule answers ``perturbation`` at ``dose`` in ``cell_type`` (see the class description).

        Parameters
        ----------
        perturbation
            A drug name.
        cell_type
            A training cell type; may be left out when there is only one.
        dose
            The dose, above 0 (required).

        Returns
        -------
        str
            One of :data:`KINDS`: ``"measured"``, ``"nearest_dose"``, ``"other_cell_types"``,
            ``"other_cell_types_nearest_dose"``, ``"dose_average"``, ``"cell_type_average"`` or ``"average"``.

        Raises
        ------
        ValueError
            Without a dose or with dose 0, for a combination, an unknown cell type, or when not fitted.
        """
        self._check_fitted()
        t = self._cell_type(cell_type)
        request = self._request([perturbation], dose)
        return self._answer(request.components[0][0], t, float(request.doses[0]))[0]

    def _answers(self, request: Request, types: list[str]) -> list[list[tuple[str, np.ndarray]]]:
        """Per cell type in ``types``, the rule and shift of every entry of ``request``."""
        return [
            [self._answer(c[0], t, float(d)) for c, d in zip(request.components, request.doses, strict=True)]
            for t in types
        ]

    def _table(self, perturbations, cell_type, dose) -> tuple[Request, list[str], list[list[tuple[str, np.ndarray]]]]:
        """The request, the cell types and, per cell type, the rule and shift of every entry."""
        self._check_fitted()
        request = self._request(perturbations, dose)
        types = resolve_cell_types(cell_type, self.cell_types_)
        return request, types, self._answers(request, types)

    @staticmethod
    def _index(request: Request, types: list[str]) -> pd.MultiIndex:
        rows = [(p, t, float(d)) for t in types for p, d in zip(request.perturbations, request.doses, strict=True)]
        return pd.MultiIndex.from_tuples(rows, names=["perturbation", "cell_type", "dose"])

    def kinds(
        self,
        perturbations: str | Sequence[str],
        *,
        cell_type: str | Sequence[str] | None = None,
        dose: float | Sequence[float] | None = None,
    ) -> pd.Series:
        """Which rule answers each condition, indexed as :meth:`predict_shift`'s result (for tables by kind).

        Parameters
        ----------
        perturbations
            Drug names.
        cell_type
            Cell type(s) to predict in; ``None``: every training cell type.
        dose
            One dose (above 0) for all, or one per perturbation (required).

        Returns
        -------
        pandas.Series
            The kind (one of :data:`KINDS`) per ``(perturbation, cell_type, dose)``.
        """
        request, types, answers = self._table(perturbations, cell_type, dose)
        kinds = [kind for block in answers for kind, _ in block]
        return pd.Series(kinds, index=self._index(request, types), name="kind", dtype=object)

    def predict_shift(
        self,
        perturbations: str | Sequence[str],
        *,
        cell_type: str | Sequence[str] | None = None,
        dose: float | Sequence[float] | None = None,
    ) -> pd.DataFrame:
        """Predicted mean shift (treated minus control mean expression) per drug, cell type and dose.

        Parameters
        ----------
        perturbations
            Drug names (a combination ``"A+B"`` is refused).
        cell_type
            Cell type(s) to predict in; ``None``: every training cell type.
        dose
            One dose (above 0) for all perturbations, or one per perturbation (required).

        Returns
        -------
        pandas.DataFrame
            DataFrame with a ``(perturbation, cell_type, dose)`` index (cell types outermost, as
            asked) and the training genes as columns; :meth:`kinds` says which rule gave each row.

        Raises
        ------
        ValueError
            Without a dose, with dose 0 or a dose list of the wrong length, for a combination, an
            unknown cell type, or when the baseline is not fitted.
        """
        request, types, answers = self._table(perturbations, cell_type, dose)
        values = np.stack([shift for block in answers for _, shift in block])
        return pd.DataFrame(values, index=self._index(request, types), columns=self.genes_)

    def predict(
        self,
        perturbations: str | Sequence[str],
        *,
        cell_type: str | Sequence[str] | None = None,
        n_cells: int = 100,
        seed: int = 0,
        dose: float | Sequence[float] | None = None,
        adata: AnnData | None = None,
        include_sources: bool = False,
    ) -> AnnData:
        """Predict cells: real control cells shifted by the predicted mean shift of each drug at its dose.

        Parameters
        ----------
        perturbations
            Drug names.
        cell_type
            Cell type(s) to predict in; ``None``: every training cell type.
        n_cells
            Cells per drug and cell type, drawn from that cell type's training controls with ``seed``:
            the same cells for every drug and dose, and the same draw as the other baselines'
            :meth:`~Baseline.predict` and :meth:`scdoloris.Doloris.predict_perturbation`.
        seed
            Seed of the draw.
        dose
            One dose (above 0) for all perturbations, or one per perturbation (required).
        adata
            Control cells to shift instead (one prediction per cell and perturbation); their cell type
            comes from the fitted cell-type column when present, else from ``cell_type``.
        include_sources
            Put the source control cells first in the result (their control label, ``is_predicted``
            ``False``).

        Returns
        -------
        anndata.AnnData
            Dense float32 ``X`` (clipped at 0 unless ``clip=False``), the training genes as ``var``,
            ``obs`` with ``perturbation``, ``cell_type``, ``dose``, ``control_cell`` and
            ``is_predicted``, also under the fitted column names; ``uns["baseline"]`` names the baseline.

        Raises
        ------
        ValueError
            As :meth:`predict_shift`, and for bad source cells.
        """
        self._check_fitted()
        request = self._request(perturbations, dose)
        sources, x = self._source_cells(adata, cell_type, n_cells, seed)
        types = list(dict.fromkeys(sources.cell_types))
        answers = self._answers(request, types)
        code = {t: i for i, t in enumerate(types)}
        codes = np.array([code[t] for t in sources.cell_types], dtype=np.int64)
        blocks = []
        for i in range(len(request.perturbations)):
            shift = np.stack([answers[j][i][1] for j in range(len(types))])
            block = x + shift[codes]
            blocks.append((np.clip(block, 0.0, None) if self.clip else block).astype(np.float32))
        cells = PredictedCells(np.concatenate(blocks), uns={"baseline": {"name": self.name}})
        obs_keys = {"perturbation": self.perturbation_key_, "cell_type": self.cell_type_key_, "dose": self.dose_key_}
        return predicted_anndata(
            cells,
            request,
            sources,
            self.adata_.var,
            obs_keys=obs_keys,
            source_x=x if include_sources else None,
            control_label=self.control_values_[0],
        )
