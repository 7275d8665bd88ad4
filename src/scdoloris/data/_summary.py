from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import sparse

from ..perturbation import (
    GeneGraph,
    MoleculeFeatures,
    PerturbationVocabulary,
    freeze_prior,
    split_perturbation,
    thaw_prior,
)
from ._rows import is_in_memory as is_in_memory  # tests/test_scale.py reads it from this module
from ._rows import read_rows

N_NODE_FEATURES = 32
# Above this many genes and conditions the node features' PCA is a randomized SVD (see _pca_node_features).
EXACT_PCA_MAX = 2048
# Pseudo-count of nonzero values with which per-condition moments lean on their cell type's.
EXPRESSED_PRIOR_STRENGTH = 10.0
# A dense row block holds at most this many values (64 MB in float64), however many genes there are.
BLOCK_VALUES = 2**23
MAX_BLOCK_ROWS = 10_000
MAX_COEXPRESSION_CELLS = 5000


def block_rows(n_genes: int) -> int:
    """Rows read at a time from a matrix of ``n_genes`` columns, so that a dense block stays small."""
    return int(np.clip(BLOCK_VALUES // max(n_genes, 1), 64, MAX_BLOCK_ROWS))


def _row_block(X, start: int, stop: int):
    """Rows ``start:stop`` in float64: a CSR matrix when ``X`` is sparse (in memory or backed), else dense."""
    block = X[start:stop]
    if sparse.issparse(block):
        return sparse.csr_matrix(block, dtype=np.float64)
    return np.asarray(block, dtype=np.float64)


@dataclass
class TrainingSummary:
    """Everything Doloris keeps of its training data, saved with the model.

    All arrays are numpy; ``graph`` is :meth:`GeneGraph.to_dict`.

    Examples
    --------
    Made by :func:`summarize_training_data` (here 5 genes, a control, a single and a double):

    >>> import numpy as np
    >>> from scdoloris.data import summarize_training_data
    >>> X = np.log1p(np.random.default_rng(0).poisson(1.0, size=(60, 5)))
    >>> summary = summarize_training_data(
    ...     X, np.repeat([0, 1, 2], 20), np.zeros(60, dtype=int), ["control", "A", "A+B"], ["T"],
    ...     ["control"], ["g0", "g1", "g2", "g3", "g4"], gene_graph=None,
    ... )
    >>> summary.control_mean.shape, summary.condition_frequencies.shape  # (cell types | conditions, genes)
    ((1, 5), (3, 5))
    >>> summary.categories  # no gene-graph prior: both components are learned categories
    ['A', 'B']
    >>> summary.vocabulary().recipes([["A", "B"]])  # rows after the 5 gene nodes
    array([[5, 6]])
    >>> summary.gene_graph.n_nodes, summary.max_dose, summary.molecule_features is None
    (5, 1.0, True)
    """

    x_max: float
    cell_types: list[str]
    control_mean: np.ndarray  # (cell types, genes), [0, 1] scale
    control_std: np.ndarray
    cell_type_expressed_mean: np.ndarray  # (cell types, genes) moments of the nonzero values, all conditions
    cell_type_expressed_std: np.ndarray
    perturbation_labels: list[str]  # registered labels, in code order
    is_control: np.ndarray  # (labels,)
    categories: list[str]
    train_recipes: np.ndarray  # (labels, width)
    graph: dict
    node_features: np.ndarray  # (nodes, N_NODE_FEATURES)
    condition_perturbation: np.ndarray  # (conditions,) label code
    condition_cell_type: np.ndarray  # (conditions,)
    condition_frequencies: np.ndarray  # (conditions, genes) fraction with x != 0
    condition_expressed_mean: np.ndarray  # (conditions, genes) mean of the nonzero values, [0, 1] scale
    condition_expressed_std: np.ndarray  # (conditions, genes) their standard deviation
    reference_masks: np.ndarray  # packbits of reference cells' x != 0
    reference_condition: np.ndarray  # (reference cells,)
    control_values: list[str]
    # Molecular perturbations (empty without a SMILES column): MoleculeFeatures.to_dict(), the molecule
    # rows of each registered label (-1 padded), the trained doses (condition_dose indexes them).
    molecules: dict = field(default_factory=dict)
    molecule_recipes: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=np.int64))
    dose_values: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.float32))
    condition_dose: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def molecule_features(self) -> MoleculeFeatures | None:
        """The model's molecule cache, ``None`` without molecular perturbations."""
        return MoleculeFeatures.from_dict(self.molecules) if self.molecules else None

    @property
    def max_dose(self) -> float:
        """Largest trained dose (1 without doses): the reference of the dose scale."""
        return float(max(self.dose_values.max(initial=0.0), 1.0)) if len(self.dose_values) else 1.0

    @property
    def gene_graph(self) -> GeneGraph:
        """The model's gene graph."""
        return GeneGraph.from_dict(self.graph)

    def vocabulary(self, graph: GeneGraph | None = None) -> PerturbationVocabulary:
        """Token vocabulary over ``graph`` (the training graph by default)."""
        return PerturbationVocabulary((graph or self.gene_graph).nodes, self.categories)

    def to_dict(self) -> dict:
        """Plain form for saving."""
        return asdict(self)


