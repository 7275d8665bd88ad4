from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd

from ._aliases import align_prior

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
    pandas.DataFrame
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

    Returns
    -------
    pandas.DataFrame or None
        Edge table with columns ``source``, ``target``, ``weight`` (``1`` where the table had no
        weights), without self loops; ``None`` for ``spec=None``.

    Raises
    ------
    ValueError
        For an unknown ``spec``, a table without ``source`` and ``target`` columns, or
        ``"coexpression"`` without control cells.

    Examples
    --------
    >>> import numpy as np
    >>> import pandas as pd
    >>> table = pd.DataFrame({"source": ["A", "B"], "target": ["B", "C"]})
    >>> resolve_gene_graph(table)
      source target  weight
    0      A      B     1.0
    1      B      C     1.0

    A list gives the union; an edge named twice keeps its strongest weight:

    >>> stronger = pd.DataFrame({"source": ["A"], "target": ["B"], "weight": [3.0]})
    >>> resolve_gene_graph([table, stronger])
      source target  weight
    0      A      B     3.0
    1      B      C     1.0

    ``"coexpression"`` correlates control cells (here ``B`` follows ``A``, ``C`` is independent):

    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(50, 3))
    >>> X[:, 1] = 2 * X[:, 0] + 0.01 * X[:, 2]
    >>> resolve_gene_graph("coexpression", X, ["A", "B", "C"])[["source", "target"]]
      source target
    0      B      A
    1      A      B
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


def freeze_prior(spec, control_expression=None, gene_names: Sequence[str] = ()) -> list:
    """A ``gene_graph`` argument in a form saved with the model.

    The bundled GO graph is kept by name (it ships with the package); co-expression and user tables
    are kept as edge arrays, so that genes first asked for at prediction time can be linked after
    a reload.

    Parameters
    ----------
    spec, control_expression, gene_names
        As for :func:`resolve_gene_graph`.

    Returns
    -------
    list
        ``"go"`` or a ``{"source", "target", "weight"}`` dict of arrays per prior; empty without one.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"source": ["A", "B"], "target": ["B", "C"], "weight": [1.0, 0.5]})
    >>> frozen = freeze_prior(["go", table])
    >>> frozen[0], sorted(frozen[1]), frozen[1]["source"].tolist()
    ('go', ['source', 'target', 'weight'], ['A', 'B'])
    >>> freeze_prior(None)
    []
    """
    if spec is None:
        return []
    specs = spec if isinstance(spec, list | tuple) else [spec]
    frozen = []
    for item in specs:
        if isinstance(item, str) and item == "go":
            frozen.append("go")
            continue
        table = resolve_gene_graph(item, control_expression, gene_names)
        frozen.append({c: table[c].to_numpy() for c in EDGE_COLUMNS})
    return frozen


def thaw_prior(frozen: Sequence) -> pd.DataFrame | None:
    """Inverse of :func:`freeze_prior`: the union edge table, or ``None`` without a prior.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"source": ["A", "B"], "target": ["B", "C"], "weight": [1.0, 0.5]})
    >>> thaw_prior(freeze_prior(table))
      source target  weight
    0      A      B     1.0
    1      B      C     0.5
    >>> thaw_prior(["go"]).shape  # the bundled GO graph, by name
    (409974, 3)
    >>> thaw_prior([]) is None
    True
    """
    if not frozen:
        return None
    specs = [item if isinstance(item, str) else _validate_edges(pd.DataFrame(dict(item))) for item in frozen]
    return resolve_gene_graph(specs if len(specs) > 1 else specs[0])


