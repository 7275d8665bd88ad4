"""Sampling a coherent binary activation mask from predicted probabilities (paper Sec. 3.6, A.11)."""

from __future__ import annotations

import numpy as np
import torch

from .._constants import MASK_STRATEGIES


class MaskReference:
    """Binary expression patterns of real training cells, grouped by training condition.

    Parameters
    ----------
    frequencies
        ``(conditions, genes)`` fraction of cells with ``x != 0`` in each training condition.
    cell_types
        ``(conditions,)`` cell-type code of each condition.
    packed_masks
        ``(cells, ceil(genes / 8))`` ``numpy.packbits`` of reference cells' ``x != 0``.
    cell_condition
        ``(cells,)`` condition of each reference cell, sorted ascending.
    n_genes
        Number of genes (to unpack).

    Examples
    --------
    Two training conditions of one cell type, with two and one reference cells over 4 genes:

    >>> import numpy as np
    >>> patterns = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=bool)
    >>> reference = MaskReference(
    ...     frequencies=[[1.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]],
    ...     cell_types=[0, 0],
    ...     packed_masks=np.packbits(patterns, axis=1),
    ...     cell_condition=[0, 0, 1],
    ...     n_genes=4,
    ... )
    >>> reference.counts.tolist(), reference.starts.tolist()  # cells of each condition
    ([2, 1], [0, 2])
    >>> reference.masks(np.array([2])).astype(int)
    array([[0, 0, 1, 1]])
    """

    def __init__(self, frequencies, cell_types, packed_masks, cell_condition, n_genes: int):
        self.frequencies = torch.as_tensor(frequencies, dtype=torch.float32)
        self.cell_types = torch.as_tensor(cell_types, dtype=torch.long)
        self.packed_masks = np.asarray(packed_masks, dtype=np.uint8)
        cell_condition = np.asarray(cell_condition, dtype=np.int64)
        self.n_genes = n_genes
        counts = np.bincount(cell_condition, minlength=len(self.frequencies))
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts = counts
        # Pools of mask_strategy="matched" by (cell type, size, components), built on first use.
        self.matched_pools: dict[tuple[int, int, int], _Pool] = {}

    def masks(self, rows: np.ndarray) -> np.ndarray:
        """Unpacked boolean masks of reference cells ``rows``."""
        return np.unpackbits(self.packed_masks[rows], axis=1, count=self.n_genes).astype(bool)

    def cells_of_type(self, cell_type: int) -> np.ndarray:
        """Rows of the reference cells whose condition is in ``cell_type`` (rows are in condition order)."""
        return np.flatnonzero(np.repeat(self.cell_types.numpy() == cell_type, self.counts))


def tilt_to_moments(
    features: torch.Tensor, target: torch.Tensor, ridge: float = 0.0, max_iter: int = 100
) -> torch.Tensor:
    """Weights over cells, closest to uniform, whose weighted mean of ``features`` is ``target``.

    The I-projection: among weights with ``w @ features = target`` the one of least KL divergence
    from uniform. It has the form ``w = softmax(features @ lam)``; ``lam`` minimises the convex dual
    ``logsumexp(features @ lam) - target @ lam + ridge |lam|^2 / 2``. A positive ``ridge`` trades
    exactness for spread (the moments are then matched only approximately), and keeps ``lam`` finite
    where ``target`` is out of the cells' reach.

    Parameters
    ----------
    features
        ``(cells, k)`` features of each cell (0/1 gene patterns, or their principal components).
    target
        ``(k,)`` weighted means to reach.
    ridge
        L2 penalty on the dual variables.
    max_iter
        L-BFGS iterations.

    Returns
    -------
    torch.Tensor
        ``(cells,)`` float64 weights summing to 1.

    Examples
    --------
    Four patterns over two genes; uniform weights give frequencies (0.5, 0.5). Asking for (0.8, 0.5)
    moves weight onto the patterns that express gene 0, without breaking their pairing with gene 1:

    >>> import torch
    >>> patterns = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> w = tilt_to_moments(patterns, torch.tensor([0.8, 0.5]))
    >>> (w @ patterns.double()).numpy().round(3), w.numpy().round(3)
    (array([0.8, 0.5]), array([0.4, 0.4, 0.1, 0.1]))
    """
    features = features.double()
    target = target.double()
    lam = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([lam], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-10)

    def dual() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.logsumexp(features @ lam, 0) - target @ lam + 0.5 * ridge * lam.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(dual)
    return torch.softmax(features @ lam.detach(), 0)


def effective_cells(weights: torch.Tensor) -> float:
    """Kish's effective sample size ``1 / sum(w^2)`` of normalised weights."""
    return float(1.0 / weights.square().sum())


