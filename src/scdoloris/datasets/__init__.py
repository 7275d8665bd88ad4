"""Datasets shipped with scdoloris and loaders for published benchmark sets (``sd.datasets``)."""

from ._download import ChecksumError
from ._kang import kang2018_subset
from ._norman import norman2019_subset
from ._published import adamson2016, norman2019, sciplex3
from ._synthetic import synthetic_perturbations
from ._synthetic_drugs import drug_similarity, synthetic_drug_perturbations

__all__ = [
    "ChecksumError",
    "adamson2016",
    "drug_similarity",
    "kang2018_subset",
    "norman2019",
    "norman2019_subset",
    "sciplex3",
    "synthetic_drug_perturbations",
    "synthetic_perturbations",
]
