"""Metrics on the mean change from control: cosine of the change, L2 error on the most expressed genes."""

from __future__ import annotations

import numpy as np

from ._distances import aligned_matrices
from ._inputs import MatrixLike, column_mean


def _means(pred: MatrixLike, real: MatrixLike, control: MatrixLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean profiles (float64) of ``pred``, ``real`` and ``control``, on one gene axis of at least one gene."""
    mats = aligned_matrices({"pred": pred, "real": real, "control": control})
    return column_mean(mats["pred"]), column_mean(mats["real"]), column_mean(mats["control"])


def cosine_delta(pred: MatrixLike, real: MatrixLike, control: MatrixLike) -> float:
    r"""Cosine similarity between the predicted and the real mean change from control.

    .. math::

        \cos\big(\bar{x}^{\mathrm{pred}} - \bar{x}^{\mathrm{ctrl}},\;
                 \bar{x}^{\mathrm{real}} - \bar{x}^{\mathrm{ctrl}}\big)
        = \frac{\langle \Delta^{\mathrm{pred}}, \Delta^{\mathrm{real}} \rangle}
               {\lVert \Delta^{\mathrm{pred}} \rVert_2 \, \lVert \Delta^{\mathrm{real}} \rVert_2},

    where :math:`\bar{x}` is the mean over cells of each gene. On log1p data the change is a
    difference of means of log1p expression, often called the "log fold change", so this is the
    "cosine of the log fold change". Unlike :func:`pearson_delta` the changes are not centred: a
    change that moves every gene by the same amount is not ignored. Means are accumulated in
    float64; sparse inputs are never densified.

    Parameters
    ----------
    pred
        Predicted cells, shape ``(n, n_genes)``: a dense array, a scipy sparse matrix/array, or an
        :class:`~anndata.AnnData` (its ``.X`` is used).
    real
        Real perturbed cells, shape ``(m, n_genes)``, same kinds as ``pred``.
    control
        Control (unperturbed) cells, shape ``(k, n_genes)``, same kinds as ``pred``. AnnData inputs
        are matched by gene name to the first AnnData among them (different genes are refused).

    Returns
    -------
    float
        The cosine, in ``[-1, 1]`` (1: same direction of change); ``nan`` if either change is zero
        (up to the rounding of the means), e.g. a prediction equal to control, where it is undefined.

    Raises
    ------
    ValueError
        If an input is not 2-D or has no cells, there are no genes, the gene counts differ, or
        AnnData inputs have different genes.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> control = np.zeros((3, 2))
    >>> real = control + np.array([1.0, 0.0])
    >>> pred = control + np.array([1.0, 1.0])
    >>> round(sd.metrics.cosine_delta(pred, real, control), 6)  # 1 / sqrt(2)
    0.707107
    >>> sd.metrics.cosine_delta(control, real, control)
    nan
    """
    mean_pred, mean_real, mean_control = _means(pred, real, control)
    # A change that is zero up to rounding (e.g. the control cells in another order) has no direction:
    # its norm is compared with the rounding error of the differences of the means, as in pearson_delta.
    eps = 64 * np.finfo(np.float64).eps * np.sqrt(len(mean_control))
    units = []
    for mean in (mean_pred, mean_real):
        delta = mean - mean_control
        norm = np.sqrt(np.dot(delta, delta))
        if not norm > eps * max(np.abs(mean).max(), np.abs(mean_control).max()):
            return float("nan")
        units.append(delta / norm)
    return float(np.clip(np.dot(units[0], units[1]), -1.0, 1.0))


def top_expressed_l2(pred: MatrixLike, real: MatrixLike, control: MatrixLike, *, n_genes: int = 1000) -> float:
    r"""L2 distance between the predicted and the real mean change on the most expressed genes.

    The protocol of Ahlmann-Eltze, Huber & Anders (Nature Methods 2025, "Deep-learning-based gene
    perturbation effect prediction does not yet outperform simple linear baselines"):

    .. math::

        L_2 = \Big( \sum_{g \in T} \big(\Delta^{\mathrm{pred}}_g - \Delta^{\mathrm{real}}_g\big)^2 \Big)^{1/2}
            = \Big( \sum_{g \in T} \big(\bar{x}^{\mathrm{pred}}_g - \bar{x}^{\mathrm{real}}_g\big)^2 \Big)^{1/2},

    with :math:`\Delta = \bar{x} - \bar{x}^{\mathrm{ctrl}}` the mean change from control and
    :math:`T` the ``n_genes`` genes with the highest mean expression **in the control cells**
    (ties broken by gene order). This follows their code (repository
    ``const-ae/linear_perturbation_prediction-Paper``, ``notebooks/single_perturbation_analysis.Rmd``
    and ``benchmark/README.md``): genes are ranked by the pseudobulk of the control condition
    (``expr_rank``, ``rank(desc(observed), ties = "first")`` on the ``"ctrl"`` ground truth), the
    top 1000 are kept, and the error is ``sqrt(sum((prediction - observed)^2))`` of the mean
    profiles, which equals the distance between the changes since both share the control mean.
    Their means are of log-normalised expression, as here. Lower is better; 0 is a perfect mean.

    Parameters
    ----------
    pred
        Predicted cells, shape ``(n, n_genes)``: a dense array, a scipy sparse matrix/array, or an
        :class:`~anndata.AnnData` (its ``.X`` is used).
    real
        Real perturbed cells, shape ``(m, n_genes)``, same kinds as ``pred``.
    control
        Control (unperturbed) cells, shape ``(k, n_genes)``, same kinds as ``pred``; they choose
        the genes. AnnData inputs are matched by gene name to the first AnnData among them
        (different genes are refused).
    n_genes
        Number of most expressed genes to use (1000 in the paper). With fewer genes in the data,
        all genes are used.

    Returns
    -------
    float
        The L2 distance (not divided by the number of genes, so it grows with ``n_genes``).

    Raises
    ------
    ValueError
        If an input is not 2-D or has no cells, there are no genes, the gene counts differ,
        AnnData inputs have different genes, or ``n_genes`` is not a
        positive integer.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> control = np.array([[3.0, 1.0, 2.0]])  # genes ranked by control mean: 0, 2, 1
    >>> real = control + np.array([1.0, 5.0, 0.0])
    >>> pred = control + np.array([0.0, 0.0, 2.0])
    >>> sd.metrics.top_expressed_l2(pred, real, control, n_genes=2)  # sqrt(1**2 + 2**2), gene 1 left out
    2.23606797749979
    """
    if isinstance(n_genes, bool) or not isinstance(n_genes, int | np.integer) or n_genes < 1:
        raise ValueError(f"`n_genes` must be a positive integer, got {n_genes!r}.")
    mean_pred, mean_real, mean_control = _means(pred, real, control)
    # Highest control mean first; the stable sort keeps ties in gene order (R's ties = "first").
    top = np.argsort(-mean_control, kind="stable")[: int(n_genes)]
    diff = mean_pred[top] - mean_real[top]
    return float(np.sqrt(np.dot(diff, diff)))