class _Pool:
    """Reference patterns of one cell type and their principal directions."""

    def __init__(self, patterns: np.ndarray, n_components: int, rng: np.random.Generator):
        exact = torch.from_numpy(patterns).double()
        # Kept for the model's lifetime: 0/1 values are exact in float32, half the memory of float64.
        self.patterns = exact.float()
        self.mean = exact.mean(0)
        centered = (exact - self.mean).float()
        k = max(1, min(n_components, *centered.shape))
        # Principal directions of the patterns (the co-expression a reweighting can move), by a
        # randomized range finder with two power iterations, much cheaper than a full SVD of a
        # 2,000 x 5,000 pool (see BENCHMARKS.md); ``rng`` keeps it deterministic.
        probe = torch.from_numpy(rng.standard_normal((centered.shape[1], min(k + 10, *centered.shape)))).float()
        basis = torch.linalg.qr(centered @ probe).Q
        for _ in range(2):
            basis = torch.linalg.qr(centered @ (centered.T @ basis)).Q
        _, _, vh = torch.linalg.svd(basis.T @ centered, full_matrices=False)
        self.components = vh[:k].T.double()  # (genes, k)
        self.features = centered.double() @ self.components

    def weights(self, target: torch.Tensor, min_effective: float) -> torch.Tensor:
        """Tilt towards ``target``'s principal coordinates, relaxed until ``min_effective`` cells carry it."""
        coordinates = (target.double() - self.mean) @ self.components
        floor = min(min_effective, len(self.patterns) / 2)
        ridge = 0.0
        for _ in range(12):
            weights = tilt_to_moments(self.features, coordinates, ridge)
            if effective_cells(weights) >= floor:
                return weights
            ridge = 1e-3 if ridge == 0.0 else ridge * 4.0
        return torch.full((len(self.patterns),), 1.0 / len(self.patterns), dtype=torch.float64)


def _matched_draw(p, cell_type, groups, reference, rng, max_pool, n_components, min_effective) -> torch.Tensor:
    """Real patterns drawn from a pool tilted towards each group's mean probabilities, then coupled to ``p``."""
    groups = cell_type if groups is None else groups.cpu()
    sampled = torch.zeros(p.shape, dtype=torch.bool)
    # One pool per cell type for the reference's lifetime (the model's, see Doloris._mask_reference).
    pools = reference.matched_pools
    for group in torch.unique(groups).tolist():
        members = torch.nonzero(groups == group).flatten()
        types = torch.unique(cell_type[members])
        if len(types) != 1:
            raise ValueError("Each group of mask_strategy='matched' must lie in one cell type.")
        ct = int(types[0])
        if (ct, max_pool, n_components) not in pools:
            rows = reference.cells_of_type(ct)
            if len(rows) == 0:  # a cell type without reference cells: pool every cell
                rows = np.arange(len(reference.packed_masks))
            # The pool is a fixed function of the reference (its own seed), so caching it does not
            # change what the caller's rng draws next.
            pool_rng = np.random.default_rng([ct, max_pool, n_components])
            if len(rows) > max_pool:
                rows = np.sort(pool_rng.choice(rows, max_pool, replace=False))
            pools[ct, max_pool, n_components] = _Pool(reference.masks(rows), n_components, pool_rng)
        pool = pools[ct, max_pool, n_components]
        weights = pool.weights(p[members].mean(0), min_effective)
        chosen = rng.choice(len(weights), size=len(members), p=(weights / weights.sum()).numpy())
        frequency = weights.float() @ pool.patterns  # each gene's frequency under the tilted draw
        sampled[members] = _couple(pool.patterns[chosen].bool(), frequency.expand(len(members), -1), p[members], rng)
    return sampled