@dataclass
class GeneGraph:
    """The gene graph a model's GAT runs on.

    The graph starts from the measured genes and the prior's edges between them (both ways). Every
    perturbed gene the prior knows is then added as a node, measured or not, with *bridge* nodes:
    its prior neighbours outside the graph that touch a measured gene, so that a 2-layer GAT
    carries measured expression to a perturbed gene two prior steps away (true for 7 of the 30
    Norman genes in GO). Links to added nodes are one way, from the graph into them: the
    embedding of a measured gene never depends on which perturbations are asked for, and a gene
    added at prediction time (:meth:`extended`) is joined exactly as a training gene was. The GAT
    is inductive; its weights apply to new nodes unchanged.

    Parameters
    ----------
    nodes
        Node names; the first ``n_measured`` are the measured genes in expression order.
    n_measured
        Number of measured genes.
    edges
        ``(2, E)`` node indices (source, target): messages flow from source to target.
    weights
        Edge weights.
    prior
        The prior as :func:`freeze_prior` returns it, to link genes added later.
    aliases
        Genes named in the data by an old or alternative symbol, mapped to the prior's symbol whose
        edges they took (:func:`~scdoloris.perturbation.align_prior`): ``{"MARCH1": "MARCHF1"}``.

    Examples
    --------
    Three measured genes and a perturbed gene ``KO`` that is not measured; the prior reaches it
    through ``X``, a bridge node linked to the measured ``C``:

    >>> import pandas as pd
    >>> prior = pd.DataFrame(
    ...     {"source": ["A", "B", "KO", "X"], "target": ["B", "C", "X", "C"], "weight": [1.0, 0.5, 0.9, 0.7]}
    ... )
    >>> graph = GeneGraph.build(prior, measured=["A", "B", "C"], perturbed=["KO"])
    >>> graph.nodes, graph.n_measured, graph.n_nodes
    (['A', 'B', 'C', 'KO', 'X'], 3, 5)
    >>> graph.edges.tolist()  # sources, targets: no edge runs from an added node into a measured gene
    [[0, 1, 1, 2, 2, 3, 4], [1, 0, 2, 1, 4, 4, 3]]

    A gene first asked for at prediction time is joined the same way; one the prior cannot link
    raises a ``KeyError``:

    >>> graph.extended(["X", "KO"]) is graph  # nothing new
    True
    >>> graph.extended(["Z"])
    Traceback (most recent call last):
    ...
    KeyError: ['Z']
    >>> GeneGraph.from_dict(graph.to_dict()).nodes == graph.nodes
    True
    """

    nodes: list[str]
    n_measured: int
    edges: np.ndarray
    weights: np.ndarray
    prior: list = field(default_factory=list)
    aliases: dict = field(default_factory=dict)
    # The prior made undirected, per alias map, shared by the graphs extended from this one: making it
    # takes a group-by over every edge of the prior (0.2 s for GO), once per model instead of per call.
    _undirected: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls, prior: pd.DataFrame | None, measured: Sequence[str], perturbed: Sequence[str], frozen: list | None = None
    ) -> GeneGraph:
        """Build the graph over ``measured`` genes and the ``perturbed`` genes the prior knows.

        Parameters
        ----------
        prior
            Edge table (``source``, ``target``, ``weight``) or ``None``.
        measured
            Measured genes in expression order.
        perturbed
            Perturbation components; those unknown to the prior are left out (they become learned
            categories), those the prior knows become nodes even when no path joins them.
        frozen
            Saved form of ``prior`` (:func:`freeze_prior`); defaults to the table itself.
        """
        measured = [str(g) for g in measured]
        if prior is None or len(prior) == 0:
            return cls(measured, len(measured), np.zeros((2, 0), np.int64), np.zeros(0, np.float32))
        if frozen is None:
            frozen = [{c: prior[c].to_numpy() for c in EDGE_COLUMNS}]
        prior, aliases, _ = align_prior(prior, [*measured, *perturbed])
        index = pd.Series(np.arange(len(measured)), index=measured)
        inner = prior[prior["source"].isin(index.index) & prior["target"].isin(index.index)]
        # Messages flow both ways: the GO prior lists each gene's top sources, not a symmetric graph.
        inner = _symmetric(inner)
        edges = np.stack([index[inner["source"]].to_numpy(), index[inner["target"]].to_numpy()]).astype(np.int64)
        graph = cls(measured, len(measured), edges, inner["weight"].to_numpy(np.float32), frozen, aliases)
        known = set(prior["source"]) | set(prior["target"])
        return graph._added([g for g in perturbed if g in known], prior)[0]

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return len(self.nodes)

    def extended(self, genes: Sequence[str]) -> GeneGraph:
        """A copy with ``genes`` added as nodes, joined through the prior like the training genes.

        Raises
        ------
        KeyError
            Naming the genes the prior does not link to the graph within two steps.
        """
        node_set = set(self.nodes)
        new = [g for g in dict.fromkeys(genes) if g not in node_set]
        if not new:
            return self
        prior = thaw_prior(self.prior)
        if prior is None:
            raise KeyError(sorted(new))
        # The training renames first, then the new genes' own old symbols.
        prior, aliases, _ = align_prior(prior, [*self.nodes, *new], self.aliases)
        graph, unlinked = self._added(new, prior, tuple(sorted(aliases.items())))
        if unlinked:
            raise KeyError(sorted(unlinked))
        graph.aliases = aliases
        return graph

    def _added(
        self, genes: Sequence[str], prior: pd.DataFrame, alias_key: tuple | None = None
    ) -> tuple[GeneGraph, list[str]]:
        """The graph with ``genes`` and their bridges added, and the genes left without any link.

        ``alias_key`` names the alias map ``prior`` was aligned with, under which its undirected form
        is kept for the next call (``None``: not kept).
        """
        node_set = set(self.nodes)
        new = [g for g in dict.fromkeys(genes) if g not in node_set]
        if not new:
            return self, []
        if alias_key is None or alias_key not in self._undirected:
            undirected = _symmetric(prior)
            measured = set(self.nodes[: self.n_measured])
            touches_measured = set(undirected.loc[undirected["target"].isin(measured), "source"])
            by_target = undirected.groupby("target", sort=False).indices  # rows of each target, looked up per call
            if alias_key is not None:
                self._undirected[alias_key] = (undirected, touches_measured, by_target)
        else:
            undirected, touches_measured, by_target = self._undirected[alias_key]

        def into(targets) -> pd.DataFrame:
            """The edges into ``targets``, in the prior's order (the order a whole-table filter gives)."""
            rows = [by_target[g] for g in targets if g in by_target]
            return undirected.iloc[np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)]

        around = into(new)
        bridges = sorted(
            {g for g in around["source"] if g not in node_set and g not in set(new) and g in touches_measured}
        )
        added = new + bridges
        nodes = self.nodes + added
        index = pd.Series(np.arange(len(nodes)), index=nodes)
        links = into(added)
        links = links[links["source"].isin(index.index)]
        unlinked = sorted(set(new) - set(links["target"]))
        edges = np.stack([index[links["source"]].to_numpy(), index[links["target"]].to_numpy()]).astype(np.int64)
        graph = GeneGraph(
            nodes,
            self.n_measured,
            np.concatenate([self.edges, edges], axis=1),
            np.concatenate([self.weights, links["weight"].to_numpy(np.float32)]),
            self.prior,
            dict(self.aliases),
        )
        graph._undirected = self._undirected  # the same prior and measured genes
        return graph, unlinked

    def to_dict(self) -> dict:
        """Plain-Python form, saved with the model."""
        return {
            "nodes": list(self.nodes),
            "n_measured": self.n_measured,
            "edges": self.edges,
            "weights": self.weights,
            "prior": list(self.prior),
            "alias_names": list(self.aliases),
            "alias_symbols": list(self.aliases.values()),
        }

    @classmethod
    def from_dict(cls, state: dict) -> GeneGraph:
        """Inverse of :meth:`to_dict`."""
        return cls(
            list(state["nodes"]),
            int(state["n_measured"]),
            np.asarray(state["edges"], dtype=np.int64),
            np.asarray(state["weights"], dtype=np.float32),
            list(state.get("prior", [])),
            dict(zip(state.get("alias_names", []), state.get("alias_symbols", []), strict=True)),
        )


def _symmetric(edges: pd.DataFrame) -> pd.DataFrame:
    """Both directions of every edge, the strongest weight where an edge is listed twice."""
    both = pd.concat([edges, edges.rename(columns={"source": "target", "target": "source"})], ignore_index=True)
    return both.groupby(["source", "target"], as_index=False, sort=True)["weight"].max()