def _pca_node_features(pseudobulk: np.ndarray, n_components: int = N_NODE_FEATURES) -> np.ndarray:
    """Frozen gene features: PCA of the genes x training-conditions matrix of mean expression (A.7).

    An exact SVD up to ``EXACT_PCA_MAX`` genes or conditions (every bundled data set); above, a
    seeded randomized SVD of the leading components (scikit-learn's, with power iterations): the
    full SVD of an 8,000 x 10,000 matrix costs minutes and gigabytes for 32 columns.
    """
    centered = pseudobulk - pseudobulk.mean(axis=0, keepdims=True)
    if min(centered.shape) > EXACT_PCA_MAX:
        from sklearn.utils.extmath import randomized_svd

        u, s, _ = randomized_svd(centered, n_components, n_iter=7, random_state=0)
    else:
        u, s, _ = np.linalg.svd(centered, full_matrices=False)
    k = min(n_components, len(s))
    features = u[:, :k] * s[:k]
    scale = features.std()
    features = features / scale if scale > 0 else features
    return np.pad(features, ((0, 0), (0, n_components - k))).astype(np.float32)


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


def summarize_training_data(
    X,
    perturbation_codes: np.ndarray,
    cell_type_codes: np.ndarray,
    perturbation_labels: Sequence[str],
    cell_types: Sequence[str],
    control_values: Sequence[str],
    gene_names: Sequence[str],
    gene_graph="auto",
    reference_cells_per_condition: int = 100,
    seed: int = 0,
    doses: np.ndarray | None = None,
    smiles: Sequence[str] | None = None,
    molecule_table: pd.DataFrame | None = None,
) -> TrainingSummary:
    """Summarise registered training data in one streaming pass over its rows.

    Parameters
    ----------
    X
        Log1p expression (dense, sparse or backed), cells x genes.
    perturbation_codes, cell_type_codes
        Registered integer codes per cell.
    perturbation_labels, cell_types
        The labels behind the codes.
    control_values
        Labels of unperturbed cells.
    gene_names
        Measured genes, in column order.
    gene_graph
        ``"auto"``, ``"go"``, ``"coexpression"``, an edge DataFrame, a list of these, or ``None``.
    reference_cells_per_condition
        Real cells kept per training condition for mask sampling (paper A.11).
    seed
        Seed for choosing the reference cells and co-expression cells.
    doses
        Dose per cell (molecular perturbations); a dose of 0 means unperturbed. Conditions are then
        (perturbation, cell type, dose).
    smiles
        SMILES per cell (``"+"``-joined for combinations, in the order of the label's components):
        components with a SMILES are molecules, embedded from their structure.
    molecule_table
        Precomputed molecule embeddings indexed by drug name or SMILES (see
        :meth:`~scdoloris.perturbation.MoleculeFeatures.from_table`), used instead of Morgan
        fingerprints. Components named in its index are molecules even without a SMILES column.

    Returns
    -------
    TrainingSummary
        What the model keeps of its training data.

    Examples
    --------
    Twenty control cells, twenty with gene ``A`` perturbed and twenty with ``A+B``, one cell type;
    the prior links ``A`` to measured ``g0``, so ``A`` becomes a graph node and ``B`` a category:

    >>> import numpy as np
    >>> import pandas as pd
    >>> X = np.log1p(np.random.default_rng(0).poisson(1.0, size=(60, 5)))
    >>> prior = pd.DataFrame({"source": ["g0", "g1", "A"], "target": ["g1", "g2", "g0"], "weight": [1.0, 0.5, 0.8]})
    >>> summary = summarize_training_data(
    ...     X,
    ...     perturbation_codes=np.repeat([0, 1, 2], 20),
    ...     cell_type_codes=np.zeros(60, dtype=int),
    ...     perturbation_labels=["control", "A", "A+B"],
    ...     cell_types=["T"],
    ...     control_values=["control"],
    ...     gene_names=["g0", "g1", "g2", "g3", "g4"],
    ...     gene_graph=prior,
    ... )
    >>> summary.gene_graph.nodes, summary.categories
    (['g0', 'g1', 'g2', 'g3', 'g4', 'A'], ['B'])
    >>> summary.train_recipes  # token rows per label: node 5 is A, row 6 the category B
    array([[-1, -1],
           [ 5, -1],
           [ 5,  6]])
    >>> summary.is_control.tolist(), summary.node_features.shape
    ([True, False, False], (6, 32))
    """
    rng = np.random.default_rng(seed)
    conditions = _conditions(
        X.shape[0], perturbation_codes, cell_type_codes, perturbation_labels, cell_types, control_values, doses
    )
    statistics = _expression_statistics(X, conditions, len(cell_types))
    # The reference cells are drawn from ``rng`` before the co-expression cells: same seed, same draws.
    reference_masks, reference_condition = _reference_masks(
        X, conditions.of_cell, len(conditions.keys), reference_cells_per_condition, rng
    )
    tokens = _perturbation_tokens(
        X,
        perturbation_codes,
        perturbation_labels,
        control_values,
        gene_names,
        conditions.cell_is_control,
        gene_graph,
        smiles,
        molecule_table,
        rng,
    )
    return TrainingSummary(
        **_statistic_fields(statistics),
        cell_types=[str(c) for c in cell_types],
        perturbation_labels=[str(p) for p in perturbation_labels],
        is_control=conditions.is_control,
        categories=tokens.categories,
        train_recipes=tokens.train_recipes,
        graph=tokens.graph.to_dict(),
        node_features=_node_features(statistics.means, tokens.graph.n_nodes),
        condition_perturbation=conditions.keys[:, 0],
        condition_cell_type=conditions.keys[:, 1],
        reference_masks=reference_masks,
        reference_condition=reference_condition,
        control_values=list(control_values),
        molecules=tokens.molecules.to_dict() if tokens.molecules is not None else {},
        molecule_recipes=tokens.molecule_recipes,
        dose_values=conditions.dose_values.astype(np.float32),
        condition_dose=conditions.keys[:, 2],
    )


