"""Baselines that Doloris must beat (``sd.baselines``).

All baselines share one scikit-learn-like interface on AnnData: ``fit(adata, *, perturbation_key,
control_value, cell_type_key, layer)``, then ``predict(perturbations, *, cell_type, n_cells, seed)``
returns cells like :meth:`scdoloris.Doloris.predict_perturbation` (real control cells shifted by
the predicted mean shift) and ``predict_shift(perturbations, *, cell_type)`` the mean shifts.

- :class:`NoChange`: control cells unchanged.
- :class:`MeanShift`: control plus the average shift of the training perturbations.
- :class:`Additive`: control plus the sum of the single perturbations' shifts.
- :class:`Anchor`: the best measured shift for each condition, with fallbacks calibrated on the
  training data (no change, the average shift, additive, or transfer from other cell types).
- :class:`Linear`: the linear PCA-embedding model of Ahlmann-Eltze, Huber & Anders (2025).
- :class:`NearestDose`: for dosed drug data, the same drug's measured shift at its nearest measured
  dose in the cell type, else at that dose in the other cell types (``predict`` takes ``dose=``).
- :func:`no_change`: the older functional form of the "no change" baseline.
"""

from ._anchor import Anchor
from ._base import Baseline
from ._linear import Linear
from ._mean import Additive, MeanShift, NoChange
from ._nearest_dose import NearestDose
from ._no_change import no_change

__all__ = ["Additive", "Anchor", "Baseline", "Linear", "MeanShift", "NearestDose", "NoChange", "no_change"]
