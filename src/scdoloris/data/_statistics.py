"""The one streaming pass over the expression: moments per condition and cell type, in row blocks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

# Pseudo-count of nonzero values with which per-condition moments lean on their cell type's.
EXPRESSED_PRIOR_STRENGTH = 10.0
# A dense row block holds at most this many values (64 MB in float64), however many genes there are.
BLOCK_VALUES = 2**23
MAX_BLOCK_ROWS = 10_000


@dataclass(frozen=True)
class _Conditions:
    """The training conditions: the (perturbation label, cell type, dose) groups present in the data."""

    is_control: np.ndarray  # (labels,) whether a registered label is a control label
    cell_is_control: np.ndarray  # (cells,) unperturbed: a control label or dose 0
    dose_values: np.ndarray  # distinct doses (a single 0 without doses), indexed by keys[:, 2]
    keys: np.ndarray  # (conditions, 3): perturbation label code, cell type code, dose code
    of_cell: np.ndarray  # (cells,) condition of each cell
    is_control_condition: np.ndarray  # (conditions,)


def _conditions(
    n_cells: int,
    perturbation_codes: np.ndarray,
    cell_type_codes: np.ndarray,
    perturbation_labels: Sequence[str],
    cell_types: Sequence[str],
    control_values: Sequence[str],
    doses: np.ndarray | None,
) -> _Conditions:
    """Group the cells into conditions; raise if a cell type has no control cells."""
    n_types = len(cell_types)
    controls = set(control_values)
    is_control = np.array([label in controls for label in perturbation_labels])
    if doses is None:
        dose_values, dose_codes = np.zeros(1, dtype=np.float32), np.zeros(n_cells, dtype=np.int64)
    else:
        dose_values, dose_codes = np.unique(np.asarray(doses, dtype=np.float32), return_inverse=True)
    cell_is_control = is_control[perturbation_codes]
    if doses is not None:
        cell_is_control = cell_is_control | (dose_values[dose_codes] == 0)
    missing = [cell_types[c] for c in range(n_types) if not np.any(cell_is_control & (cell_type_codes == c))]
    if missing:
        raise ValueError(
            f"Cell type(s) {missing} have no control cells; Doloris needs controls of every cell type it is "
            "trained on (their statistics condition the target model, paper Eq. 12)."
        )

    # Conditions = (perturbation label, cell type, dose) groups present in the data; unperturbed
    # cells of a cell type (control label or dose 0) form one condition.
    condition_codes = np.where(cell_is_control, -1, perturbation_codes)
    condition_keys, condition_of_cell = np.unique(
        np.stack([condition_codes, cell_type_codes, np.where(cell_is_control, 0, dose_codes)], axis=1),
        axis=0,
        return_inverse=True,
    )
    # Control conditions carry the code of a control label (or of the dose-0 cells' label).
    is_control_condition = condition_keys[:, 0] == -1
    control_code = np.flatnonzero(is_control)[0] if is_control.any() else perturbation_codes[cell_is_control][0]
    condition_keys[is_control_condition, 0] = control_code
    return _Conditions(
        is_control=is_control,
        cell_is_control=cell_is_control,
        dose_values=dose_values,
        keys=condition_keys,
        of_cell=condition_of_cell.ravel(),
        is_control_condition=is_control_condition,
    )


def block_rows(n_genes: int) -> int:
    """Rows read at a time from a matrix of ``n_genes`` columns, so that a dense block stays small."""
    return int(np.clip(BLOCK_VALUES // max(n_genes, 1), 64, MAX_BLOCK_ROWS))


def _row_block(X, start: int, stop: int):
    """Rows ``start:stop`` in float64: a CSR matrix when ``X`` is sparse (in memory or backed), else dense."""
    block = X[start:stop]
    if sparse.issparse(block):
        return sparse.csr_matrix(block, dtype=np.float64)
    return np.asarray(block, dtype=np.float64)


def _expressed_moments(
    sums: np.ndarray,
    squares: np.ndarray,
    nonzero: np.ndarray,
    prior_mean: np.ndarray | None = None,
    prior_var: np.ndarray | None = None,
    strength: float = EXPRESSED_PRIOR_STRENGTH,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the nonzero values per group (row) and gene.

    Zeros add nothing to the sums, so the nonzero moments come from the same accumulators. With a
    prior, each group's moments are shrunk towards it as if ``strength`` more nonzero values had
    been seen there: at 93-97% zeros a condition of 100 cells holds 3-7 nonzero values of a gene,
    too few for a variance on their own. Without a prior, a gene never expressed gets 0 and 0.
    """
    if prior_mean is None:
        prior_mean, prior_var, strength = np.zeros(sums.shape[1]), np.zeros(sums.shape[1]), 0.0
    weight = nonzero + strength
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums + strength * prior_mean) / weight
        second = (squares + strength * (prior_var + prior_mean**2)) / weight
    mean = np.nan_to_num(mean)
    var = np.maximum(np.nan_to_num(second) - mean**2, 0.0)
    return mean, var


