"""Evaluation of perturbation predictions (``sd.metrics``).

Distances between a predicted and a real set of cells (:func:`e_distance`, paper Eq. 20, with the
perfect-generator floor :func:`e_distance_floor`; :func:`emd`, Eq. 21; :func:`mean_rmse`;
:func:`pearson_delta`), DE gene sets (:func:`de_genes`), differential expression of predicted cells
in scanpy's format (:func:`differential_expression`) and a per-condition evaluation table
(:func:`evaluate`).
"""

from ._de import de_genes, differential_expression
from ._distances import e_distance, e_distance_floor, emd, mean_rmse, pearson_delta
from ._evaluate import evaluate

__all__ = [
    "de_genes",
    "differential_expression",
    "e_distance",
    "e_distance_floor",
    "emd",
    "evaluate",
    "mean_rmse",
    "pearson_delta",
]
