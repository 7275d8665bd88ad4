"""PerturBench's rank metric: how well each prediction is told apart from the predictions of other conditions."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import pandas as pd

from ._distances import _sum_cross_distances, _sum_within_distances
from ._inputs import Matrix, MatrixLike, as_matrix, check_genes, column_mean

_DISTANCES = ("mse", "e_distance")

# Distances equal up to this relative rounding error are ties (identical predictions give equal
# distances bit for bit; this only absorbs the rounding of sums taken in another order).
_TIE_RTOL = 1e-12


def _distance_matrix(pred: list[Matrix], real: list[Matrix], distance: str) -> np.ndarray:
    """``d[q, p]``: distance between the prediction of condition ``q`` and the real cells of condition ``p``."""
    k = len(pred)
    d = np.empty((k, k))
    if distance == "mse":
        mean_pred = np.stack([column_mean(x) for x in pred])
        for p, y in enumerate(real):
            d[:, p] = np.mean((mean_pred - column_mean(y)) ** 2, axis=1)
        return d
    # E-distance (paper Eq. 20), as sd.metrics.e_distance computes it, with each within-set term once.
    within_pred = [_sum_within_distances(x) / (x.shape[0] * x.shape[0]) for x in pred]
    within_real = [_sum_within_distances(y) / (y.shape[0] * y.shape[0]) for y in real]
    for q, x in enumerate(pred):
        for p, y in enumerate(real):
            cross = _sum_cross_distances(x, y) / (x.shape[0] * y.shape[0])
            d[q, p] = max(2.0 * cross - within_pred[q] - within_real[p], 0.0)
    return d


def rank_metric(
    predicted: Mapping[Hashable, MatrixLike],
    real: Mapping[Hashable, MatrixLike],
    *,
    distance: str = "mse",
) -> pd.Series:
    r"""PerturBench's rank metric: the normalised rank of each condition's own prediction.

    For every condition :math:`p` of :math:`N`, the predictions of all conditions are ordered by
    their distance to the real cells of :math:`p`, and the rank metric is the position of
    :math:`p`'s own prediction, divided by :math:`N`:

    .. math::

        \mathrm{rank}_p = \frac{1}{N} \Big( \#\{q : d(\hat{X}_q, Y_p) < d(\hat{X}_p, Y_p)\}
            + \tfrac{1}{2}\, \#\{q \ne p : d(\hat{X}_q, Y_p) = d(\hat{X}_p, Y_p)\} \Big),

    with :math:`\hat{X}_q` the predicted and :math:`Y_p` the real cells. 0: the own prediction is
    the closest to the real cells; the largest value, :math:`(N - 1)/N`, means it is the farthest.
    A method that predicts the same cells for every condition (e.g. control plus the average
    shift) cannot be told apart: all its distances tie and every condition scores exactly
    :math:`(N - 1) / (2N)` (0.45 for 10 conditions), whatever its distances are. Predictions
    swapped between conditions score high. The metric catches what per-condition distances miss:
    low errors that come from predicting the average response.

    Definition from Wu et al., "PerturBench: Benchmarking machine learning models for cellular
    perturbation analysis" (NeurIPS 2025 Datasets and Benchmarks; repository
    ``altoslabs/perturbench``, ``src/perturbench/analysis/benchmarks/metrics.py``, ``rank_helper``
    on the matrix of ``pairwise_metric_helper`` with predictions as rows and the real conditions as
    columns, and ``evaluation.py``, ``Evaluation.evaluate_rank``): for each real condition the
    predictions are sorted by distance, the 0-based position of the own prediction is divided by
    the number of conditions. PerturBench breaks ties at random (it shuffles before sorting); here
    a tie counts one half, the expectation of that random tie-break, so the result is
    deterministic. Distances equal up to a relative ``1e-12`` are ties.

    Parameters
    ----------
    predicted
        ``{condition: predicted cells}``; each value of shape ``(n_q, n_genes)``: a dense array, a
        scipy sparse matrix/array, or an :class:`~anndata.AnnData` (its ``.X`` is used).
    real
        ``{condition: real cells}``, with the same conditions as ``predicted``.
    distance
        ``"mse"``: mean over genes of the squared difference of the mean expression profiles (what
        PerturBench ranks with ``metric="mse"``; subtracting one control mean from both, as its
        ``logfc`` aggregation does, leaves it unchanged). ``"e_distance"``:
        :func:`e_distance` (paper Eq. 20) between the cell sets; the cost is :math:`N^2` cross
        terms of ``O(n_q m_p n_genes)`` each.

    Returns
    -------
    pandas.Series
        The rank of each condition, indexed by condition in the order of ``real``, named
        ``"rank"``; ``nan`` for a single condition, where the rank is undefined.

    Raises
    ------
    ValueError
        If the conditions of ``predicted`` and ``real`` differ, there are none, ``distance`` is
        unknown, or an input is not 2-D, has no cells, or has another number of genes.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> real = {c: np.full((3, 2), float(i)) for i, c in enumerate("abcd")}
    >>> sd.metrics.rank_metric(real, real).tolist()  # perfect predictions
    [0.0, 0.0, 0.0, 0.0]
    >>> same = {c: np.ones((3, 2)) for c in "abcd"}  # one prediction for all: (N - 1) / (2N)
    >>> sd.metrics.rank_metric(same, real).tolist()
    [0.375, 0.375, 0.375, 0.375]
    """
    if distance not in _DISTANCES:
        raise ValueError(f"`distance` must be one of {list(_DISTANCES)}, got {distance!r}.")
    conditions = list(real)
    if set(predicted) != set(conditions):
        only_pred = [c for c in predicted if c not in real]
        only_real = [c for c in conditions if c not in predicted]
        raise ValueError(
            "`predicted` and `real` must have the same conditions; only in `predicted`: "
            f"{only_pred[:5]}, only in `real`: {only_real[:5]}."
        )
    if not conditions:
        raise ValueError("`predicted` and `real` have no conditions.")
    pred = [as_matrix(predicted[c], f"predicted[{c!r}]") for c in conditions]
    obs = [as_matrix(real[c], f"real[{c!r}]") for c in conditions]
    named = {f"predicted[{c!r}]": x for c, x in zip(conditions, pred, strict=True)}
    named.update({f"real[{c!r}]": y for c, y in zip(conditions, obs, strict=True)})
    check_genes(named)
    k = len(conditions)
    if k == 1:
        return pd.Series([np.nan], index=pd.Index(conditions, tupleize_cols=False), name="rank")
    d = _distance_matrix(pred, obs, distance)
    own = np.diag(d)  # own[p] = d(pred_p, real_p)
    tol = _TIE_RTOL * np.abs(own)
    closer = (d < own - tol).sum(axis=0)
    ties = (np.abs(d - own) <= tol).sum(axis=0) - 1  # minus the own prediction
    return pd.Series((closer + 0.5 * ties) / k, index=pd.Index(conditions, tupleize_cols=False), name="rank")
