"""Distances between predicted and real cells (``sd.metrics``)."""

from ._distances import edistance, emd, rmse_mean

__all__ = ["edistance", "emd", "rmse_mean"]
