"""Perturbation labels, vocabulary, gene graph and the GAT encoder."""

import numpy as np
import pandas as pd
import pytest
import torch

import scdoloris as sd
from scdoloris.module import GraphTensors, PerturbationEncoder
from scdoloris.perturbation import (
    GeneGraph,
    PerturbationVocabulary,
    freeze_prior,
    go_edges,
    split_perturbation,
    thaw_prior,
)


# ---------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    ("label", "controls", "expected"),
    [
        ("KLF1", (), ["KLF1"]),
        ("KLF1+MAP2K6", (), ["KLF1", "MAP2K6"]),
        ("A+B+C", (), ["A", "B", "C"]),
        (" A + B ", (), ["A", "B"]),
        ("KLF1+ctrl", ["ctrl"], ["KLF1"]),
        ("ctrl+KLF1", ["ctrl"], ["KLF1"]),
        ("ctrl", ["ctrl"], []),
        ("control", ["control", "ctrl"], []),
        ("ctrl", (), ["ctrl"]),
    ],
)
def test_split_perturbation(label, controls, expected):
    assert split_perturbation(label, controls) == expected


# ---------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_tokens_and_padding():
    vocab = PerturbationVocabulary(nodes=["G1", "G2", "G3"], categories=["stim", "drug"])
    assert [vocab.token(c) for c in ["G1", "G3", "stim", "drug"]] == [0, 2, 3, 4]
    assert vocab.token("nope") is None
    recipes = vocab.recipes([["G1"], ["G2", "G3"], [], ["drug", "G1", "stim"]])
    assert recipes.dtype == np.int64
    np.testing.assert_array_equal(recipes, [[0, -1, -1], [1, 2, -1], [-1, -1, -1], [4, 0, 3]])
    np.testing.assert_array_equal(vocab.recipes([["G2"]], width=4), [[1, -1, -1, -1]])
    np.testing.assert_array_equal(vocab.recipes([[]]), [[-1]])


def test_vocabulary_unknown_components_named():
    vocab = PerturbationVocabulary(nodes=["G1"], categories=["stim"])
    with pytest.raises(KeyError) as info:
        vocab.recipes([["G1", "FOO"], ["BAR"], ["stim"]])
    message = str(info.value)
    assert "FOO" in message and "BAR" in message and "G1" not in message


# ---------------------------------------------------------------------------------------- gene graph
@pytest.fixture
def prior():
    # A, B, C measured; X unmeasured, linked to A; P two steps from C through the bridge Q;
    # Z only linked to A; W1-W2 apart from everything; Y unknown to the prior.
    return pd.DataFrame(
        {
            "source": ["A", "B", "X", "Z", "W1", "P", "Q"],
            "target": ["B", "C", "A", "A", "W2", "Q", "C"],
            "weight": [0.5, 0.7, 0.9, 0.3, 1.0, 0.6, 0.8],
        }
    )


def _edge_set(graph):
    return {
        (graph.nodes[s], graph.nodes[t], round(float(w), 6))
        for s, t, w in zip(graph.edges[0], graph.edges[1], graph.weights, strict=True)
    }


MEASURED_EDGES = {("A", "B", 0.5), ("B", "A", 0.5), ("B", "C", 0.7), ("C", "B", 0.7)}


def test_gene_graph_build(prior):
    graph = GeneGraph.build(prior, measured=["A", "B", "C"], perturbed=["X", "Y", "A", "P"])
    # Measured first in expression order, then perturbed genes, then bridges; Y is unknown.
    assert graph.nodes == ["A", "B", "C", "X", "P", "Q"]
    assert graph.n_measured == 3 and graph.n_nodes == 6
    # Measured genes talk both ways; added nodes only listen (to the graph and to each other).
    assert _edge_set(graph) == MEASURED_EDGES | {
        ("A", "X", 0.9),
        ("C", "Q", 0.8),
        ("Q", "P", 0.6),
        ("P", "Q", 0.6),
    }


def test_gene_graph_isolated_training_gene_is_kept(prior):
    graph = GeneGraph.build(prior, measured=["A", "B", "C"], perturbed=["W1"])
    assert graph.nodes == ["A", "B", "C", "W1"]
    assert _edge_set(graph) == MEASURED_EDGES


def test_gene_graph_without_prior():
    graph = GeneGraph.build(None, measured=["A", "B"], perturbed=["X"])
    assert graph.nodes == ["A", "B"] and graph.n_measured == 2
    assert graph.edges.shape == (2, 0)
    with pytest.raises(KeyError, match="X"):
        graph.extended(["X"])


