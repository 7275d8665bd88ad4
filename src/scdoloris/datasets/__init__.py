"""Datasets shipped with scdoloris (``sd.datasets``)."""

from ._norman import norman2019_subset
from ._synthetic import synthetic_perturbations

__all__ = ["norman2019_subset", "synthetic_perturbations"]
