"""Per-gene shape of the predicted cells vs the real ones: fraction of zeros and spread."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..data import to_dense
from ._inputs import Matrix, MatrixLike, as_matrix, check_genes

# Cells per densified block, bounded by entries (~32 MB of float64), as in _distances.
_BLOCK_ENTRIES = 4_000_000


def _row_blocks(mat: Matrix) -> list[slice]:
    size = max(1, _BLOCK_ENTRIES // max(1, mat.shape[1]))
    return [slice(start, min(start + size, mat.shape[0])) for start in range(0, mat.shape[0], size)]


def _nonzero_counts(mat: Matrix) -> np.ndarray:
    """Number of cells with a non-zero value, per gene (explicitly stored zeros of sparse inputs count as zeros)."""
    if sp.issparse(mat):
        csr = mat.tocsr()
        if not csr.has_canonical_format:
            csr = csr.copy()  # never modify the caller's matrix
            csr.sum_duplicates()
        return np.bincount(csr.indices[csr.data != 0], minlength=mat.shape[1])
    return np.count_nonzero(np.asarray(mat) != 0, axis=0)


def _column_variance(mat: Matrix) -> np.ndarray:
    """Unbiased (``ddof=1``) variance of every gene in float64, by a two-pass computation over blocks of cells.

    A variance below the rounding error of the mean (a constant gene such as ``0.1`` in every cell) is
    returned as exactly 0, so constant genes count as having no spread.
    """
    n = mat.shape[0]
    total = np.zeros(mat.shape[1])
    for rows in _row_blocks(mat):
        total += to_dense(mat[rows]).sum(axis=0)
    mean = total / n
    squares = np.zeros(mat.shape[1])
    for rows in _row_blocks(mat):
        squares += ((to_dense(mat[rows]) - mean) ** 2).sum(axis=0)
    var = squares / (n - 1)
    var[var <= (64 * np.finfo(np.float64).eps * np.abs(mean)) ** 2] = 0.0
    return var


def zero_fraction_error(pred: MatrixLike, real: MatrixLike) -> float:
    r"""Mean over genes of the absolute difference in the fraction of cells where a gene is zero.

    .. math::

        \frac{1}{G} \sum_{g=1}^{G} \big| z_g(X) - z_g(Y) \big|, \qquad
        z_g(X) = \frac{1}{n} \#\{i : x_{ig} = 0\},

    with :math:`X` the predicted and :math:`Y` the real cells. It checks the dropout structure of
    the prediction, which mean-based metrics ignore: a prediction that adds a small shift to every
    gene of control cells has no zeros left (error close to the real fraction of zeros), and one
    made of real cells of the condition scores about 0. In ``[0, 1]``; lower is better. Exact
    zeros only (a stored zero of a sparse matrix is a zero).

    Parameters
    ----------
    pred
        Predicted cells, shape ``(n, n_genes)``: a dense array, a scipy sparse matrix/array, or an
        :class:`~anndata.AnnData` (its ``.X`` is used).
    real
        Real cells, shape ``(m, n_genes)``, same kinds as ``pred``.

    Returns
    -------
    float
        The mean absolute difference of the per-gene zero fractions.

    Raises
    ------
    ValueError
        If an input is not 2-D, has no cells or no genes, or the gene counts differ.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> real = np.array([[0.0, 1.0], [0.0, 2.0]])  # zero fractions 1 and 0
    >>> pred = np.array([[0.0, 0.0], [0.5, 2.0]])  # zero fractions 0.5 and 0.5
    >>> sd.metrics.zero_fraction_error(pred, real)
    0.5
    """
    x = as_matrix(pred, "pred")
    y = as_matrix(real, "real")
    check_genes({"pred": x, "real": y})
    if x.shape[1] == 0:
        raise ValueError("`pred` and `real` have no genes.")
    zeros_pred = 1.0 - _nonzero_counts(x) / x.shape[0]
    zeros_real = 1.0 - _nonzero_counts(y) / y.shape[0]
    return float(np.mean(np.abs(zeros_pred - zeros_real)))


def spread_ratio(pred: MatrixLike, real: MatrixLike) -> float:
    r"""Geometric mean over genes of the ratio of the predicted to the real standard deviation.

    .. math::

        \exp\Big( \frac{1}{|S|} \sum_{g \in S} \log \frac{s_g(X)}{s_g(Y)} \Big), \qquad
        S = \{g : s_g(X) > 0 \text{ and } s_g(Y) > 0\},

    with :math:`s_g` the standard deviation of gene ``g`` over cells (``ddof=1``, so sets of
    different sizes compare without bias in the variance), :math:`X` the predicted and :math:`Y`
    the real cells. 1 means the right spread; below 1 the prediction is too narrow, above 1 too
    wide. A geometric mean treats halving and doubling alike. It catches predictions with the
    wrong cell-to-cell variation, which mean-based metrics cannot see: control cells plus one
    shift vector have exactly the control's spread (often narrower than that of the perturbed
    cells), and a prediction with no spread at all (a mean profile repeated over cells) scores 0.

    Genes where only one of the two sets varies are left out: in sparse log1p data they are rare
    genes whose few non-zero values all fell in one set (17 of 500 genes, on average, between two
    halves of the same 100 real cells of a Norman 2019 condition), and a single one would make the
    geometric mean 0 or infinite. Their zeros are what :func:`zero_fraction_error` measures. If the
    prediction varies on none of the genes where the real cells vary, the ratio is 0. A variance
    below the rounding error of the gene's mean (a constant gene) counts as no spread.

    Parameters
    ----------
    pred
        Predicted cells, shape ``(n, n_genes)``: a dense array, a scipy sparse matrix/array, or an
        :class:`~anndata.AnnData` (its ``.X`` is used). Densified one block of cells at a time.
    real
        Real cells, shape ``(m, n_genes)``, same kinds as ``pred``.

    Returns
    -------
    float
        The geometric mean ratio; 0 if the prediction varies on none of the genes where the real
        cells vary; ``nan`` if either set has fewer than 2 cells or no gene has real spread.

    Raises
    ------
    ValueError
        If an input is not 2-D, has no cells, or the gene counts differ.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> real = np.array([[0.0, 0.0, 5.0], [2.0, 4.0, 5.0]])  # stds sqrt(2), 2 sqrt(2), 0
    >>> pred = np.array([[0.0, 1.0, 0.0], [4.0, 3.0, 1.0]])  # ratios 2 and 1/2; gene 2 left out
    >>> round(sd.metrics.spread_ratio(pred, real), 12)
    1.0
    >>> sd.metrics.spread_ratio(np.ones((2, 3)), real)  # no spread at all
    0.0
    """
    x = as_matrix(pred, "pred")
    y = as_matrix(real, "real")
    check_genes({"pred": x, "real": y})
    if x.shape[0] < 2 or y.shape[0] < 2:
        return float("nan")
    var_pred = _column_variance(x)
    var_real = _column_variance(y)
    if not (var_real > 0).any():
        return float("nan")
    both = (var_real > 0) & (var_pred > 0)
    if not both.any():
        return 0.0
    # log(sd_pred / sd_real) = (log var_pred - log var_real) / 2
    return float(np.exp(np.mean(0.5 * (np.log(var_pred[both]) - np.log(var_real[both])))))
