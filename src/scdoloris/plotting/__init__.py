"""Plots of predicted vs real cells, of the mask model and of training (``sd.pl``).

Every plot follows scanpy's conventions: ``ax=`` draws into given Axes, ``save=`` writes the figure
(a path, or ``True`` for ``scanpy.settings.figdir``), ``return_fig=True`` returns the Figure, and
``show=False`` returns the Axes. Only matplotlib is used, so they work with the Agg backend.

- :func:`prediction_pca`: predicted and real cells in the real cells' PCA (or a joint UMAP).
- :func:`de_gene_violins`: per-gene distributions of top DE genes, control vs real vs predicted.
- :func:`mask_calibration`: predicted activation probability vs real fraction of expressing cells.
- :func:`metric_bars`: mean score per method and metric, from a benchmark or a metrics table.
- :func:`history`: training curves from ``model.history``.
"""

from ._calibration import mask_calibration, mask_calibration_table
from ._distributions import de_gene_violins
from ._history import history
from ._metrics import metric_bars
from ._pca import prediction_pca

__all__ = [
    "de_gene_violins",
    "history",
    "mask_calibration",
    "mask_calibration_table",
    "metric_bars",
    "prediction_pca",
]