def test_gene_graph_extended(prior):
    graph = GeneGraph.build(prior, measured=["A", "B", "C"], perturbed=["X"])
    assert graph.nodes == ["A", "B", "C", "X"]
    bigger = graph.extended(["Z", "P"])
    assert bigger.nodes == ["A", "B", "C", "X", "Z", "P", "Q"] and bigger.n_measured == 3
    assert _edge_set(bigger) == _edge_set(graph) | {
        ("A", "Z", 0.3),
        ("C", "Q", 0.8),
        ("Q", "P", 0.6),
        ("P", "Q", 0.6),
    }
    # Adding a gene at prediction joins it exactly as training would have.
    trained = GeneGraph.build(prior, measured=["A", "B", "C"], perturbed=["X", "Z", "P"])
    assert _edge_set(trained) == _edge_set(bigger)
    # The original is untouched and genes already in the graph add nothing.
    assert graph.nodes == ["A", "B", "C", "X"]
    assert graph.extended(["A", "X"]) is graph
    with pytest.raises(KeyError, match="W1"):
        graph.extended(["Z", "W1"])
    with pytest.raises(KeyError, match="Y"):
        graph.extended(["Y"])


def test_gene_graph_extended_twice_equals_a_fresh_extension():
    """The undirected prior kept between calls gives the edges (in order) of a graph that never kept it."""
    from scdoloris.perturbation._gene_graph import go_edges

    edges = go_edges()
    measured = list(dict.fromkeys(edges["target"]))[:300]
    graph = GeneGraph.build(edges, measured=measured, perturbed=["KLF1"])
    graph.extended(["CEBPE", "FOXO4"])  # fills the kept prior
    assert len(graph._undirected) == 1
    again = graph.extended(["MAP2K6", "SGK1"])
    fresh = GeneGraph.from_dict(graph.to_dict()).extended(["MAP2K6", "SGK1"])
    assert again.nodes == fresh.nodes
    np.testing.assert_array_equal(again.edges, fresh.edges)
    np.testing.assert_array_equal(again.weights, fresh.weights)
    assert again._undirected is graph._undirected  # an extended graph shares what it was extended with


def test_gene_graph_round_trip(prior):
    frozen = freeze_prior(prior)
    graph = GeneGraph.build(thaw_prior(frozen), measured=["A", "B", "C"], perturbed=["X"], frozen=frozen)
    again = GeneGraph.from_dict(graph.to_dict())
    assert again.nodes == graph.nodes and again.n_measured == graph.n_measured
    np.testing.assert_array_equal(again.edges, graph.edges)
    np.testing.assert_array_equal(again.weights, graph.weights)
    assert _edge_set(again.extended(["P"])) == _edge_set(graph.extended(["P"]))


def test_frozen_go_prior_is_kept_by_name():
    assert freeze_prior("go") == ["go"]
    assert freeze_prior(None) == [] and thaw_prior([]) is None
    assert len(thaw_prior(["go"])) == len(go_edges())


# ---------------------------------------------------------------------------------------- encoder
@pytest.fixture
def encoder():
    rng = np.random.default_rng(0)
    n_nodes = 12
    edges = np.array([[i, (i + 1) % n_nodes] for i in range(n_nodes)]).T
    edges = np.concatenate([edges, edges[::-1]], axis=1)
    graph = GraphTensors(
        torch.as_tensor(rng.normal(size=(n_nodes, 8)), dtype=torch.float32),
        torch.arange(n_nodes) < 10,  # the last 2 nodes are unmeasured genes
        torch.as_tensor(edges),
        torch.ones(edges.shape[1]),
    )
    torch.manual_seed(0)
    enc = PerturbationEncoder(graph, n_categories=2, n_hidden=16, n_output=8)
    return enc.eval()


def test_encoder_permutation_invariant(encoder):
    out = encoder(torch.tensor([[0, 3], [3, 0], [0, -1], [10, 12], [12, 10]]))
    assert out.shape == (5, 8)
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[3], out[4])
    assert not torch.allclose(out[0], out[2])  # A+B is not A
    # Padding does not matter.
    torch.testing.assert_close(encoder(torch.tensor([[0]]))[0], out[2])


def test_encoder_control_is_zero(encoder):
    out = encoder(torch.tensor([[-1, -1], [1, 2], [-1, -1]]))
    assert torch.equal(out[0], torch.zeros(8)) and torch.equal(out[2], torch.zeros(8))
    assert out[1].abs().sum() > 0