def summarize_without(
    X,
    summary: TrainingSummary,
    perturbation_codes: np.ndarray,
    cell_type_codes: np.ndarray,
    held_out: np.ndarray,
    reference_cells_per_condition: int = 100,
    seed: int = 0,
    doses: np.ndarray | None = None,
) -> TrainingSummary:
    """``summary`` as :func:`summarize_training_data` would make it without the held-out perturbed cells.

    A calibration fold (``Doloris.train``, preset ``"anchored"``) must reach the model only as a
    condition never trained would: every statistic of the expression is computed again, in one
    streaming pass, from the data without the perturbed cells of ``held_out`` -- the scale
    ``x_max``, the control and cell-type moments (the target prior), the per-condition tables
    (frequencies, nonzero moments), the frozen node features (PCA of the genes x conditions means)
    and the reference cells of mask sampling. The held-out conditions are absent from the tables,
    as an untrained condition is. Unperturbed cells of ``held_out`` (a held-out label at dose 0) stay:
    they are controls and carry no response. What does not read perturbed cells' expression stays
    ``summary``'s: the labels, tokens and gene graph (a co-expression prior is computed from control
    cells), the molecules and the dose grid.

    Parameters
    ----------
    X
        The log1p expression the summary was made from (dense, sparse or backed).
    summary
        The summary of all of ``X``.
    perturbation_codes, cell_type_codes, doses
        Registered codes (and doses) per cell, as given to :func:`summarize_training_data`.
    held_out
        ``(cells,)`` bool: the cells to leave out. Their perturbed cells must make whole conditions
        (all cells of a ``(label, cell type, dose)``), as the labels and conditions of a fold do.
    reference_cells_per_condition, seed
        As in :func:`summarize_training_data`: with the same seed, the reference cells are those it
        draws from the data without the held-out cells.

    Returns
    -------
    TrainingSummary
        The summary of the data without the held-out perturbed cells.

    Examples
    --------
    Leaving out perturbation ``A`` gives the summary of the data without its cells:

    >>> import numpy as np
    >>> X = np.log1p(np.random.default_rng(0).poisson(1.0, size=(60, 5)))
    >>> codes, types = np.repeat([0, 1, 2], 20), np.zeros(60, dtype=int)
    >>> args = (["control", "A", "B"], ["T"], ["control"], ["g0", "g1", "g2", "g3", "g4"])
    >>> full = summarize_training_data(X, codes, types, *args, gene_graph=None)
    >>> without = summarize_without(X, full, codes, types, held_out=codes == 1)
    >>> keep = codes != 1
    >>> alone = summarize_training_data(X[keep], codes[keep], types[keep], *args, gene_graph=None)
    >>> without.condition_perturbation.tolist(), np.array_equal(without.node_features, alone.node_features)
    ([0, 2], True)
    >>> np.array_equal(without.reference_masks, alone.reference_masks), without.x_max == alone.x_max
    (True, True)
    """
    held_out = np.asarray(held_out, dtype=bool)
    conditions = _conditions(
        X.shape[0],
        perturbation_codes,
        cell_type_codes,
        summary.perturbation_labels,
        summary.cell_types,
        summary.control_values,
        doses,
    )
    expected = np.stack([summary.condition_perturbation, summary.condition_cell_type, summary.condition_dose], axis=1)
    if not np.array_equal(conditions.keys, expected):
        raise ValueError("These codes are not those the summary was made from.")
    dropped = held_out & ~conditions.cell_is_control
    absent = np.unique(conditions.of_cell[dropped])
    if not np.array_equal(np.isin(conditions.of_cell, absent), dropped):
        raise ValueError("The held-out perturbed cells must make whole (perturbation, cell type, dose) conditions.")
    kept = np.setdiff1d(np.arange(len(conditions.keys)), absent)
    counts = np.bincount(conditions.of_cell, minlength=len(conditions.keys)).astype(np.float64)
    sums, squares, nonzero, maxima = _accumulate(X, conditions.of_cell, len(conditions.keys))
    statistics = _moments(
        counts[kept],
        sums[kept],
        squares[kept],
        nonzero[kept],
        float(maxima[kept].max()),
        conditions.keys[kept, 1],
        conditions.is_control_condition[kept],
        len(summary.cell_types),
    )
    # Held-out cells belong to no condition: none of them is a reference cell, and the generator
    # draws for the other conditions what it draws from the data without them.
    renumbered = np.full(len(conditions.keys), -1)
    renumbered[kept] = np.arange(len(kept))
    reference_masks, reference_condition = _reference_masks(
        X, renumbered[conditions.of_cell], len(kept), reference_cells_per_condition, np.random.default_rng(seed)
    )
    return replace(
        summary,
        **_statistic_fields(statistics),
        node_features=_node_features(statistics.means, len(summary.node_features)),
        condition_perturbation=summary.condition_perturbation[kept],
        condition_cell_type=summary.condition_cell_type[kept],
        condition_dose=summary.condition_dose[kept],
        reference_masks=reference_masks,
        reference_condition=reference_condition,
    )


