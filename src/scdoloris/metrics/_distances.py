"""Distances between a predicted and an observed set of cells (paper Eq. 20-21, RMSE, Pearson delta)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial.distance import cdist, pdist

from ..data import to_dense
from ._inputs import Matrix, MatrixLike, as_matrix, check_genes, column_mean

# Upper bound on the number of float64 entries of one block: of a pairwise-distance block and of
# one densified block of cells (or genes, for the EMD). 4e6 entries are ~32 MB, so whatever the
# number of cells (10^4 x 10^4 pairs or more), peak memory stays at a few such blocks.
_BLOCK_ENTRIES = 4_000_000


def _rows_per_block(n_genes: int) -> int:
    """Cells per block so that a distance block and a densified cell block both fit the budget."""
    return max(1, min(math.isqrt(_BLOCK_ENTRIES), _BLOCK_ENTRIES // max(1, n_genes)))


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def gene_positions(adata: AnnData, var_names: pd.Index, name: str, reference: str = "pred") -> np.ndarray | None:
    """Columns of ``adata`` in the order of ``var_names`` (those of ``reference``); ``None`` when already identical.

    Raises
    ------
    ValueError
        If the two gene sets differ, or names are duplicated so that they cannot be matched.
    """
    if adata.var_names.equals(var_names):
        return None
    if not var_names.is_unique or not adata.var_names.is_unique:
        raise ValueError(
            f"`{name}` and `{reference}` have different genes (and gene names are not unique, so cannot align)."
        )
    positions = adata.var_names.get_indexer(var_names)
    missing = var_names[positions < 0]
    if len(missing) or adata.n_vars != len(var_names):
        raise ValueError(
            f"`{name}` and `{reference}` must have the same genes; {len(missing)} genes of `{reference}` are missing "
            f"from `{name}` (e.g. {list(missing[:5])}) and `{name}` has {adata.n_vars} genes vs {len(var_names)}."
        )
    return positions


def aligned_matrices(inputs: dict[str, MatrixLike], *, sparse_format: str = "csr") -> dict[str, Matrix]:
    """The inputs (name -> cells) as matrices on one gene axis, with at least one cell and one gene each.

    When two or more inputs are :class:`~anndata.AnnData`, their genes are matched by name to those
    of the first one, as :func:`scdoloris.metrics.evaluate` does: ``.X`` alone says nothing of which
    column is which gene, so the same cells with the genes in another order would otherwise score as
    different, and different genes with equal values as identical. Other inputs are matched by
    position (only their number of genes can be checked).

    Raises
    ------
    ValueError
        If an input is not 2-D or has no cells, AnnData inputs have different genes, the numbers of
        genes differ, or there are no genes: no metric is defined on zero genes, and a value such as
        an E-distance of 0 would read as a perfect score.
    """
    mats = {name: as_matrix(a, name, sparse_format=sparse_format) for name, a in inputs.items()}
    annotated = [name for name, a in inputs.items() if isinstance(a, AnnData)]
    if len(annotated) > 1:
        reference = annotated[0]
        for name in annotated[1:]:
            positions = gene_positions(inputs[name], inputs[reference].var_names, name, reference)
            if positions is not None:
                mats[name] = mats[name][:, positions]
    check_genes(mats)
    if next(iter(mats.values())).shape[1] == 0:
        names = [f"`{name}`" for name in mats]
        joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        raise ValueError(f"{joined} {'has' if len(names) == 1 else 'have'} no genes.")
    return mats


def _sum_cross_distances(a: Matrix, b: Matrix) -> float:
    """Sum of the Euclidean distances over all ``len(a) * len(b)`` pairs, computed block by block."""
    size = _rows_per_block(a.shape[1])
    total = 0.0
    b_blocks = _blocks(b.shape[0], size)
    for rows_a in _blocks(a.shape[0], size):
        block_a = to_dense(a[rows_a], contiguous=True)
        for rows_b in b_blocks:
            total += float(cdist(block_a, to_dense(b[rows_b], contiguous=True), metric="euclidean").sum())
    return total


def _sum_within_distances(a: Matrix) -> float:
    """Sum of the Euclidean distances over all ordered pairs ``(i, j)`` of rows of ``a``, incl. ``i == j``.

    Uses the symmetry of the distance: only blocks on and above the diagonal are computed.
    """
    blocks = _blocks(a.shape[0], _rows_per_block(a.shape[1]))
    total = 0.0
    for i, rows_i in enumerate(blocks):
        block_i = to_dense(a[rows_i], contiguous=True)
        # Diagonal block: each unordered pair once (pdist), the zero self-distances add nothing.
        total += 2.0 * float(pdist(block_i, metric="euclidean").sum())
        for rows_j in blocks[i + 1 :]:
            total += 2.0 * float(cdist(block_i, to_dense(a[rows_j], contiguous=True), metric="euclidean").sum())
    return total


def e_distance(X: MatrixLike, Y: MatrixLike, *, sqrt: bool = False) -> float:
    r"""Energy distance (E-distance) between two sets of cells, paper Eq. 20.

    .. math::

        E(X, Y) = \frac{2}{nm} \sum_{i=1}^{n} \sum_{j=1}^{m} \lVert x_i - y_j \rVert_2
                  - \frac{1}{n^2} \sum_{i,j=1}^{n} \lVert x_i - x_j \rVert_2
                  - \frac{1}{m^2} \sum_{i,j=1}^{m} \lVert y_i - y_j \rVert_2,

    with the Euclidean norm and means over *all* pairs, including ``i == j`` (the V-statistic).
    This quantity is non-negative, zero for identical sets and symmetric; it depends on the
    number of cells compared, so compare like with like.

    Pairwise distances are computed exactly (:func:`scipy.spatial.distance.cdist`, float64) in
    blocks of cells, so the ``n x m`` distance matrix is never built: memory stays bounded (tens of
    MB) for 10^4 x 10^4 cell pairs and beyond. Sparse inputs are densified one block at a time.
    The cost is ``O((n + m)^2 * n_genes)``.

    Parameters
    ----------
    X
        First set of cells (e.g. predicted), shape ``(n, n_genes)``: a dense array, a scipy sparse
        matrix/array, or an :class:`~anndata.AnnData` (its ``.X`` is used).
    Y
        Second set of cells (e.g. real), shape ``(m, n_genes)``, same kinds as ``X``. When both are
        AnnData, genes are matched by name (their order does not matter; different genes are refused).
    sqrt
        If ``False`` (default) return :math:`E(X, Y)` as defined in the paper (Eq. 20). If
        ``True`` return :math:`\sqrt{E(X, Y)}`, the quantity reported by the published reference
        code.

    Returns
    -------
    float
        The E-distance, or its square root if ``sqrt=True``. Tiny negative values caused by
        floating-point rounding (the exact value is never negative) are clipped to ``0.0``.

    Raises
    ------
    ValueError
        If an input is not 2-D or has no cells, there are no genes, the gene counts differ, or
        AnnData inputs have different genes.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(50, 10))
    >>> round(sd.metrics.e_distance(x, x), 10)
    0.0
    >>> d = sd.metrics.e_distance(x, x + 2.0)
    >>> d > 0
    True
    >>> bool(np.isclose(sd.metrics.e_distance(x, x + 2.0, sqrt=True), np.sqrt(d)))
    True
    """
    mats = aligned_matrices({"X": X, "Y": Y})
    xa, ya = mats["X"], mats["Y"]
    n, m = xa.shape[0], ya.shape[0]
    cross = _sum_cross_distances(xa, ya) / (n * m)
    within_x = _sum_within_distances(xa) / (n * n)
    within_y = _sum_within_distances(ya) / (m * m)
    value = max(2.0 * cross - within_x - within_y, 0.0)
    return float(np.sqrt(value)) if sqrt else float(value)


def e_distance_floor(real: MatrixLike, *, n_predicted: int, n_real: int | None = None) -> float:
    r"""Expected E-distance (Eq. 20) of a perfect generator: the floor no prediction can beat on average.

    A generator of the true distribution :math:`P` of the real cells that draws ``n`` cells, scored
    against ``m`` real cells with the V-statistic of :func:`e_distance`, has expectation

    .. math::

        \mathbb{E}\,E(X, Y) = \delta \left(\frac{1}{n} + \frac{1}{m}\right),
        \qquad \delta = \mathbb{E} \lVert x - x' \rVert_2, \quad x, x' \sim P \text{ independent}.

    Derivation: with :math:`X` (``n`` cells) and :math:`Y` (``m`` cells) independent samples of
    :math:`P`, every cross pair :math:`(x_i, y_j)` is a pair of independent draws, so the cross term
    :math:`\frac{2}{nm}\sum_{i,j} \lVert x_i - y_j \rVert` has expectation :math:`2\delta`. Of the
    :math:`n^2` ordered pairs of the within-:math:`X` mean, the :math:`n` pairs with :math:`i = j`
    are zero and the :math:`n(n-1)` others have expectation :math:`\delta`, so that term has
    expectation :math:`(1 - 1/n)\,\delta`; likewise :math:`(1 - 1/m)\,\delta` for :math:`Y`. Hence
    :math:`2\delta - (1 - 1/n)\delta - (1 - 1/m)\delta = \delta (1/n + 1/m)`.

    :math:`\delta` is estimated without bias by the mean distance over the :math:`m(m-1)` ordered
    pairs of *distinct* real cells (the U-statistic), computed exactly and block by block like
    :func:`e_distance`. An E-distance close to this floor means the prediction is as close to the
    real cells as a fresh sample of the same size from the real distribution would be.

    The same formula gives the expected E-distance between two random halves of the real cells
    (sizes :math:`h_1, h_2`): :math:`\delta (1/h_1 + 1/h_2)`, ``e_distance_floor(real,
    n_predicted=h1, n_real=h2)``. Averaged over random splits of fixed cells this identity is exact
    with the estimated :math:`\delta`, which makes a split-half check of the floor (example below).

    Parameters
    ----------
    real
        Real cells of the condition, shape ``(m, n_genes)``: a dense array, a scipy sparse
        matrix/array, or an :class:`~anndata.AnnData` (its ``.X`` is used); they estimate
        :math:`\delta`.
    n_predicted
        Number of predicted cells ``n`` scored against the real cells.
    n_real
        Number of real cells ``m`` the prediction is scored against; the number of rows of ``real``
        by default.

    Returns
    -------
    float
        The floor :math:`\hat\delta (1/n + 1/m)`; ``nan`` for fewer than two real cells, where
        :math:`\delta` cannot be estimated.

    Raises
    ------
    ValueError
        If ``real`` is not 2-D, has no cells or no genes, or ``n_predicted`` or ``n_real`` is below 1.

    Examples
    --------
    The mean E-distance of fresh samples of the real distribution matches the floor:

    >>> import numpy as np
    >>> import scdoloris as sd
    >>> rng = np.random.default_rng(0)
    >>> real = rng.normal(size=(60, 5))
    >>> floor = sd.metrics.e_distance_floor(real, n_predicted=30)
    >>> draws = [sd.metrics.e_distance(rng.normal(size=(30, 5)), rng.normal(size=(60, 5))) for _ in range(300)]
    >>> bool(abs(np.mean(draws) / floor - 1) < 0.1)
    True

    Split-half check: the E-distance between random halves of the real cells, on average over
    splits, equals its own expectation:

    >>> halves = [np.array_split(rng.permutation(60), 2) for _ in range(300)]
    >>> split_half = np.mean([sd.metrics.e_distance(real[a], real[b]) for a, b in halves])
    >>> expected = sd.metrics.e_distance_floor(real, n_predicted=30, n_real=30)
    >>> bool(abs(split_half / expected - 1) < 0.05)
    True
    """
    ya = aligned_matrices({"real": real})["real"]
    m = ya.shape[0]
    n_real = m if n_real is None else n_real
    for name, value in (("n_predicted", n_predicted), ("n_real", n_real)):
        if int(value) != value or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if m < 2:
        return float("nan")
    delta = _sum_within_distances(ya) / (m * (m - 1))
    return float(delta * (1.0 / n_predicted + 1.0 / n_real))


def emd(X: MatrixLike, Y: MatrixLike) -> float:
    r"""Mean over genes of the 1-D Wasserstein-1 (earth mover's) distance, paper Eq. 21.

    .. math::

        \mathrm{EMD}(X, Y) = \frac{1}{G} \sum_{g=1}^{G} W_1(X_{:,g}, Y_{:,g}),

    where :math:`W_1` is the distance computed by :func:`scipy.stats.wasserstein_distance` (equal
    weights). The computation is vectorised over genes (and done in blocks of genes to bound
    memory) but is exact, not an approximation: it evaluates scipy's formula
    :math:`\int |F_X(t) - F_Y(t)|\,dt` between consecutive pooled sample values, and the test
    suite checks that it equals the per-gene scipy result on random inputs, ties included.

    Parameters
    ----------
    X
        First set of cells (e.g. predicted), shape ``(n, n_genes)``: a dense array, a scipy sparse
        matrix/array, or an :class:`~anndata.AnnData` (its ``.X`` is used).
    Y
        Second set of cells (e.g. real), shape ``(m, n_genes)``, same kinds as ``X``. When both are
        AnnData, genes are matched by name (their order does not matter; different genes are refused).

    Returns
    -------
    float
        Mean Wasserstein-1 distance over genes.

    Raises
    ------
    ValueError
        If an input is not 2-D or has no cells, there are no genes, the gene counts differ, or
        AnnData inputs have different genes.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> x = np.array([[0.0, 1.0], [1.0, 3.0]])
    >>> round(sd.metrics.emd(x, x + 0.5), 10)
    0.5
    """
    mats = aligned_matrices({"X": X, "Y": Y}, sparse_format="csc")
    xa, ya = mats["X"], mats["Y"]
    n, m = xa.shape[0], ya.shape[0]
    n_genes = xa.shape[1]
    # About eight temporaries of this size are alive at once (sorted values, order, CDFs, gaps).
    genes_per_block = max(1, _BLOCK_ENTRIES // (4 * (n + m)))
    total = 0.0
    for cols in _blocks(n_genes, genes_per_block):
        pooled = np.concatenate(
            [to_dense(xa[:, cols], contiguous=True), to_dense(ya[:, cols], contiguous=True)], axis=0
        )
        # Stable sort keeps ties grouped; zero-width gaps inside a tie group contribute nothing,
        # so the CDF difference only matters at the end of each group, as in scipy.
        order = np.argsort(pooled, axis=0, kind="stable")
        values = np.take_along_axis(pooled, order, axis=0)
        from_x = order < n
        # Integer counts divided once, mirroring scipy's ``searchsorted(...) / size``.
        cdf_x = np.cumsum(from_x, axis=0)[:-1] / n
        cdf_y = np.cumsum(~from_x, axis=0)[:-1] / m
        deltas = np.diff(values, axis=0)
        total += float(np.einsum("ij,ij->j", np.abs(cdf_x - cdf_y), deltas).sum())
    return total / n_genes


def mean_rmse(X: MatrixLike, Y: MatrixLike) -> float:
    r"""Root mean squared error between the mean expression profiles of two sets of cells.

    .. math::

        \mathrm{RMSE}(X, Y) = \sqrt{\frac{1}{G} \sum_{g=1}^{G} (\bar{x}_g - \bar{y}_g)^2},

    where :math:`\bar{x}_g` is the mean of gene ``g`` over the cells of ``X``. Means are
    accumulated in float64; sparse inputs are never densified.

    Parameters
    ----------
    X
        Predicted cells, shape ``(n, n_genes)``: a dense array, a scipy sparse matrix/array, or an
        :class:`~anndata.AnnData` (its ``.X`` is used).
    Y
        Real cells, shape ``(m, n_genes)``, same kinds as ``X``. When both are AnnData, genes are
        matched by name (their order does not matter; different genes are refused).

    Returns
    -------
    float
        The RMSE between the two mean profiles.

    Raises
    ------
    ValueError
        If an input is not 2-D or has no cells, there are no genes, the gene counts differ, or
        AnnData inputs have different genes.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> x = np.zeros((4, 3))
    >>> sd.metrics.mean_rmse(x, x + 2.0)
    2.0
    """
    mats = aligned_matrices({"X": X, "Y": Y})
    diff = column_mean(mats["X"]) - column_mean(mats["Y"])
    return float(np.sqrt(np.mean(diff**2)))


def pearson_delta(pred: MatrixLike, real: MatrixLike, control: MatrixLike) -> float:
    r"""Pearson correlation between the predicted and the real mean change from control.

    .. math::

        r\big(\bar{x}^{\mathrm{pred}} - \bar{x}^{\mathrm{ctrl}},\;
              \bar{x}^{\mathrm{real}} - \bar{x}^{\mathrm{ctrl}}\big),

    the correlation over genes of the two mean-expression shifts (sometimes called "Pearson
    delta"). Means are accumulated in float64; sparse inputs are never densified.

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
        The correlation, in ``[-1, 1]``; ``nan`` if either mean change is constant over genes
        (e.g. a prediction equal to control, or a single gene), where it is undefined.

    Raises
    ------
    ValueError
        If an input is not 2-D or has no cells, there are no genes, the gene counts differ, or
        AnnData inputs have different genes.

    Examples
    --------
    >>> import numpy as np
    >>> import scdoloris as sd
    >>> rng = np.random.default_rng(0)
    >>> control = rng.normal(size=(100, 20))
    >>> shift = rng.normal(size=20)
    >>> real = control + shift
    >>> pred = control + 2.0 * shift + rng.normal(scale=0.1, size=(100, 20))
    >>> sd.metrics.pearson_delta(pred, real, control) > 0.9
    True
    """
    mats = aligned_matrices({"pred": pred, "real": real, "control": control})
    mean_control = column_mean(mats["control"])
    mean_pred = column_mean(mats["pred"])
    mean_real = column_mean(mats["real"])
    # Changes that are constant up to rounding (e.g. ``pred = control + 1``) have no defined correlation:
    # their centred norm is compared with the rounding error of the differences of the means.
    eps = 64 * np.finfo(np.float64).eps * np.sqrt(len(mean_control))
    centred = []
    for mean in (mean_pred, mean_real):
        delta = mean - mean_control
        delta -= delta.mean()
        norm = np.sqrt(np.dot(delta, delta))
        if not norm > eps * max(np.abs(mean).max(), np.abs(mean_control).max()):
            return float("nan")
        centred.append(delta / norm)
    return float(np.clip(np.dot(centred[0], centred[1]), -1.0, 1.0))