def test_encoder_distinguishes_perturbations(encoder):
    with torch.no_grad():
        out = encoder(torch.arange(14)[:, None])  # 12 gene nodes and 2 categories
    distances = torch.cdist(out, out)
    off_diagonal = distances[~torch.eye(14, dtype=torch.bool)]
    assert float(off_diagonal.min()) > 1e-4


@pytest.mark.parametrize("batch", [1, 500])
def test_gat_runs_once_per_forward(encoder, batch):
    recipes = torch.randint(0, 12, (batch, 2), generator=torch.Generator().manual_seed(batch))
    before = encoder.n_graph_evaluations
    out = encoder(recipes)
    assert encoder.n_graph_evaluations == before + 1
    assert out.shape == (batch, 8)


def test_encoder_on_extended_graph(encoder):
    """A bigger graph (new gene nodes) runs through the same weights; old rows keep their embedding."""
    graph = encoder.graph
    extra_edges = torch.tensor([[12, 0], [0, 12]])
    bigger = GraphTensors(
        torch.cat([graph.node_features, torch.zeros(1, 8)]),
        torch.cat([graph.measured, torch.tensor([False])]),
        torch.cat([graph.edges, extra_edges], dim=1),
        torch.cat([graph.weights, torch.ones(2)]),
    )
    out = encoder(torch.tensor([[12], [5], [13]]), bigger)  # new gene, old gene, first category
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], encoder(torch.tensor([[5]]))[0])
    torch.testing.assert_close(out[2], encoder(torch.tensor([[12]]))[0])  # categories follow the nodes


# ---------------------------------------------------------------------------------------- in the module
@pytest.fixture(scope="module")
def fresh_model(synthetic_two_types, small_model_kwargs, training_subset):
    train = training_subset(synthetic_two_types)
    return sd.Doloris(train, gene_graph=synthetic_two_types.uns["synthetic"]["edges"], **small_model_kwargs)


def test_each_gat_runs_once_per_loss(fresh_model):
    module = fresh_model.module
    train = fresh_model.adata
    labels = list(fresh_model.summary_["perturbation_labels"])
    perturbed = np.flatnonzero((train.obs["perturbation"] != "control").to_numpy())[:64]
    rows = np.concatenate([perturbed, np.flatnonzero((train.obs["perturbation"] == "control").to_numpy())[:16]])
    x = torch.as_tensor(train.X[rows])
    codes = torch.as_tensor([labels.index(p) for p in train.obs["perturbation"].iloc[rows]])
    cell_types = torch.as_tensor(train.obs["cell_type"].cat.codes.to_numpy()[rows], dtype=torch.long)
    encoders = [module.encoder, module.mask_encoder]
    before = [e.n_graph_evaluations for e in encoders]
    torch.manual_seed(0)
    losses = module.loss(x, codes, cell_types)
    assert [e.n_graph_evaluations for e in encoders] == [b + 1 for b in before]
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    # Both encoders' GATs receive gradients from that single pass.
    for e in encoders:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.gat_layers.parameters())


def test_gat_runs_once_per_training_step(fresh_model, train_kwargs):
    """Through Lightning: with no validation set, each optimizer step runs each encoder's GAT once."""
    module = fresh_model.module
    before = (module.encoder.n_graph_evaluations, module.mask_encoder.n_graph_evaluations)
    fresh_model.train(max_steps=4, batch_size=32, train_size=1.0, seed=0, **train_kwargs)
    after = (module.encoder.n_graph_evaluations, module.mask_encoder.n_graph_evaluations)
    assert after == (before[0] + 4, before[1] + 4)


