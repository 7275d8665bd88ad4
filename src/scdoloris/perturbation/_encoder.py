from __future__ import annotations

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

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return self.node_features.shape[0]


class PerturbationEncoder(nn.Module):
    """Embeds perturbations made of gene components (GAT over a gene graph) and plain categories.

    The token table holds one row per graph node (the GAT output at that gene, paper A.7) followed
    by one learned row per category without a prior (e.g. ``"stimulated"``). A perturbation is a
    padded list of token rows; its components are summed (permutation invariant, any number of
    them) and passed through an MLP. The GAT runs once per call over the whole graph and the
    rows are gathered, never once per cell.

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
    >>> from scdoloris.perturbation._encoder import GraphTensors
    >>> _ = torch.manual_seed(0)
    >>> edges = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    >>> graph = GraphTensors(torch.randn(3, 8), torch.ones(3, dtype=torch.bool), edges, torch.ones(4))
    >>> encoder = PerturbationEncoder(graph, n_categories=1, n_hidden=16, n_output=4)
    >>> encoder.token_table().shape  # 3 nodes + 1 category
    torch.Size([4, 16])
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

    def node_embeddings(self, graph: GraphTensors | None = None, nodes: torch.Tensor | None = None) -> torch.Tensor:
        """GAT output for every node of ``graph`` (the training graph by default).

        With ``nodes``, only those rows are computed (the others are zero): the GAT runs on their
        ``n_layers``-hop in-neighbourhood, which gives exactly the full graph's output there. A batch
        needs its perturbed genes only, a few hundred nodes out of thousands.
        """
        graph = self.graph if graph is None else graph
        self.n_graph_evaluations += 1
        features = torch.where(graph.measured[:, None], graph.node_features, self.unmeasured_feature)
        edges, weights = graph.edges, graph.weights
        if nodes is not None:
            subset, edges, mapping, edge_mask = k_hop_subgraph(
                nodes, len(self.gat_layers), edges, relabel_nodes=True, num_nodes=graph.n_nodes
            )
            features, weights = features[subset], weights[edge_mask]
        h = features
        for i, layer in enumerate(self.gat_layers):
            h = layer(h, edges, weights[:, None])
            if i < len(self.gat_layers) - 1:
                h = nn.functional.elu(h)
        if nodes is None:
            return h
        # Rows of the neighbourhood's border are not the full graph's: keep the asked nodes only.
        return h.new_zeros(graph.n_nodes, h.shape[1]).index_copy(0, subset[mapping], h[mapping])

    def token_table(
        self, graph: GraphTensors | None = None, with_nodes: bool = True, nodes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows for every graph node then every category, shape ``(n_nodes + n_categories, n_hidden)``.

        ``nodes`` limits the computed node rows to those (see :meth:`node_embeddings`).
        """
        graph = self.graph if graph is None else graph
        categories = self.category_embedding.weight[: self.n_categories]
        if not with_nodes or graph.n_nodes == 0:
            node_rows = categories.new_zeros(graph.n_nodes, categories.shape[1])
        else:
            node_rows = self.node_embeddings(graph, nodes)
        return torch.cat([node_rows, categories], dim=0)

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
        is_node = present & (recipes < graph.n_nodes)
        uses_nodes = bool(is_node.any())
        table = self.token_table(graph, with_nodes=uses_nodes, nodes=recipes[is_node].unique() if uses_nodes else None)
        # Each component through the MLP, then summed: a combination's conditioning is the sum of its
        # components', which is what lets doubles be predicted from singles (and padding adds nothing).
        return (self.pool(table[recipes.clamp(min=0)]) * present[..., None]).sum(dim=1)
