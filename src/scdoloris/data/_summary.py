from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

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

N_NODE_FEATURES = 32
# Pseudo-count of nonzero values with which per-condition moments lean on their cell type's.
EXPRESSED_PRIOR_STRENGTH = 10.0
# A dense row block holds at most this many values (64 MB in float64), however many genes there are.
BLOCK_VALUES = 2**23
MAX_BLOCK_ROWS = 10_000
MAX_COEXPRESSION_CELLS = 5000


def block_rows(n_genes: int) -> int:
    """Rows read at a time from a matrix of ``n_genes`` columns, so that a dense block stays small."""
    return int(np.clip(BLOCK_VALUES // max(n_genes, 1), 64, MAX_BLOCK_ROWS))


def is_in_memory(X) -> bool:
    """Whether ``X`` is a numpy array or scipy sparse matrix (not an on-disk, backed one)."""
    return isinstance(X, np.ndarray) or sparse.issparse(X)


def read_rows(X, rows: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Rows of ``X`` (dense, sparse or backed) as a dense array, in the order given; repeats allowed.

    On-disk matrices (h5py datasets, anndata's backed sparse datasets) are read once per distinct
    row in increasing order, which is what h5py requires, and as one slice when the rows are
    contiguous, the fast case for both formats.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if is_in_memory(X) or len(rows) == 0:
        block = X[rows]
    else:
        unique, inverse = np.unique(rows, return_inverse=True)
        contiguous = unique[-1] - unique[0] + 1 == len(unique)
        block = X[int(unique[0]) : int(unique[-1]) + 1] if contiguous else X[unique]
        if len(unique) != len(rows) or not np.array_equal(unique, rows):
            block = block[inverse.ravel()]
    block = block.toarray() if sparse.issparse(block) else np.asarray(block)
    return block.astype(dtype, copy=False)


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
    """Frozen gene features: PCA of the genes x training-conditions matrix of mean expression (A.7)."""
    centered = pseudobulk - pseudobulk.mean(axis=0, keepdims=True)
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
    n_cells, n_genes = X.shape
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
    condition_of_cell = condition_of_cell.ravel()
    n_conditions = len(condition_keys)
    sums = np.zeros((n_conditions, n_genes))
    squares = np.zeros((n_conditions, n_genes))
    nonzero = np.zeros((n_conditions, n_genes))
    counts = np.bincount(condition_of_cell, minlength=n_conditions).astype(np.float64)
    x_max = 0.0
    # One pass in row blocks with exact accumulators (sums, sums of squares, nonzero counts), so a
    # sparse or backed matrix is never densified whole. Each block is added per condition by a
    # 0/1 matrix product, which keeps sparse blocks sparse.
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
        x_max = max(x_max, float(values.max(initial=0.0)))
        indicator = sparse.csr_matrix(
            (np.ones(stop - start), (condition_of_cell[start:stop], np.arange(stop - start))),
            shape=(n_conditions, stop - start),
        )
        if sparse.issparse(block):
            squared, expressed = block.copy(), block.copy()
            squared.data = block.data**2
            expressed.data = (block.data != 0).astype(np.float64)
            sums += (indicator @ block).toarray()
            squares += (indicator @ squared).toarray()
            nonzero += (indicator @ expressed).toarray()
        else:
            sums += indicator @ block
            squares += indicator @ block**2
            nonzero += indicator @ (block != 0).astype(np.float64)
    if x_max <= 0:
        raise ValueError("The expression matrix is all zeros.")
    means = sums / counts[:, None]
    frequencies = nonzero / counts[:, None]

    # Control statistics per cell type on the [0, 1] scale (Eq. 12).
    control_mean = np.zeros((n_types, n_genes))
    control_std = np.zeros((n_types, n_genes))
    control_groups = [np.flatnonzero(is_control_condition & (condition_keys[:, 1] == c)) for c in range(n_types)]
    for c, groups in enumerate(control_groups):
        n = counts[groups].sum()
        mean = sums[groups].sum(axis=0) / n
        var = np.maximum(squares[groups].sum(axis=0) / n - mean**2, 0.0)
        control_mean[c], control_std[c] = mean / x_max, np.sqrt(var) / x_max
    # Nonzero moments: per cell type over all its training cells, then per condition shrunk towards them.
    type_of_condition = condition_keys[:, 1]
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

    # Reference cells for the mask (A.11), grouped by condition.
    reference_rows = []
    for g in range(n_conditions):
        members = np.flatnonzero(condition_of_cell == g)
        if len(members) > reference_cells_per_condition:
            members = np.sort(rng.choice(members, reference_cells_per_condition, replace=False))
        reference_rows.append(members)
    reference_condition = np.concatenate([np.full(len(r), g) for g, r in enumerate(reference_rows)])
    reference_rows = np.concatenate(reference_rows)
    # Read in sorted blocks (bounded memory; sorted rows for h5py), packed to bits block by block.
    sorted_rows = np.sort(reference_rows)
    reference_masks = np.concatenate(
        [
            np.packbits(read_rows(X, sorted_rows[i : i + step], np.float32) != 0, axis=1)
            for i in range(0, len(sorted_rows), step)
        ]
    )
    # Rows were read in sorted order: put them back in condition order.
    order = np.argsort(np.argsort(reference_rows))
    reference_masks = reference_masks[order]

    # Perturbation components: molecules (with a SMILES), genes known to the graph prior, the rest
    # learned categories.
    components = [split_perturbation(label, control_values) for label in perturbation_labels]
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
        molecules = MoleculeFeatures.from_table(molecule_table, molecule_smiles)
    else:
        molecules = MoleculeFeatures.from_smiles(molecule_smiles) if molecule_smiles else None
    gene_components = [[c for c in comps if c not in molecule_smiles] for comps in components]
    all_components = sorted({c for comps in gene_components for c in comps})
    gene_names = [str(g) for g in gene_names]
    control_rows = np.flatnonzero(cell_is_control)
    if len(control_rows) > MAX_COEXPRESSION_CELLS:
        control_rows = np.sort(rng.choice(control_rows, MAX_COEXPRESSION_CELLS, replace=False))
    if isinstance(gene_graph, str) and gene_graph == "auto":
        gene_graph = _auto_graph(all_components, gene_names)
    specs = gene_graph if isinstance(gene_graph, list | tuple) else [gene_graph]
    needs_controls = any(isinstance(s, str) and s == "coexpression" for s in specs)
    frozen = freeze_prior(gene_graph, read_rows(X, control_rows) if needs_controls else None, gene_names)
    graph = GeneGraph.build(thaw_prior(frozen), gene_names, all_components, frozen)
    node_set = set(graph.nodes)
    categories = [c for c in all_components if c not in node_set]
    vocabulary = PerturbationVocabulary(graph.nodes, categories)
    train_recipes = vocabulary.recipes(gene_components)
    if molecules is not None:
        molecule_components = [[c for c in comps if c in molecule_smiles] for comps in components]
        molecule_recipes, _ = molecules.recipes(molecule_components, [0.0] * len(components))
    else:
        molecule_recipes = np.full((len(components), 1), -1, dtype=np.int64)

    node_features = np.zeros((graph.n_nodes, N_NODE_FEATURES), dtype=np.float32)
    node_features[:n_genes] = _pca_node_features(means.T)
    return TrainingSummary(
        x_max=x_max,
        cell_types=[str(c) for c in cell_types],
        control_mean=control_mean.astype(np.float32),
        control_std=control_std.astype(np.float32),
        cell_type_expressed_mean=(type_mean / x_max).astype(np.float32),
        cell_type_expressed_std=(np.sqrt(type_var) / x_max).astype(np.float32),
        perturbation_labels=[str(p) for p in perturbation_labels],
        is_control=is_control,
        categories=categories,
        train_recipes=train_recipes,
        graph=graph.to_dict(),
        node_features=node_features,
        condition_perturbation=condition_keys[:, 0],
        condition_cell_type=condition_keys[:, 1],
        condition_frequencies=frequencies.astype(np.float32),
        condition_expressed_mean=(expressed_mean / x_max).astype(np.float32),
        condition_expressed_std=(np.sqrt(expressed_var) / x_max).astype(np.float32),
        reference_masks=reference_masks,
        reference_condition=reference_condition,
        control_values=list(control_values),
        molecules=molecules.to_dict() if molecules is not None else {},
        molecule_recipes=molecule_recipes,
        dose_values=dose_values.astype(np.float32),
        condition_dose=condition_keys[:, 2],
    )


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


def _auto_graph(components: Sequence[str], gene_names: Sequence[str]):
    """Pick the graph prior from the data: GO for human gene symbols, co-expression for measured genes."""
    from ..perturbation import go_edges

    if not components:
        return None
    go = go_edges()
    go_genes = set(go["source"]) | set(go["target"])
    if any(c in go_genes for c in components):
        return "go"
    if any(c in set(gene_names) for c in components):
        return "coexpression"
    return None