# ---------------------------------------------------------------------------------------- conditions
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


# ------------------------------------------------------------------------------ expression statistics
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


def _node_features(means: np.ndarray, n_nodes: int) -> np.ndarray:
    """Frozen features of the graph's nodes: PCA features for the measured genes, zeros for the rest."""
    node_features = np.zeros((n_nodes, N_NODE_FEATURES), dtype=np.float32)
    node_features[: means.shape[1]] = _pca_node_features(means.T)
    return node_features


# ---------------------------------------------------------------------------------- reference masks
def _reference_masks(
    X, condition_of_cell: np.ndarray, n_conditions: int, per_condition: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Packed ``x != 0`` of up to ``per_condition`` real cells per condition (A.11), and their condition.

    The masks are in condition order; rows are read in sorted blocks (bounded memory, sorted rows for
    h5py) and packed to bits block by block.
    """
    reference_rows = []
    for g in range(n_conditions):
        members = np.flatnonzero(condition_of_cell == g)
        if len(members) > per_condition:
            members = np.sort(rng.choice(members, per_condition, replace=False))
        reference_rows.append(members)
    reference_condition = np.concatenate([np.full(len(r), g) for g, r in enumerate(reference_rows)])
    reference_rows = np.concatenate(reference_rows)
    step = block_rows(X.shape[1])
    sorted_rows = np.sort(reference_rows)
    reference_masks = np.concatenate(
        [
            np.packbits(read_rows(X, sorted_rows[i : i + step], np.float32) != 0, axis=1)
            for i in range(0, len(sorted_rows), step)
        ]
    )
    # Rows were read in sorted order: put them back in condition order.
    order = np.argsort(np.argsort(reference_rows))
    return reference_masks[order], reference_condition


# ------------------------------------------------------------- perturbation tokens: molecules, graph
@dataclass(frozen=True)
class _Tokens:
    """How the perturbations are embedded: gene graph nodes, learned categories and molecules."""

    graph: GeneGraph
    categories: list[str]  # components that are neither molecules nor graph nodes
    train_recipes: np.ndarray  # (labels, width) token rows of the gene and category components
    molecules: MoleculeFeatures | None
    molecule_recipes: np.ndarray  # (labels, width) molecule rows, -1 padded


def _molecules(
    components: list[list[str]],
    perturbation_codes: np.ndarray,
    smiles: Sequence[str] | None,
    molecule_table: pd.DataFrame | None,
) -> tuple[dict[str, str | None], MoleculeFeatures | None]:
    """The components that are molecules (with a SMILES, or named in ``molecule_table``) and their features."""
    molecule_smiles = _molecule_smiles(components, perturbation_codes, smiles) if smiles is not None else {}
    if molecule_table is not None:
        in_table = {str(name) for name in molecule_table.index}
        for comps in components:
            molecule_smiles.update({c: None for c in comps if c in in_table and c not in molecule_smiles})
        if not molecule_smiles:
            raise ValueError(
                "molecule_table was given, but no perturbation is a molecule: register a SMILES column "
                "(setup_anndata(..., smiles_key=...)) or index the table by the perturbation labels' components."
            )
        return molecule_smiles, MoleculeFeatures.from_table(molecule_table, molecule_smiles)
    return molecule_smiles, MoleculeFeatures.from_smiles(molecule_smiles) if molecule_smiles else None


def _perturbation_tokens(
    X,
    perturbation_codes: np.ndarray,
    perturbation_labels: Sequence[str],
    control_values: Sequence[str],
    gene_names: Sequence[str],
    cell_is_control: np.ndarray,
    gene_graph,
    smiles: Sequence[str] | None,
    molecule_table: pd.DataFrame | None,
    rng: np.random.Generator,
) -> _Tokens:
    """Perturbation components: molecules (with a SMILES), genes known to the graph prior, the rest learned categories.

    A co-expression prior is computed from up to ``MAX_COEXPRESSION_CELLS`` control cells of ``X``.
    """
    components = [split_perturbation(label, control_values) for label in perturbation_labels]
    molecule_smiles, molecules = _molecules(components, perturbation_codes, smiles, molecule_table)
    gene_components = [[c for c in comps if c not in molecule_smiles] for comps in components]
    all_components = sorted({c for comps in gene_components for c in comps})
    gene_names = [str(g) for g in gene_names]
    control_rows = np.flatnonzero(cell_is_control)
    if len(control_rows) > MAX_COEXPRESSION_CELLS:
        control_rows = np.sort(rng.choice(control_rows, MAX_COEXPRESSION_CELLS, replace=False))
    if isinstance(gene_graph, str) and gene_graph == "auto":
        gene_graph = auto_graph(all_components, gene_names)
    specs = gene_graph if isinstance(gene_graph, list | tuple) else [gene_graph]
    needs_controls = any(isinstance(s, str) and s == "coexpression" for s in specs)
    frozen = freeze_prior(gene_graph, read_rows(X, control_rows) if needs_controls else None, gene_names)
    graph = GeneGraph.build(thaw_prior(frozen), gene_names, all_components, frozen)
    node_set = set(graph.nodes)
    categories = [c for c in all_components if c not in node_set]
    train_recipes = PerturbationVocabulary(graph.nodes, categories).recipes(gene_components)
    if molecules is not None:
        molecule_components = [[c for c in comps if c in molecule_smiles] for comps in components]
        molecule_recipes, _ = molecules.recipes(molecule_components, [0.0] * len(components))
    else:
        molecule_recipes = np.full((len(components), 1), -1, dtype=np.int64)
    return _Tokens(graph, categories, train_recipes, molecules, molecule_recipes)


def _split_smiles(value: str) -> list[str]:
    """Split ``"A+B"`` SMILES at ``+`` outside brackets (``[N+]`` is a charge, not a separator)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(value):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "+" and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    return parts + [value[start:]]


def _molecule_smiles(components, perturbation_codes, smiles) -> dict[str, str]:
    """``{molecule: SMILES}`` from a per-cell SMILES column (``"+"``-joined like the labels)."""
    smiles = np.asarray(smiles, dtype=object)
    found: dict[str, str] = {}
    for code, comps in enumerate(components):
        if not comps:
            continue
        values = {str(v) for v in smiles[perturbation_codes == code] if isinstance(v, str) and v not in ("", "nan")}
        if len(values) > 1:
            raise ValueError(f"Cells of perturbation {'+'.join(comps)!r} carry different SMILES: {sorted(values)[:3]}.")
        if not values:
            continue
        value = next(iter(values))
        parts = [value] if len(comps) == 1 else _split_smiles(value)
        if len(parts) != len(comps):
            raise ValueError(
                f"Perturbation {'+'.join(comps)!r} has {len(comps)} component(s) but its SMILES has {len(parts)}; "
                "join the SMILES of a combination with '+' in the order of the label."
            )
        for name, value in zip(comps, parts, strict=True):
            if found.setdefault(name, value) != value:
                raise ValueError(f"Molecule {name!r} has two SMILES: {found[name]!r} and {value!r}.")
    return found


def auto_graph(components: Sequence[str], gene_names: Sequence[str]):
    """The graph prior ``gene_graph="auto"`` stands for, picked from the data.

    ``"go"`` when a perturbed component is a gene of the bundled GO graph (human gene symbols), else
    ``"coexpression"`` when one is a measured gene, else ``None`` (no prior: all components are
    learned categories). Doloris and the linear baseline apply this same rule.

    Parameters
    ----------
    components
        Perturbed components (genes or other names) of the training labels.
    gene_names
        Measured genes.

    Returns
    -------
    ``"go"``, ``"coexpression"`` or ``None``.

    Examples
    --------
    >>> from scdoloris.data import auto_graph
    >>> auto_graph(["G001"], ["G001", "G002"]), auto_graph(["drugA"], ["G001"]), auto_graph([], ["G001"])
    ('coexpression', None, None)
    """
    from ..perturbation import go_edges, symbol_candidates

    if not components:
        return None
    go = go_edges()
    go_genes = set(go["source"]) | set(go["target"])
    if any(c in go_genes or any(s in go_genes for s in symbol_candidates(c)) for c in components):
        return "go"  # also when the screen names genes by old symbols (MARCH1 for MARCHF1)
    if any(c in set(gene_names) for c in components):
        return "coexpression"
    return None
