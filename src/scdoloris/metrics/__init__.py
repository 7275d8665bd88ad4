"""Evaluation of perturbation predictions (``sd.metrics``).

Distances between a predicted and a real set of cells (:func:`e_distance`, paper Eq. 20, with the
perfect-generator floor :func:`e_distance_floor`; :func:`emd`, Eq. 21; :func:`mean_rmse`;
:func:`pearson_delta`), DE gene sets (:func:`de_genes`), differential expression of predicted cells
in scanpy's format (:func:`differential_expression`) and a per-condition evaluation table
(:func:`evaluate`).

The field's other standard metrics, as pure functions of cells x genes inputs (see
``docs/evaluation.md``): the cosine of the mean change (:func:`cosine_delta`), the L2 error of the
mean change on the most expressed genes (:func:`top_expressed_l2`, Ahlmann-Eltze et al. 2025), the
per-gene fraction of zeros (:func:`zero_fraction_error`) and spread (:func:`spread_ratio`), the
agreement of Wilcoxon DE calls (:func:`de_agreement`) and PerturBench's rank metric across
conditions (:func:`rank_metric`).
"""

from ._change import cosine_delta, top_expressed_l2
from ._de import de_agreement, de_genes, differential_expression
from ._de import wilcoxon_adjusted_pvalues as wilcoxon_adjusted_pvalues  # used by scdoloris.benchmark
from ._distances import e_distance, e_distance_floor, emd, mean_rmse, pearson_delta
from ._distribution import spread_ratio, zero_fraction_error
from ._evaluate import evaluate
from ._rank import rank_metric

__all__ = [
    "cosine_delta",
    "de_agreement",
    "de_genes",
    "differential_expression",
    "e_distance",
    "e_distance_floor",
    "emd",
    "evaluate",
    "mean_rmse",
    "pearson_delta",
    "rank_metric",
    "spread_ratio",
    "top_expressed_l2",
    "zero_fraction_error",
]
