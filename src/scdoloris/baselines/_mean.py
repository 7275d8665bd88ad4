"""Mean-shift baselines: no change, the average training shift, and additive combinations."""

from __future__ import annotations

import numpy as np

from ._base import Baseline


class NoChange(Baseline):
    """The "no change" baseline: real control cells stand for every perturbation.

    The predicted shift is zero, so :meth:`~Baseline.predict` returns the drawn control cells unchanged
    (not clipped). Any perturbation label is accepted: the prediction does not depend on it.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> baseline = sd.baselines.NoChange().fit(adata, perturbation_key="perturbation", control_value="control")
    >>> pred = baseline.predict(["G001", "anything"], n_cells=5)
    >>> pred.n_obs, bool(pred.obs["is_predicted"].all())
    (10, True)
    """

    name = "no_change"

    def __init__(self):
        super().__init__(clip=False)

    def _shift(self, components, labels, cell_type):
        return np.zeros((len(labels), len(self.genes_)))

    def _params(self) -> dict:
        return {}


class MeanShift(Baseline):
    """Control plus the mean shift of the training perturbations.

    The shift of a training perturbation is its mean expression minus the control mean (within a
    cell type when ``cell_type_key`` is given); this baseline predicts the average of those shifts,
    every training perturbation (single or combination) weighted equally, for any perturbation
    label: it is the answer of a model that knows that cells were perturbed but not how. A cell
    type with controls but no perturbed training cells (the unseen-cell-type task) gets the average
    shift over all training perturbations of the other cell types.

    Parameters
    ----------
    clip
        Clip shifted expression at 0.

    Attributes
    ----------
    mean_shift_
        The average shift per cell type (cell types x genes).
    overall_shift_
        The average over all perturbed training conditions, for cell types without any.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> baseline = sd.baselines.MeanShift().fit(adata)
    >>> pred = baseline.predict(["G001+G002"], n_cells=5, seed=0)
    >>> pred.shape
    (5, 20)
    """

    name = "mean_shift"

    def _fit(self, means, control_means, shifts):
        if len(shifts) == 0:
            raise ValueError("MeanShift needs at least one perturbed training condition; only controls were given.")
        self.mean_shift_ = shifts.groupby(level="cell_type").mean()
        self.overall_shift_ = shifts.mean(axis=0)

    def _shift(self, components, labels, cell_type):
        if cell_type not in self.mean_shift_.index:
            return np.tile(self.overall_shift_.to_numpy(), (len(labels), 1))
        return np.tile(self.mean_shift_.loc[cell_type].to_numpy(), (len(labels), 1))


class Additive(Baseline):
    """Control plus the sum of the single perturbations' shifts.

    A single perturbation seen in training gets its own measured shift (mean minus control mean,
    within its cell type); a combination ``"A+B"`` gets ``shift(A) + shift(B)``, whether or not the
    combination itself was measured. Component order and control components (``"A+ctrl"``) do not
    matter.

    Parameters
    ----------
    clip
        Clip shifted expression at 0.

    Raises
    ------
    ValueError
        At prediction, naming every component that was never measured as a single perturbation in
        the cell type asked for (the additive model has nothing to add for it).

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=20, n_perturbed_genes=4, n_doubles=1)
    >>> singles = adata[adata.obs["condition_type"] != "double"].copy()
    >>> baseline = sd.baselines.Additive().fit(singles, perturbation_key="perturbation", control_value="control")
    >>> shift = baseline.predict_shift(["G001+G002", "G001", "G002"])
    >>> bool(np.allclose(shift.iloc[0], shift.iloc[1] + shift.iloc[2]))
    True
    """

    name = "additive"

    def _shift(self, components, labels, cell_type):
        if cell_type not in set(self.shifts_.index.get_level_values("cell_type")):
            raise ValueError(
                f"Additive predicts from single perturbations measured in a cell type; cell type {cell_type!r} had "
                "only controls in training. sd.baselines.Anchor transfers shifts from other cell types."
            )
        known = set(self.shifts_.xs(cell_type, level="cell_type").index)
        unknown = sorted({c for comps in components for c in comps if c not in known})
        if unknown:
            elsewhere = sorted({c for c in unknown if c in set(self.shifts_.index.get_level_values("perturbation"))})
            hint = f" ({elsewhere} were measured in other cell types only)" if elsewhere else ""
            raise ValueError(
                f"Additive predicts from single perturbations measured in training; {unknown} were never measured "
                f"as a single perturbation in cell type {cell_type!r}{hint}."
            )
        table = self.shifts_.xs(cell_type, level="cell_type")
        return np.stack([table.loc[list(comps)].to_numpy().sum(axis=0) for comps in components])