@dataclass(frozen=True)
class _ExpressionStatistics:
    """Moments of the expression per condition and cell type (log1p scale unless noted)."""

    x_max: float  # largest value: the [0, 1] scale divides by it
    means: np.ndarray  # (conditions, genes)
    frequencies: np.ndarray  # (conditions, genes) fraction with x != 0
    control_mean: np.ndarray  # (cell types, genes) of the control cells, [0, 1] scale
    control_std: np.ndarray
    type_mean: np.ndarray  # (cell types, genes) moments of the nonzero values, all conditions
    type_var: np.ndarray
    expressed_mean: np.ndarray  # (conditions, genes) the same per condition, shrunk towards the cell type's
    expressed_var: np.ndarray


def _accumulate(X, condition_of_cell: np.ndarray, n_conditions: int):
    """Per condition and gene: sum, sum of squares and count of nonzero values; per condition, the largest value.

    One pass in row blocks with exact accumulators, so a sparse or backed matrix is never densified
    whole. Each block is added per condition by a 0/1 matrix product, which keeps sparse blocks sparse.
    The largest value is kept per condition so that the scale of the data without some conditions
    (a calibration fold, :func:`summarize_without`) comes from the same pass. Raises on NaN, infinite,
    negative or only zero values.
    """
    n_cells, n_genes = X.shape
    sums = np.zeros((n_conditions, n_genes))
    squares = np.zeros((n_conditions, n_genes))
    nonzero = np.zeros((n_conditions, n_genes))
    maxima = np.zeros(n_conditions)
    step = block_rows(n_genes)
    for start in range(0, n_cells, step):
        stop = min(start + step, n_cells)
        block = _row_block(X, start, stop)
        values = block.data if sparse.issparse(block) else block
        # setup_anndata checks every value of an in-memory matrix but only a sample of a backed one.
        if values.size and not np.isfinite(values).all():
            raise ValueError("The expression matrix contains NaN or infinite values.")
        if values.size and values.min() < 0:
            raise ValueError(f"The expression matrix contains negative values (min {values.min():.3g}).")
        # Values are >= 0 (checked above), so a row's largest value is its largest stored one, or 0.
        row_max = np.asarray(block.max(axis=1).todense() if sparse.issparse(block) else block.max(axis=1, initial=0.0))
        np.maximum.at(maxima, condition_of_cell[start:stop], row_max.ravel())
        # Only the conditions present in the block: a dense (all conditions x genes) product per block
        # would make one pass cost N x P x G (quadratic in P when N grows with P). Adding the same
        # partial sums to the same rows, the result is the same to the bit.
        present, local = np.unique(condition_of_cell[start:stop], return_inverse=True)
        indicator = sparse.csr_matrix(
            (np.ones(stop - start), (local, np.arange(stop - start))), shape=(len(present), stop - start)
        )
        if sparse.issparse(block):
            squared, expressed = block.copy(), block.copy()
            squared.data = block.data**2
            expressed.data = (block.data != 0).astype(np.float64)
            sums[present] += (indicator @ block).toarray()
            squares[present] += (indicator @ squared).toarray()
            nonzero[present] += (indicator @ expressed).toarray()
        else:
            sums[present] += indicator @ block
            squares[present] += indicator @ block**2
            nonzero[present] += indicator @ (block != 0).astype(np.float64)
    if maxima.max(initial=0.0) <= 0:
        raise ValueError("The expression matrix is all zeros.")
    return sums, squares, nonzero, maxima


