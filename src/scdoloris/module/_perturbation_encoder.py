from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch_geometric.nn import GATv2Conv
from torch_geometric.utils import k_hop_subgraph


class GraphTensors(nn.Module):
    """A gene graph as tensors: frozen node features, a measured flag, edges and weights.

    A module only so that the tensors follow the model across devices and into its state dict.
    """

    def __init__(self, node_features: torch.Tensor, measured: torch.Tensor, edges: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("node_features", node_features.float())
        self.register_buffer("measured", measured.bool())
        self.register_buffer("edges", edges.long())
        self.register_buffer("weights", weights.float())

    @classmethod
    def empty(cls, n_features: int = 32) -> GraphTensors:
        """A graph without nodes: every perturbation is then a learned category."""
        return cls(
            torch.zeros(0, n_features),
            torch.zeros(0, dtype=torch.bool),
            torch.zeros(2, 0, dtype=torch.long),
            torch.zeros(0),
        )

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return self.node_features.shape[0]

    def neighbourhood(self, nodes: torch.Tensor, n_hops: int) -> Neighbourhood:
        """The ``n_hops``-hop in-neighbourhood of ``nodes`` (distinct), laid out for a bipartite last layer.

        The last call's result is kept: the diffusion and the mask encoders ask for the same nodes
        in a training step (an in-place change of the edges, e.g. ``load_state_dict``, drops it).
        """
        last = getattr(self, "_last_neighbourhood", None)
        if (
            last is not None
            and last[1] == (n_hops, self.edges._version)
            and last[2] is self.edges  # held, so a new edge tensor cannot reuse its address
            and last[0].device == nodes.device
            and last[0].shape == nodes.shape
            and bool((last[0] == nodes).all())
        ):
            return last[3]
        subset, edges, asked, edge_mask = k_hop_subgraph(
            nodes, n_hops, self.edges, relabel_nodes=True, num_nodes=self.n_nodes
        )
        into = torch.isin(edges[1], asked)
        source, target = edges[:, into]
        # The asked nodes come first among the sources, in the same order as the targets: a GAT layer
        # adds the self-loop of target i as the bipartite edge (i, i).
        sources = torch.cat([asked, source[~torch.isin(source, asked)].unique()])
        source_code = torch.empty(len(subset), dtype=torch.long, device=subset.device)
        source_code[sources] = torch.arange(len(sources), device=subset.device)
        target_code = torch.empty_like(source_code)
        target_code[asked] = torch.arange(len(asked), device=subset.device)
        result = Neighbourhood(
            subset, edges, edge_mask, asked, sources, torch.stack([source_code[source], target_code[target]]), into
        )
        self._last_neighbourhood = (nodes.clone(), (n_hops, self.edges._version), self.edges, result)
        return result


class Neighbourhood(NamedTuple):
    """A node set's in-neighbourhood in a graph (from :meth:`GraphTensors.neighbourhood`)."""

    subset: torch.Tensor
    """Nodes of the neighbourhood (graph indices)."""
    edges: torch.Tensor
    """Its edges, as positions in ``subset``."""
    edge_mask: torch.Tensor
    """Which graph edges these are."""
    asked: torch.Tensor
    """Positions of the asked nodes in ``subset``, in their order."""
    sources: torch.Tensor
    """Positions in ``subset`` of the asked nodes then their other in-neighbours."""
    last_edges: torch.Tensor
    """Edges into the asked nodes, as (position in ``sources``, position in ``asked``)."""
    into_asked: torch.Tensor
    """Which of ``edges`` end at an asked node."""


class PerturbationEncoder(nn.Module):
    """Embeds perturbations made of gene components (GAT over a gene graph) and plain categories.

    Tokens are the graph's nodes (embedded by the GAT output at that gene, paper A.7) followed by
    the categories without a prior, each a learned row (e.g. ``"stimulated"``). A perturbation is a
    padded list of token indices; each distinct component of a call passes once through an MLP and a
    perturbation's embedding is the sum over its components (permutation invariant, any number of
    them). The GAT runs once per call, only where the call's genes need it (their in-neighbourhood,
    exactly), never once per cell.

    Parameters
    ----------
    graph
        The training graph (may have zero nodes when every perturbation is a category).
    n_categories
        Number of learned categories.
    n_hidden
        Width of the token embeddings.
    n_output
        Width of the perturbation embedding.
    n_heads
        Attention heads per GAT layer.
    n_layers
        GAT layers.

    Examples
    --------
    A 3-gene path graph ``A - B - C`` with 8 node features and one category:

    >>> import torch
    >>> from scdoloris.perturbation import PerturbationVocabulary
    >>> from scdoloris.module import GraphTensors
    >>> _ = torch.manual_seed(0)
    >>> edges = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    >>> graph = GraphTensors(torch.randn(3, 8), torch.ones(3, dtype=torch.bool), edges, torch.ones(4))
    >>> encoder = PerturbationEncoder(graph, n_categories=1, n_hidden=16, n_output=4)
    >>> encoder.node_embeddings().shape  # the GAT's row of each of the 3 genes
    torch.Size([3, 16])
    >>> recipes = PerturbationVocabulary(["A", "B", "C"], ["stimulated"]).recipes([[], ["A"], ["B", "stimulated"]])
    >>> embedding = encoder(torch.as_tensor(recipes))
    >>> embedding.shape, bool((embedding[0] == 0).all())  # the control embeds to zero
    (torch.Size([3, 4]), True)
    """

    def __init__(
        self,
        graph: GraphTensors,
        n_categories: int,
        n_hidden: int = 256,
        n_output: int = 256,
        n_heads: int = 2,
        n_layers: int = 2,
    ):
        super().__init__()
        self.graph = graph
        self.n_categories = n_categories
        n_features = graph.node_features.shape[1]
        # Genes without measured expression share one learned feature vector.
        self.unmeasured_feature = nn.Parameter(0.1 * torch.randn(n_features))
        dims = [n_features] + [n_hidden] * n_layers
        self.gat_layers = nn.ModuleList(
            GATv2Conv(d_in, d_out // n_heads, heads=n_heads, edge_dim=1, add_self_loops=True, fill_value=1.0)
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)
        )
        self.category_embedding = nn.Embedding(max(n_categories, 1), n_hidden)
        self.pool = nn.Sequential(nn.Linear(n_hidden, n_output), nn.SiLU(), nn.Linear(n_output, n_output))
        self.n_output = n_output
        self.n_graph_evaluations = 0  # counted so tests can check the GAT runs once per batch

    def node_embeddings(self, graph: GraphTensors | None = None) -> torch.Tensor:
        """GAT output for every node of ``graph`` (the training graph by default).

        Training and prediction need only some nodes' rows, see :meth:`node_rows`.
        """
        graph = self.graph if graph is None else graph
        self.n_graph_evaluations += 1
        h, weights = self._features(graph), graph.weights[:, None]
        for layer in self.gat_layers[:-1]:
            h = nn.functional.elu(layer(h, graph.edges, weights))
        return self.gat_layers[-1](h, graph.edges, weights)

    def node_rows(self, graph: GraphTensors, nodes: torch.Tensor) -> torch.Tensor:
        """GAT output at ``nodes`` only, one row per entry of ``nodes`` (distinct node indices).

        Exactly the full graph's output there, from their ``n_layers``-hop in-neighbourhood: the
        layers before the last run on that neighbourhood, the last one only from the asked nodes'
        in-neighbours to the asked nodes (a bipartite layer). A training batch needs its perturbed
        genes only, tens of nodes out of thousands.
        """
        self.n_graph_evaluations += 1
        hood = graph.neighbourhood(nodes, len(self.gat_layers))
        h, weights = self._features(graph)[hood.subset], graph.weights[hood.edge_mask][:, None]
        for layer in self.gat_layers[:-1]:
            h = nn.functional.elu(layer(h, hood.edges, weights))
        return self.gat_layers[-1]((h[hood.sources], h[hood.asked]), hood.last_edges, weights[hood.into_asked])

    def _features(self, graph: GraphTensors) -> torch.Tensor:
        """Node features, with the shared learned vector on genes without measured expression."""
        return torch.where(graph.measured[:, None], graph.node_features, self.unmeasured_feature)

    def forward(self, recipes: torch.Tensor, graph: GraphTensors | None = None) -> torch.Tensor:
        """Embed perturbations.

        Parameters
        ----------
        recipes
            ``(batch, width)`` token rows padded with ``-1``; a row of ``-1`` only is the control and
            gets the zero embedding.
        graph
            Graph whose node order the recipes use (the training graph by default).
        """
        graph = self.graph if graph is None else graph
        present = recipes >= 0
        # Each distinct component through the MLP once, then summed per perturbation: a combination's
        # conditioning is the sum of its components', which is what lets doubles be predicted from
        # singles (and padding adds nothing).
        tokens, position = torch.unique(recipes[present], return_inverse=True)  # sorted: nodes first
        is_node = tokens < graph.n_nodes
        categories = self.category_embedding(tokens[~is_node] - graph.n_nodes)
        if bool(is_node.any()):
            rows = torch.cat([self.node_rows(graph, tokens[is_node]), categories])
        else:
            rows = categories
        pooled = self.pool(rows)
        out = pooled.new_zeros(recipes.shape[0], self.n_output)
        return out.index_add(0, present.nonzero()[:, 0], pooled[position])
