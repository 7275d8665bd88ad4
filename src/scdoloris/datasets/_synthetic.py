"""Synthetic single-cell perturbation data with a known ground truth."""

from __future__ import annotations

import itertools
from collections import deque

import anndata
import numpy as np
import pandas as pd

# Geometric decay of a perturbation's effect per graph hop, and the farthest hop it reaches.
_DECAY = 0.5
_MAX_HOPS = 3
# Links each measured gene draws to others (the graph is undirected, so mean degree is ~2x this).
_LINKS_PER_GENE = 2
# Links from every unmeasured perturbed gene into the measured genes.
_LINKS_PER_UNMEASURED = 3
_N_FACTORS = 3
_LOADING_SD = 0.25
_NOISE_SD = 0.25


def _random_graph(
    rng: np.random.Generator, n_genes: int, n_unmeasured: int
) -> tuple[list[str], dict[int, dict[int, float]]]:
    """Build a sparse undirected gene graph with a signed weight per directed edge."""
    names = [f"G{i:03d}" for i in range(n_genes)] + [f"U{i:03d}" for i in range(n_unmeasured)]
    pairs: set[tuple[int, int]] = set()
    n_links = min(_LINKS_PER_GENE, n_genes - 1)
    for i in range(n_genes):
        others = np.delete(np.arange(n_genes), i)
        for j in rng.choice(others, size=n_links, replace=False):
            pairs.add((min(i, int(j)), max(i, int(j))))
    for u in range(n_genes, n_genes + n_unmeasured):
        for j in rng.choice(n_genes, size=min(_LINKS_PER_UNMEASURED, n_genes), replace=False):
            pairs.add((int(j), u))
    adjacency: dict[int, dict[int, float]] = {i: {} for i in range(len(names))}
    for a, b in sorted(pairs):
        # Each direction gets its own sign, so A->B and B->A may act differently.
        w_ab, w_ba = rng.choice([-1.0, 1.0], size=2) * rng.uniform(0.6, 1.0, size=2)
        adjacency[a][b] = float(w_ab)
        adjacency[b][a] = float(w_ba)
    return names, adjacency


def _single_effect(source: int, adjacency: dict[int, dict[int, float]], n_nodes: int, effect_size: float) -> np.ndarray:
    """Shift on every graph node from perturbing ``source``, spreading breadth-first."""
    effect = np.zeros(n_nodes)
    # Knockdown: the perturbed gene itself goes down by ``effect_size``.
    effect[source] = -effect_size
    hops = np.full(n_nodes, -1)
    hops[source] = 0
    queue = deque([source])
    order: list[int] = []
    while queue:
        node = queue.popleft()
        order.append(node)
        if hops[node] >= _MAX_HOPS:
            continue
        for nb in adjacency[node]:
            if hops[nb] < 0:
                hops[nb] = hops[node] + 1
                queue.append(nb)
    for node in order[1:]:
        parents = [p for p in adjacency[node] if hops[p] == hops[node] - 1]
        # Averaging over parents (rather than summing) keeps the magnitude geometric in the hop count.
        effect[node] = _DECAY * np.mean([effect[p] * adjacency[p][node] for p in parents])
    return effect