def _random_graph(rng, edges: np.ndarray, n_nodes: int, n_measured: int) -> GraphTensors:
    """Random 8-dimensional node features and edge weights on ``edges``; the first ``n_measured`` nodes measured."""
    return GraphTensors(
        torch.as_tensor(rng.normal(size=(n_nodes, 8)), dtype=torch.float32),
        torch.arange(n_nodes) < n_measured,
        torch.as_tensor(edges),
        torch.as_tensor(rng.uniform(0.1, 1.0, edges.shape[1]), dtype=torch.float32),
    )


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_gat_rows_and_gradients_at_asked_nodes_equal_full_graph(n_layers):
    """The bipartite last layer gives the full graph's rows and parameter gradients, self-loops included."""
    rng = np.random.default_rng(n_layers)
    n_nodes = 120
    edges = rng.integers(0, n_nodes, size=(2, 500))
    edges = np.concatenate([edges, np.stack([np.arange(0, n_nodes, 7)] * 2)], axis=1)  # some self-loops
    graph = _random_graph(rng, edges, n_nodes, n_measured=100)
    torch.manual_seed(0)
    enc = PerturbationEncoder(graph, n_categories=0, n_hidden=16, n_output=8, n_layers=n_layers)
    nodes = torch.tensor([105, 14, 0, 63])  # unsorted, one unmeasured, one with a self-loop
    weights = torch.randn(len(nodes), 16)

    def rows_and_grads(rows_fn):
        enc.zero_grad()
        rows = rows_fn()
        (rows * weights).sum().backward()
        return rows.detach(), [p.grad.clone() for p in enc.parameters() if p.grad is not None]

    full, full_grads = rows_and_grads(lambda: enc.node_embeddings()[nodes])
    part, part_grads = rows_and_grads(lambda: enc.node_rows(graph, nodes))
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-6)
    assert len(part_grads) == len(full_grads) > 0
    for a, b in zip(part_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_forward_pools_full_graph_rows_and_sums_components():
    """A perturbation's embedding is the sum of its components' pooled rows, the GAT rows as on the full graph."""
    rng = np.random.default_rng(1)
    n_nodes = 200
    edges = rng.integers(0, n_nodes, size=(2, 800))
    edges = edges[:, edges[0] != edges[1]]
    graph = _random_graph(rng, edges, n_nodes, n_measured=150)
    torch.manual_seed(0)
    enc = PerturbationEncoder(graph, n_categories=1, n_hidden=16, n_output=8).eval()
    with torch.no_grad():
        full = enc.node_embeddings()
        recipes = torch.tensor([[3, 77], [160, -1], [199, 200]])  # 200 is the category
        via_forward = enc(recipes)
        expected = enc.pool(torch.cat([full, enc.category_embedding.weight[:1]])[recipes.clamp(min=0)])
        expected = (expected * (recipes >= 0)[..., None]).sum(dim=1)
    torch.testing.assert_close(via_forward, expected, rtol=1e-5, atol=1e-6)


def test_neighbourhood_reused_for_same_nodes_and_dropped_when_edges_change():
    """Both encoders of a training step ask for the same nodes: the neighbourhood is computed once."""
    edges = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 0]])
    graph = GraphTensors(torch.randn(4, 8), torch.ones(4, dtype=torch.bool), edges, torch.ones(4))
    first = graph.neighbourhood(torch.tensor([1, 3]), 2)
    assert graph.neighbourhood(torch.tensor([1, 3]), 2) is first
    assert graph.neighbourhood(torch.tensor([1, 2]), 2) is not first
    again = graph.neighbourhood(torch.tensor([1, 2]), 2)
    assert sorted(again.subset[again.sources].tolist()) == [0, 1, 2]  # 1 and 2, and 0 -> 1
    graph.load_state_dict({**graph.state_dict(), "edges": torch.tensor([[1, 2, 3, 0], [0, 1, 2, 3]])})
    changed = graph.neighbourhood(torch.tensor([1, 2]), 2)
    assert changed is not again
    assert sorted(changed.subset[changed.sources].tolist()) == [1, 2, 3]  # reversed edges: 2 -> 1, 3 -> 2
    graph.edges = graph.edges.flip(0)  # a new tensor (back to the first edges), version 0 again
    flipped = graph.neighbourhood(torch.tensor([1, 2]), 2)
    assert flipped is not changed
    assert sorted(flipped.subset[flipped.sources].tolist()) == [0, 1, 2]


def test_a_dosed_combination_keeps_the_dose_on_every_component():
    """One spelling of (label, dose) for the model's anchor and the runner: "A@100+B@100", not "A+B@100"."""
    from scdoloris.baselines._dose import split_dose
    from scdoloris.benchmark._methods import _dosed
    from scdoloris.perturbation import dosed_label, split_perturbation

    for label in (dosed_label("A+B", 100.0), _dosed("A+B", 100.0)):
        assert [split_dose(c) for c in split_perturbation(label)] == [("A", 100.0), ("B", 100.0)]
    assert dosed_label("A+B", [10, 100]) == "A@10+B@100"
    assert dosed_label("ctrl+A", 5, control_values=["ctrl"]) == "A@5"
    with pytest.raises(ValueError, match="3 doses for the 2 components"):
        dosed_label("A+B", [1, 2, 3])
