from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd

GO_GRAPH_FILE = "go_jaccard_top20_thr0.1_human_orgHsEgDb_3.16.csv.gz"
EDGE_COLUMNS = ["source", "target", "weight"]


@lru_cache(maxsize=1)
def _read_go_edges() -> pd.DataFrame:
    path = resources.files("scdoloris.datasets") / "data" / GO_GRAPH_FILE
    with resources.as_file(path) as file:
        edges = pd.read_csv(file)
    edges = edges.rename(columns={"importance": "weight"})
    return edges[EDGE_COLUMNS]


def go_edges() -> pd.DataFrame:
    """The bundled GO-similarity gene graph (human, GEARS-style).

    Each gene is linked to its 20 most similar genes by the Jaccard overlap of their direct GO
    annotations (at least 0.1), from Bioconductor ``org.Hs.eg.db`` 3.16: 409,974 edges over
    20,711 gene symbols.

    Returns
    -------
    Edge table with columns ``source``, ``target``, ``weight``.

    Examples
    --------
    >>> edges = go_edges()
    >>> list(edges.columns)
    ['source', 'target', 'weight']
    """
    return _read_go_edges().copy()


def coexpression_edges(
    X: np.ndarray, gene_names: Sequence[str], threshold: float = 0.4, max_neighbors: int = 20
) -> pd.DataFrame:
    """Gene graph from co-expression: ``|Pearson r| >= threshold``, at most ``max_neighbors`` per gene.

    Parameters
    ----------
    X
        Dense expression of (training control) cells, shape ``(cells, genes)``.
    gene_names
        Names of the columns of ``X``.
    threshold
        Minimum absolute Pearson correlation for an edge.
    max_neighbors
        Keep only the strongest neighbours of each target gene.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.normal(size=(100, 1))
    >>> X = np.hstack([a, a + 0.1 * rng.normal(size=(100, 1)), rng.normal(size=(100, 1))])
    >>> coexpression_edges(X, ["A", "B", "C"]).shape[0]
    2
    """
    X = np.asarray(X, dtype=np.float64)
    std = X.std(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(X, rowvar=False)
    corr = np.abs(np.nan_to_num(corr, nan=0.0))
    corr[std == 0, :] = 0.0
    corr[:, std == 0] = 0.0
    np.fill_diagonal(corr, 0.0)
    k = min(max_neighbors, corr.shape[0] - 1)
    if k <= 0:
        return pd.DataFrame(columns=EDGE_COLUMNS)
    strongest = np.argsort(-corr, axis=0)[:k]  # per target column, its strongest sources
    targets = np.broadcast_to(np.arange(corr.shape[1]), strongest.shape)
    keep = corr[strongest, targets] >= threshold
    names = np.asarray(gene_names)
    return pd.DataFrame(
        {
            "source": names[strongest[keep]],
            "target": names[targets[keep]],
            "weight": corr[strongest, targets][keep],
        }
    )


def _validate_edges(edges: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(edges, pd.DataFrame) or not {"source", "target"} <= set(edges.columns):
        raise ValueError("A gene-graph edge table must be a DataFrame with columns 'source', 'target'[, 'weight'].")
    edges = edges.copy()
    if "weight" not in edges.columns:
        edges["weight"] = 1.0
    edges = edges[EDGE_COLUMNS].dropna()
    edges["source"] = edges["source"].astype(str)
    edges["target"] = edges["target"].astype(str)
    edges["weight"] = edges["weight"].astype(np.float32)
    return edges[edges["source"] != edges["target"]]


def resolve_gene_graph(spec, control_expression=None, gene_names: Sequence[str] = ()) -> pd.DataFrame | None:
    """Turn a ``gene_graph`` argument into an edge table.

    Parameters
    ----------
    spec
        ``"go"``, ``"coexpression"``, an edge DataFrame, a list of these (their union), or ``None``.
    control_expression
        Dense training-control expression, needed for ``"coexpression"``.
    gene_names
        Measured gene names (columns of ``control_expression``).
    """
    if spec is None:
        return None
    if isinstance(spec, list | tuple):
        tables = [resolve_gene_graph(s, control_expression, gene_names) for s in spec]
        union = pd.concat([t for t in tables if t is not None], ignore_index=True)
        # Keep the strongest weight of an edge named by several sources.
        return union.groupby(["source", "target"], as_index=False)["weight"].max()
    if isinstance(spec, pd.DataFrame):
        return _validate_edges(spec)
    if spec == "go":
        return go_edges()
    if spec == "coexpression":
        if control_expression is None:
            raise ValueError("gene_graph='coexpression' needs control cells to correlate.")
        return _validate_edges(coexpression_edges(control_expression, gene_names))
    raise ValueError(f"gene_graph must be 'auto', 'go', 'coexpression', an edge DataFrame or a list; got {spec!r}.")


@dataclass
class GeneGraph:
    """The gene graph a model's GAT runs on.

    Nodes are the measured genes plus every perturbed gene that the prior knows, whether or not it
    is measured. Edges of the prior that reach from a node to a gene outside the graph are kept
    aside, so that a gene first asked for at prediction time can be added with its links
    (:meth:`extended`); the GAT is inductive, its weights apply to new nodes unchanged.

    Parameters
    ----------
    nodes
        Node names; the first ``n_measured`` are the measured genes in expression order.
    n_measured
        Number of measured genes.
    edges
        ``(2, E)`` node indices (source, target) and ``(E,)`` weights.
    weights
        Edge weights.
    outside_edges
        Prior edges between a node and a gene outside the graph: columns ``gene`` (outside),
        ``node`` (index), ``weight``.
    """

    nodes: list[str]
    n_measured: int
    edges: np.ndarray
    weights: np.ndarray
    outside_edges: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["gene", "node", "weight"]))

    @classmethod
    def build(cls, prior: pd.DataFrame | None, measured: Sequence[str], perturbed: Sequence[str]) -> GeneGraph:
        """Build the graph over ``measured`` genes and the ``perturbed`` genes the prior knows."""
        measured = [str(g) for g in measured]
        if prior is None or len(prior) == 0:
            return cls(measured, len(measured), np.zeros((2, 0), np.int64), np.zeros(0, np.float32))
        known = set(prior["source"]) | set(prior["target"])
        measured_set = set(measured)
        extra = sorted({g for g in perturbed if g in known and g not in measured_set})
        nodes = measured + extra
        index = pd.Series(np.arange(len(nodes)), index=nodes)
        src_in = prior["source"].isin(index.index).to_numpy()
        dst_in = prior["target"].isin(index.index).to_numpy()
        inner = prior[src_in & dst_in]
        # Messages flow both ways: the GO prior lists each gene's top sources, not a symmetric graph.
        inner = pd.concat([inner, inner.rename(columns={"source": "target", "target": "source"})], ignore_index=True)
        inner = inner.groupby(["source", "target"], as_index=False)["weight"].max()
        edges = np.stack([index[inner["source"]].to_numpy(), index[inner["target"]].to_numpy()]).astype(np.int64)
        # Edges with exactly one end in the graph: how genes asked later get connected.
        out_src, out_dst = prior[~src_in & dst_in], prior[src_in & ~dst_in]
        outside = pd.concat(
            [
                pd.DataFrame({"gene": out_src["source"], "node": index[out_src["target"]].to_numpy()}),
                pd.DataFrame({"gene": out_dst["target"], "node": index[out_dst["source"]].to_numpy()}),
            ],
            ignore_index=True,
        )
        outside["weight"] = np.concatenate([out_src["weight"].to_numpy(), out_dst["weight"].to_numpy()])
        outside = outside.groupby(["gene", "node"], as_index=False)["weight"].max()
        return cls(nodes, len(measured), edges, inner["weight"].to_numpy(np.float32), outside)

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return len(self.nodes)

    def knows(self, gene: str) -> bool:
        """Whether ``gene`` is a node or can be linked to the graph."""
        return gene in set(self.nodes) or bool((self.outside_edges["gene"] == gene).any())

    def extended(self, genes: Sequence[str]) -> GeneGraph:
        """A copy with ``genes`` (outside the graph, known to the prior) added as linked nodes.

        Raises
        ------
        KeyError
            Naming the genes the prior does not link to the graph.
        """
        node_set = set(self.nodes)
        new = [g for g in dict.fromkeys(genes) if g not in node_set]
        if not new:
            return self
        links = self.outside_edges[self.outside_edges["gene"].isin(new)]
        missing = sorted(set(new) - set(links["gene"]))
        if missing:
            raise KeyError(missing)
        new_index = {g: self.n_nodes + i for i, g in enumerate(new)}
        gene_rows = links["gene"].map(new_index).to_numpy(np.int64)
        node_rows = links["node"].to_numpy(np.int64)
        # Messages flow both ways between the new gene and its linked nodes.
        added = np.concatenate([np.stack([node_rows, gene_rows]), np.stack([gene_rows, node_rows])], axis=1)
        weights = np.concatenate([links["weight"].to_numpy(np.float32)] * 2)
        return GeneGraph(
            self.nodes + new,
            self.n_measured,
            np.concatenate([self.edges, added], axis=1),
            np.concatenate([self.weights, weights]),
            self.outside_edges[~self.outside_edges["gene"].isin(new)],
        )

    def to_dict(self) -> dict:
        """Plain-Python form, saved with the model."""
        return {
            "nodes": list(self.nodes),
            "n_measured": self.n_measured,
            "edges": self.edges,
            "weights": self.weights,
            "outside_edges": {c: self.outside_edges[c].to_numpy() for c in ["gene", "node", "weight"]},
        }

    @classmethod
    def from_dict(cls, state: dict) -> GeneGraph:
        """Inverse of :meth:`to_dict`."""
        return cls(
            list(state["nodes"]),
            int(state["n_measured"]),
            np.asarray(state["edges"], dtype=np.int64),
            np.asarray(state["weights"], dtype=np.float32),
            pd.DataFrame(state["outside_edges"]),
        )