def _couple(drawn: torch.Tensor, q: torch.Tensor, p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Change drawn ``Bernoulli(q)`` patterns as little as possible so that each gene is on with probability ``p``.

    A maximal coupling per gene: an expressed gene is kept with probability ``min(1, p / q)``, a silent
    one switched on with probability ``max(0, (p - q) / (1 - q))``.
    """
    u = torch.from_numpy(rng.random(tuple(p.shape))).to(p.dtype)
    tiny = torch.finfo(p.dtype).tiny
    keep_on = u < p / q.clamp(min=tiny)
    switch_on = u < (p - q) / (1.0 - q).clamp(min=tiny)
    return torch.where(drawn, keep_on, switch_on)


def sample_activation_mask(
    probs: torch.Tensor,
    cell_type: torch.Tensor,
    reference: MaskReference | None,
    rng: np.random.Generator,
    strategy: str = MASK_STRATEGIES[0],
    high: float = 0.95,
    low: float = 0.05,
    n_reference_conditions: int = 1,
    groups: torch.Tensor | None = None,
    max_pool: int = 2000,
    n_components: int = 32,
    min_effective: float = 100.0,
) -> torch.Tensor:
    """Binary activation masks for generated cells.

    ``"reference"`` (paper A.11): per cell, the training conditions of its cell type whose
    empirical non-zero frequencies are closest to ``probs`` in L2 (Eq. 25) form the reference
    subset; a real cell is drawn uniformly from it (Eq. 26) and its pattern ``x != 0`` is overridden
    to 1 where ``probs >= high`` and to 0 where ``probs <= low`` (Eq. 27). ``"bernoulli"`` draws each
    gene independently (Eq. 23), which the paper shows to be globally incoherent.

    ``"matched"`` (ours) reads Eq. 25 as a *reweighting* of real cells rather than a choice of
    condition. Per group of cells (one perturbation in one cell type), the reference cells of the cell
    type (at most ``max_pool``, a fixed subsample) are reweighted as little as possible (in KL,
    :func:`tilt_to_moments`) so that their mean pattern equals the group's mean predicted
    probabilities along the patterns' ``n_components`` principal directions, the co-expression that
    real cells share; the tilt is relaxed until at least ``min_effective`` cells carry the weight. A
    real cell is drawn from these weights (Eq. 26), and each gene of its pattern is then changed with
    the least probability that makes it expressed with probability ``probs`` exactly (a maximal
    coupling), before Eq. 27. So each gene's frequency is the predicted one, as with Bernoulli draws,
    while the patterns keep real cells' co-expression where the prediction allows.

    Parameters
    ----------
    probs
        ``(n, genes)`` predicted activation probabilities.
    cell_type
        ``(n,)`` cell-type codes.
    reference
        Reference cells; required for ``"reference"``.
    rng
        Seeded generator for the draws.
    strategy
        ``"matched"`` (the default, as the model's), ``"reference"`` or ``"bernoulli"``.
    high, low
        Thresholds ``delta_h`` and ``delta_l``.
    n_reference_conditions
        Size of the reference subset, in nearest training conditions (``"reference"``).
    groups
        ``(n,)`` group of each cell (e.g. one per perturbation and cell type) for ``"matched"``,
        whose frequencies are matched per group; ``None``: one group per cell type.
    max_pool
        Most reference cells per cell type that ``"matched"`` reweights.
    n_components
        Principal directions of the reference patterns that ``"matched"`` tilts along.
    min_effective
        Fewest effective cells (``1 / sum(w^2)``) that ``"matched"``'s weights may concentrate on.

    Returns
    -------
    torch.Tensor
        Float tensor of 0/1, shape ``(n, genes)``, on the device of ``probs``.

    Examples
    --------
    One reference cell per training condition. Each generated cell copies the pattern of a cell
    from its nearest condition, then genes with ``probs >= high`` are switched on (gene 1 of the
    first cell) and those with ``probs <= low`` off:

    >>> import numpy as np
    >>> import torch
    >>> patterns = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=bool)
    >>> reference = MaskReference(patterns.astype(float), [0, 0], np.packbits(patterns, axis=1), [0, 1], 4)
    >>> probs = torch.tensor([[0.9, 0.97, 0.6, 0.2], [0.02, 0.1, 0.8, 0.7]])
    >>> cell_type = torch.tensor([0, 0])
    >>> sample_activation_mask(probs, cell_type, reference, np.random.default_rng(0), strategy="reference")
    tensor([[1., 1., 1., 0.],
            [0., 0., 1., 1.]])

    ``"bernoulli"`` needs no reference; the thresholds apply all the same:

    >>> mask = sample_activation_mask(probs, cell_type, None, np.random.default_rng(0), strategy="bernoulli")
    >>> mask.shape, mask[0, 1].item(), mask[1, 0].item()
    (torch.Size([2, 4]), 1.0, 0.0)
    """
    p = probs.detach().float().cpu()
    if strategy == "bernoulli":
        sampled = torch.from_numpy(rng.random(tuple(p.shape)) < p.numpy())
    elif strategy == "reference":
        if reference is None:
            raise ValueError("strategy='reference' needs the model's reference cells.")
        distances = torch.cdist(p, reference.frequencies)  # Eq. 25
        same_type = cell_type.cpu()[:, None] == reference.cell_types[None, :]
        has_type = same_type.any(dim=1, keepdim=True)
        distances = torch.where(same_type | ~has_type, distances, torch.inf)
        k = min(n_reference_conditions, reference.frequencies.shape[0])
        nearest = torch.topk(distances, k, dim=1, largest=False).indices.numpy()  # (n, k)
        # Uniform over the union of the k conditions' cells (Eq. 26): pick a condition with
        # probability proportional to its cells, then a cell within it.
        weights = reference.counts[nearest].astype(np.float64)
        cumulative = np.cumsum(weights, axis=1)
        u = rng.random(len(p)) * cumulative[:, -1]
        chosen = nearest[np.arange(len(p)), (u[:, None] >= cumulative).sum(axis=1).clip(max=k - 1)]
        rows = reference.starts[chosen] + (rng.random(len(p)) * reference.counts[chosen]).astype(np.int64)
        sampled = torch.from_numpy(reference.masks(rows))
    elif strategy == "matched":
        if reference is None:
            raise ValueError("strategy='matched' needs the model's reference cells.")
        sampled = _matched_draw(p, cell_type.cpu(), groups, reference, rng, max_pool, n_components, min_effective)
    else:
        raise ValueError(f"strategy must be one of {MASK_STRATEGIES}, got {strategy!r}.")
    mask = torch.where(p >= high, True, torch.where(p <= low, False, sampled))  # Eq. 27
    return mask.to(device=probs.device, dtype=probs.dtype)
