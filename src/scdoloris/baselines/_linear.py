"""The linear baseline of Ahlmann-Eltze, Huber & Anders (Nature Methods 2025)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..data import auto_graph, expression_matrix, read_rows
from ..perturbation import resolve_gene_graph
from ._base import CONTROL_KEY, Baseline

# Control cells correlated for a co-expression graph, as in Doloris' training summary.
_MAX_COEXPRESSION_CELLS = 5000


class Linear(Baseline):
    """Linear model on PCA gene and perturbation embeddings: ``Y ≈ G K Pᵀ + b``.

    The simple linear baseline of Ahlmann-Eltze, Huber & Anders, "Deep-learning-based gene
    perturbation effect prediction does not yet outperform simple linear baselines", Nature Methods
    (2025), fitted per cell type as in the authors' code:

    - ``Y`` (genes x training conditions) is the pseudobulk (mean) expression of each training
      condition minus the control mean, controls included (a zero column);
    - ``G`` (genes x ``n_components``) holds the top principal-component scores of the genes in
      the training pseudobulk matrix (conditions centred, as ``prcomp``);
    - ``P`` (conditions x ``n_components``) is the perturbation embedding: for a perturbed gene
      its row of ``G``; zero for the control;
    - ``b`` is the row mean of ``Y`` (plus the control mean, on the expression scale);
    - ``K = (GᵀG + λI)⁻¹ Gᵀ (Y - b) P (PᵀP + λI)⁻¹``, ridge ``λ = ridge`` (0.1 as in the paper).

    A perturbation is predicted as ``control mean + b + G K p``. Extensions beyond the paper, which
    only embeds measured perturbed genes: a perturbed gene that is not measured is embedded as
    the weighted average of its gene-graph neighbours' embeddings (the same prior Doloris uses;
    ``|weight|``), from the measured neighbours when there are any, else from the neighbours'
    own averages, up to ``max_hops`` steps; a combination ``"A+B"`` is embedded as the *sum* of its
    components' embeddings. Training conditions that cannot be embedded (e.g. drugs, or genes
    without a graph link) are left out of the fit with a warning (``unembedded_``), like the paper
    drops perturbations without an embedding.

    Parameters
    ----------
    n_components
        Dimension ``K`` of the PCA embeddings (capped by the pseudobulk matrix's size).
    ridge
        Ridge penalty ``λ`` on both sides of the closed-form solution.
    gene_graph
        Gene graph for perturbed genes that are not measured, as Doloris' ``gene_graph``:
        ``"auto"`` (GO for human gene symbols, co-expression when perturbed genes are measured but
        unknown to GO), ``"go"``, ``"coexpression"`` (of the training controls), an edge DataFrame
        with columns ``source, target[, weight]``, a list of these (union), or ``None`` (measured
        perturbed genes only, as in the paper).
    max_hops
        Farthest graph step at which a measured gene may inform an unmeasured one.
    clip
        Clip shifted expression at 0.

    Attributes
    ----------
    gene_graph_
        The resolved edge table (``None`` without a graph).
    models_
        Per cell type: ``G`` (genes x k), ``K`` (k x k), ``b`` (row means of ``Y``), ``P``
        (conditions x k) and ``conditions`` (the training conditions fitted, control ``""`` first,
        combinations as sorted ``"A+B"``).
    unembedded_
        Training perturbations left out of the fit, per cell type.

    Examples
    --------
    >>> import scdoloris as sd
    >>> adata = sd.datasets.synthetic_perturbations(n_genes=30, n_perturbed_genes=8, n_doubles=2)
    >>> train = adata[adata.obs["condition_type"] != "double"].copy()
    >>> linear = sd.baselines.Linear(gene_graph=adata.uns["synthetic"]["edges"]).fit(train)
    >>> pred = linear.predict(["G001+G002", "U000"], n_cells=20, seed=0)
    >>> pred.shape
    (40, 30)
    """

    name = "linear"

    def __init__(
        self, *, n_components: int = 10, ridge: float = 0.1, gene_graph="auto", max_hops: int = 2, clip: bool = True
    ):
        super().__init__(clip=clip)
        if int(n_components) < 1:
            raise ValueError(f"n_components must be at least 1, got {n_components}.")
        if ridge < 0:
            raise ValueError(f"ridge must be non-negative, got {ridge}.")
        if int(max_hops) < 0:
            raise ValueError(f"max_hops must be non-negative, got {max_hops}.")
        self.n_components = int(n_components)
        self.ridge = float(ridge)
        self.gene_graph = gene_graph
        self.max_hops = int(max_hops)

    def _params(self) -> dict:
        graph = self.gene_graph if self.gene_graph is None or isinstance(self.gene_graph, str) else "<edges>"
        return {
            "n_components": self.n_components,
            "ridge": self.ridge,
            "gene_graph": graph,
            "max_hops": self.max_hops,
            "clip": self.clip,
        }

    # ------------------------------------------------------------------ gene embedding
    def _resolve_graph(self, components: list[str]) -> pd.DataFrame | None:
        spec = self.gene_graph
        genes = [str(g) for g in self.genes_]
        if isinstance(spec, str) and spec == "auto":
            spec = auto_graph(components, genes)  # the rule Doloris applies
        specs = spec if isinstance(spec, list | tuple) else [spec]
        controls = None
        if any(isinstance(s, str) and s == "coexpression" for s in specs):
            rows = np.concatenate(list(self.control_rows_.values()))
            if len(rows) > _MAX_COEXPRESSION_CELLS:
                rows = np.sort(np.random.default_rng(0).choice(rows, _MAX_COEXPRESSION_CELLS, replace=False))
            controls = read_rows(expression_matrix(self.adata_, self.layer_), rows)
        return resolve_gene_graph(spec, controls, genes)

    def _build_neighbours(self, edges: pd.DataFrame | None) -> None:
        self._gene_index = {str(g): i for i, g in enumerate(self.genes_)}
        self._weight_cache: dict[tuple[str, int], dict[int, float] | None] = {}
        if edges is None or len(edges) == 0:
            self._neighbours: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            return
        both = pd.DataFrame(
            {
                "gene": np.concatenate([edges["target"].to_numpy(), edges["source"].to_numpy()]),
                "neighbour": np.concatenate([edges["source"].to_numpy(), edges["target"].to_numpy()]),
                "weight": np.abs(np.concatenate([edges["weight"].to_numpy(), edges["weight"].to_numpy()])),
            }
        )
        both = both[both["gene"] != both["neighbour"]]
        both = both.groupby(["gene", "neighbour"], as_index=False, sort=True)["weight"].max()
        neighbours = both["neighbour"].to_numpy()
        weights = both["weight"].to_numpy(np.float64)
        self._neighbours = {
            gene: (neighbours[rows], weights[rows]) for gene, rows in both.groupby("gene").indices.items()
        }

    def _gene_weights(self, gene: str, hops: int) -> dict[int, float] | None:
        """Weights over measured genes whose embedding rows average to ``gene``'s, or ``None``."""
        index = self._gene_index.get(gene)
        if index is not None:
            return {index: 1.0}
        if hops <= 0 or gene not in self._neighbours:
            return None
        key = (gene, hops)
        if key in self._weight_cache:
            return self._weight_cache[key]
        names, weights = self._neighbours[gene]
        measured = [(self._gene_index[n], w) for n, w in zip(names, weights, strict=True) if n in self._gene_index]
        if measured:
            parts = [({i: 1.0}, w) for i, w in measured]
        else:
            parts = [(self._gene_weights(n, hops - 1), w) for n, w in zip(names, weights, strict=True)]
            parts = [(rep, w) for rep, w in parts if rep is not None]
        result = None
        if parts:
            total = sum(w for _, w in parts)
            # All-zero weights: a plain average.
            scale = [w / total for _, w in parts] if total > 0 else [1.0 / len(parts)] * len(parts)
            result = {}
            for (rep, _), s in zip(parts, scale, strict=True):
                for i, v in rep.items():
                    result[i] = result.get(i, 0.0) + s * v
        self._weight_cache[key] = result
        return result

    def _embedding_weights(self, components: list[list[str]]) -> tuple[np.ndarray, list[str]]:
        """Gene weights per perturbation (sum over components) and the components without any."""
        out = np.zeros((len(components), len(self.genes_)))
        missing = []
        for row, comps in enumerate(components):
            for c in comps:
                rep = self._gene_weights(c, self.max_hops)
                if rep is None:
                    missing.append(c)
                    continue
                for i, v in rep.items():
                    out[row, i] += v
        return out, sorted(set(missing))

    # ------------------------------------------------------------------ fitting
    def _fit(self, means, control_means, shifts):
        conditions = list(dict.fromkeys(shifts.index.get_level_values("perturbation")))
        all_components = sorted({c for key in conditions for c in key.split("+")})
        self.gene_graph_ = self._resolve_graph(all_components)
        self._build_neighbours(self.gene_graph_)
        self.models_: dict[str, dict] = {}
        self.unembedded_: dict[str, list[str]] = {}
        for cell_type in self.cell_types_:
            table = means.xs(cell_type, level="cell_type")
            keys = list(table.index)
            pseudobulk = table.to_numpy().T  # genes x conditions, controls included
            baseline = control_means.loc[cell_type].to_numpy()

            # Gene embedding: PCA scores of the genes, conditions centred (prcomp on genes x conditions).
            centred = pseudobulk - pseudobulk.mean(axis=0, keepdims=True)
            u, s, _ = np.linalg.svd(centred, full_matrices=False)
            k = min(self.n_components, len(s))
            G = u[:, :k] * s[:k]

            perturbed = [key for key in keys if key != CONTROL_KEY]
            weights, _ = self._embedding_weights([key.split("+") for key in perturbed])
            embeddable = [key for key in perturbed if self._embeddable(key.split("+"))]
            skipped = [key for key in perturbed if key not in set(embeddable)]
            if not embeddable:
                raise ValueError(
                    f"Linear found no training perturbation in cell type {cell_type!r} whose genes are measured or "
                    f"linked to a measured gene by the gene graph (gene_graph={self._params()['gene_graph']!r})."
                )
            if skipped:
                # Without a cell-type column every cell is in one cell type named "0": no name worth giving.
                of_type = "" if self.cell_type_key_ is None else f" of cell type {cell_type!r}"
                warnings.warn(
                    f"Linear leaves {len(skipped)} training perturbation(s){of_type} out of the fit: "
                    f"no embedding for their genes (e.g. {skipped[:5]}).",
                    UserWarning,
                    stacklevel=3,
                )
            used = [CONTROL_KEY, *embeddable]
            P = np.zeros((len(used), k))
            P[1:] = weights[[perturbed.index(key) for key in embeddable]] @ G
            Y = pseudobulk[:, [keys.index(key) for key in used]] - baseline[:, None]
            b = Y.mean(axis=1)
            Yc = Y - b[:, None]
            ridge = self.ridge * np.eye(k)
            left = np.linalg.solve(G.T @ G + ridge, G.T @ Yc @ P)  # (GᵀG + λI)⁻¹ Gᵀ Y P
            K = np.linalg.solve(P.T @ P + ridge, left.T).T  # ... (PᵀP + λI)⁻¹
            self.models_[cell_type] = {"G": G, "K": K, "b": b, "P": P, "conditions": used}
            self.unembedded_[cell_type] = skipped

    def _embeddable(self, components: list[str]) -> bool:
        return all(self._gene_weights(c, self.max_hops) is not None for c in components)

    # ------------------------------------------------------------------ prediction
    def _shift(self, components, labels, cell_type):
        weights, missing = self._embedding_weights(components)
        if missing:
            where = [p for p, comps in zip(labels, components, strict=True) if set(comps) & set(missing)]
            raise ValueError(
                f"Linear cannot embed {missing} (in {where}): not a measured gene and not linked to one within "
                f"{self.max_hops} step(s) of the gene graph (gene_graph={self._params()['gene_graph']!r})."
            )
        model = self.models_[cell_type]
        G, K = model["G"], model["K"]
        return (weights @ G) @ K.T @ G.T + model["b"]