def _expression_statistics(X, conditions: _Conditions, n_types: int) -> _ExpressionStatistics:
    """Read ``X`` once and reduce it to per-condition and per-cell-type moments."""
    counts = np.bincount(conditions.of_cell, minlength=len(conditions.keys)).astype(np.float64)
    sums, squares, nonzero, maxima = _accumulate(X, conditions.of_cell, len(conditions.keys))
    return _moments(
        counts,
        sums,
        squares,
        nonzero,
        float(maxima.max()),
        conditions.keys[:, 1],
        conditions.is_control_condition,
        n_types,
    )


def _moments(
    counts: np.ndarray,
    sums: np.ndarray,
    squares: np.ndarray,
    nonzero: np.ndarray,
    x_max: float,
    type_of_condition: np.ndarray,
    is_control_condition: np.ndarray,
    n_types: int,
) -> _ExpressionStatistics:
    """Per-condition and per-cell-type moments from :func:`_accumulate`'s sums (one row per condition), at ``x_max``."""
    n_genes = sums.shape[1]

    # Control statistics per cell type on the [0, 1] scale (Eq. 12).
    control_mean = np.zeros((n_types, n_genes))
    control_std = np.zeros((n_types, n_genes))
    for c in range(n_types):
        groups = np.flatnonzero(is_control_condition & (type_of_condition == c))
        n = counts[groups].sum()
        mean = sums[groups].sum(axis=0) / n
        var = np.maximum(squares[groups].sum(axis=0) / n - mean**2, 0.0)
        control_mean[c], control_std[c] = mean / x_max, np.sqrt(var) / x_max
    # Nonzero moments: per cell type over all its training cells, then per condition shrunk towards them.
    type_sums = np.stack([sums[type_of_condition == c].sum(axis=0) for c in range(n_types)])
    type_squares = np.stack([squares[type_of_condition == c].sum(axis=0) for c in range(n_types)])
    type_nonzero = np.stack([nonzero[type_of_condition == c].sum(axis=0) for c in range(n_types)])
    overall_mean, overall_var = _expressed_moments(
        type_sums.sum(axis=0, keepdims=True),
        type_squares.sum(axis=0, keepdims=True),
        type_nonzero.sum(axis=0, keepdims=True),
    )
    type_mean, type_var = _expressed_moments(type_sums, type_squares, type_nonzero, overall_mean[0], overall_var[0])
    expressed_mean, expressed_var = _expressed_moments(
        sums, squares, nonzero, type_mean[type_of_condition], type_var[type_of_condition]
    )
    return _ExpressionStatistics(
        x_max=x_max,
        means=sums / counts[:, None],
        frequencies=nonzero / counts[:, None],
        control_mean=control_mean,
        control_std=control_std,
        type_mean=type_mean,
        type_var=type_var,
        expressed_mean=expressed_mean,
        expressed_var=expressed_var,
    )


def _statistic_fields(statistics: _ExpressionStatistics) -> dict:
    """The fields of a :class:`TrainingSummary` that are moments of the expression, in float32 on the [0, 1] scale."""
    x_max = statistics.x_max
    return {
        "x_max": x_max,
        "control_mean": statistics.control_mean.astype(np.float32),
        "control_std": statistics.control_std.astype(np.float32),
        "cell_type_expressed_mean": (statistics.type_mean / x_max).astype(np.float32),
        "cell_type_expressed_std": (np.sqrt(statistics.type_var) / x_max).astype(np.float32),
        "condition_frequencies": statistics.frequencies.astype(np.float32),
        "condition_expressed_mean": (statistics.expressed_mean / x_max).astype(np.float32),
        "condition_expressed_std": (np.sqrt(statistics.expressed_var) / x_max).astype(np.float32),
    }