def synthetic_perturbations(
    *,
    n_genes: int = 60,
    n_perturbed_genes: int = 12,
    n_cells_per_condition: int = 80,
    n_control_cells: int = 300,
    n_doubles: int = 6,
    n_cell_types: int = 1,
    effect_size: float = 1.0,
    dropout: float = 0.3,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate log-normalised perturbation data with a known regulatory graph and effects.

    A sparse random graph over the measured genes (``G000``, ``G001``, ...) and a few
    unmeasured perturbed genes (``U000``, ...; about a quarter of ``n_perturbed_genes``, each
    linked to 3 measured genes) is the ground-truth regulatory graph. Perturbing a gene knocks
    it down by ``effect_size`` and shifts its graph neighbours with a magnitude that shrinks at least by half per
    hop (up to 3 hops) and a sign set by the edges. Double perturbations ``"A+B"`` are exactly
    additive in the mean shift.

    Each cell is ``base profile + low-rank latent structure + gaussian noise + shift``, clipped
    at 0; a few bimodal genes are switched off in a random half of the cells; finally each
    value is zeroed with probability ``dropout``.

    Parameters
    ----------
    n_genes
        Number of measured genes.
    n_perturbed_genes
        Number of measured genes that are perturbed (the first ``n_perturbed_genes`` genes).
        ``max(1, round(n_perturbed_genes / 4))`` unmeasured genes are perturbed in addition.
    n_cells_per_condition
        Cells per perturbation (single or double) and cell type.
    n_control_cells
        Control cells per cell type.
    n_doubles
        Number of random double perturbations drawn from all perturbed genes.
    n_cell_types
        Number of cell types (``ct0``, ``ct1``, ...), each with its own base profile and all conditions.
    effect_size
        Magnitude of the shift on the perturbed gene itself.
    dropout
        Probability that any value is set to zero.
    seed
        Seed for :func:`numpy.random.default_rng`; the same seed gives identical data.

    Returns
    -------
    anndata.AnnData
        ``X`` is a dense non-negative float32 matrix. ``obs`` has the categorical columns
        ``perturbation`` (``"control"``, ``"G003"``, ``"G001+U000"``, ...), ``cell_type`` and
        ``condition_type`` (``"control"``, ``"single"``, ``"double"``).
        ``uns["synthetic"]`` holds the ground truth: ``"edges"`` (DataFrame with ``source``,
        ``target``, ``weight``, both directions listed, unmeasured genes included),
        ``"effects"`` (DataFrame, perturbed genes x measured genes, intended mean shift of each
        single perturbation before clipping, bimodality and dropout) and ``"seed"``.

    Raises
    ------
    ValueError
        If the arguments are out of range.

    Examples
    --------
    >>> adata = synthetic_perturbations(n_genes=30, n_perturbed_genes=4, n_doubles=2, seed=1)
    >>> int((adata.obs["condition_type"] == "double").sum())
    160
    >>> sorted(adata.uns["synthetic"]["effects"].index)[-1]
    'U000'
    """
    if n_genes < 2:
        raise ValueError(f"`n_genes` must be at least 2, got {n_genes}.")
    if not 1 <= n_perturbed_genes <= n_genes:
        raise ValueError(f"`n_perturbed_genes` must be between 1 and n_genes={n_genes}, got {n_perturbed_genes}.")
    if n_cells_per_condition < 1 or n_control_cells < 1 or n_cell_types < 1:
        raise ValueError("`n_cells_per_condition`, `n_control_cells` and `n_cell_types` must all be at least 1.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
    n_unmeasured = max(1, round(n_perturbed_genes / 4))
    n_perturbed_total = n_perturbed_genes + n_unmeasured
    max_doubles = n_perturbed_total * (n_perturbed_total - 1) // 2
    if not 0 <= n_doubles <= max_doubles:
        raise ValueError(f"`n_doubles` must be between 0 and {max_doubles}, got {n_doubles}.")

    rng = np.random.default_rng(seed)
    names, adjacency = _random_graph(rng, n_genes, n_unmeasured)
    gene_names = names[:n_genes]
    perturbed_idx = list(range(n_perturbed_genes)) + list(range(n_genes, n_genes + n_unmeasured))
    perturbed_names = [names[i] for i in perturbed_idx]

    effects = np.stack([_single_effect(i, adjacency, len(names), effect_size)[:n_genes] for i in perturbed_idx])
    effects_df = pd.DataFrame(effects, index=perturbed_names, columns=gene_names)
    edges_df = pd.DataFrame(
        [(names[a], names[b], w) for a in adjacency for b, w in adjacency[a].items()],
        columns=["source", "target", "weight"],
    )

    all_pairs = list(itertools.combinations(range(n_perturbed_total), 2))
    chosen = rng.choice(len(all_pairs), size=n_doubles, replace=False) if n_doubles else []
    doubles = {
        "+".join(sorted((perturbed_names[a], perturbed_names[b]))): effects[a] + effects[b]
        for a, b in (all_pairs[k] for k in chosen)
    }
    shifts: dict[str, np.ndarray] = {"control": np.zeros(n_genes)}
    shifts.update(zip(perturbed_names, effects, strict=True))
    shifts.update(doubles)
    kinds = {"control": "control", **dict.fromkeys(perturbed_names, "single"), **dict.fromkeys(doubles, "double")}
    sizes = {name: n_control_cells if name == "control" else n_cells_per_condition for name in shifts}

    # Latent loadings and bimodal genes are shared by cell types; base profiles are not.
    loadings = rng.normal(0.0, _LOADING_SD, size=(_N_FACTORS, n_genes))
    n_bimodal = max(1, n_genes // 10)
    bimodal = rng.choice(n_genes, size=n_bimodal, replace=False)

    blocks, perturbations, cell_types = [], [], []
    for ct in range(n_cell_types):
        base = rng.uniform(0.5, 3.0, size=n_genes)
        for name, shift in shifts.items():
            n = sizes[name]
            latent = rng.normal(size=(n, _N_FACTORS)) @ loadings
            block = base + latent + rng.normal(0.0, _NOISE_SD, size=(n, n_genes)) + shift
            blocks.append(block)
            perturbations += [name] * n
            cell_types += [f"ct{ct}"] * n
    x = np.clip(np.concatenate(blocks, axis=0), 0.0, None)
    off = rng.random((x.shape[0], n_bimodal)) < 0.5
    x[:, bimodal] = np.where(off, 0.0, x[:, bimodal])
    x[rng.random(x.shape) < dropout] = 0.0

    obs = pd.DataFrame(
        {
            "perturbation": pd.Categorical(perturbations, categories=list(shifts)),
            "cell_type": pd.Categorical(cell_types, categories=[f"ct{i}" for i in range(n_cell_types)]),
            "condition_type": pd.Categorical(
                [kinds[p] for p in perturbations], categories=["control", "single", "double"]
            ),
        },
        index=[f"cell{i:05d}" for i in range(x.shape[0])],
    )
    var = pd.DataFrame(index=pd.Index(gene_names))
    adata = anndata.AnnData(X=x.astype(np.float32), obs=obs, var=var)
    adata.uns["synthetic"] = {"edges": edges_df, "effects": effects_df, "seed": seed}
    return adata
