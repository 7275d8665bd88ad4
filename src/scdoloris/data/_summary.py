"""What Doloris keeps of its training data (:class:`TrainingSummary`) and how it is summarized."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from ..perturbation import (
    GeneGraph,
    MoleculeFeatures,
    PerturbationVocabulary,
)
from ._rows import read_rows
from ._statistics import _accumulate, _conditions, _expression_statistics, _moments, _statistic_fields, block_rows
from ._tokens import _perturbation_tokens

N_NODE_FEATURES = 32
# Above this many genes and conditions the node features' PCA is a randomized SVD (see _pca_node_features).
EXACT_PCA_MAX = 2048


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
        """The model's gene graph (built once per ``graph``: it keeps what extending it needs, see GeneGraph)."""
        cached = self.__dict__.get("_gene_graph")
        if cached is None or cached[0] is not self.graph:
            cached = self.__dict__["_gene_graph"] = (self.graph, GeneGraph.from_dict(self.graph))
        return cached[1]

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
