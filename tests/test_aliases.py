"""Genes named by old or alternative symbols (HGNC renames): read as their current symbols."""

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import scdoloris as sd
from scdoloris.perturbation import align_prior, go_edges, resolve_names, symbol_candidates

TINY = {"n_hidden": 16, "n_hidden_mask": 16, "n_perturbation": 8, "n_blocks": 1, "n_blocks_mask": 1}


def test_symbol_candidates_and_alignment():
    assert symbol_candidates("SEPT7") == ("SEPTIN7",) and symbol_candidates("SEPTIN7") == ("SEPTIN7",)
    assert set(symbol_candidates("12-LOX")) == {"ALOX12", "ALOX15"}  # ambiguous
    prior = pd.DataFrame({"source": ["SEPTIN7", "MARCHF1"], "target": ["A", "A"], "weight": [1.0, 1.0]})
    # The data's old name takes the prior's gene; a current name the data also use is never taken twice.
    renamed, aliases, _ = align_prior(prior, ["SEPT7", "A", "MARCH1", "MARCHF1"])
    assert aliases == {"SEPT7": "SEPTIN7"} and set(renamed["source"]) == {"SEPT7", "MARCHF1"}
    _, _, ambiguous = align_prior(
        pd.DataFrame({"source": ["ALOX12"], "target": ["ALOX15"], "weight": [1.0]}), ["12-LOX"]
    )
    assert ambiguous == {"12-LOX": ("ALOX12", "ALOX15")}
    assert resolve_names(["SEPTIN7", "A", "Z"], ["A", "SEPT7"], {"SEPT7": "SEPTIN7"}) == {"SEPTIN7": "SEPT7"}


@pytest.fixture(scope="module")
def old_symbol_model(train_kwargs):
    """A screen that perturbs MARCH1 (now MARCHF1) and measures GO neighbours of MARCHF1 and SEPTIN7."""
    go = go_edges()
    near = lambda g: sorted(set(go.loc[go["target"] == g, "source"]) | set(go.loc[go["source"] == g, "target"]))  # noqa: E731
    genes = sorted(set(near("MARCHF1")[:12] + near("SEPTIN7")[:12]) - {"MARCHF1", "SEPTIN7"})
    rng = np.random.default_rng(0)
    labels = ["control"] * 60 + ["MARCH1"] * 30 + ["LDHA"] * 30
    X = np.log1p(rng.poisson(3.0, (len(labels), len(genes)))).astype(np.float32)
    X[60:90, :4] += 1.0
    adata = AnnData(X, obs=pd.DataFrame({"perturbation": pd.Categorical(labels)}, index=[f"c{i}" for i in range(120)]))
    adata.var_names = genes
    sd.Doloris.setup_anndata(adata, perturbation_key="perturbation", control_value="control")
    model = sd.Doloris(adata, **TINY)  # gene_graph="auto" picks GO: MARCH1 is an old GO symbol
    model.train(max_steps=3, seed=0, **train_kwargs)
    return model


def test_training_reads_old_symbols_and_says_so(old_symbol_model):
    graph = old_symbol_model._summary.gene_graph
    assert "MARCH1" in graph.nodes and "MARCHF1" not in graph.nodes
    assert graph.aliases == {"MARCH1": "MARCHF1"}
    assert (
        "MARCH1 -> MARCHF1" in repr(old_symbol_model) or "MARCH1 -> MARCHF1" in old_symbol_model._model_summary_string
    )
    assert old_symbol_model._summary.categories == []  # not a learned category: a GO node


def test_prediction_by_current_or_old_symbol(old_symbol_model):
    kwargs = {"n_cells": 5, "n_steps": 3, "seed": 0}
    current = old_symbol_model.predict_perturbation(["MARCHF1"], **kwargs)
    old = old_symbol_model.predict_perturbation(["MARCH1"], **kwargs)
    np.testing.assert_array_equal(current.X, old.X)  # the same node, the same anchor
    assert current.uns["doloris_gene_aliases"] == {"MARCHF1": "MARCH1"} and "doloris_gene_aliases" not in old.uns
    assert list(current.obs["perturbation"].cat.categories) == ["MARCHF1"]  # the name asked for
    # A gene never trained, asked by its old symbol, is joined through its current symbol's GO edges.
    unseen = old_symbol_model.predict_perturbation(["SEPT7"], **kwargs)
    assert unseen.uns["doloris_gene_aliases"] == {"SEPT7": "SEPTIN7"}


def test_ambiguous_and_unknown_symbols_are_named(old_symbol_model):
    with pytest.raises(ValueError, match=r"Ambiguous gene symbol.*'12-LOX' could be \['ALOX12', 'ALOX15'\]"):
        old_symbol_model.predict_perturbation(["12-LOX"], n_cells=2, n_steps=2)
    with pytest.raises(ValueError, match=r"Unknown perturbation component\(s\) \['NOTAGENE'\]"):
        old_symbol_model.predict_perturbation(["NOTAGENE"], n_cells=2, n_steps=2)
