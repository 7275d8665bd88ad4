"""Plots of predicted vs real cells (``sd.pl``)."""

from ._pca import prediction_pca

__all__ = ["prediction_pca"]
