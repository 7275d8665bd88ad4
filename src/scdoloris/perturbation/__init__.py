"""Perturbation labels, gene-graph priors and the encoders that embed perturbations."""

from ._encoder import PerturbationEncoder
from ._gene_graph import GeneGraph, coexpression_edges, freeze_prior, go_edges, resolve_gene_graph, thaw_prior
from ._molecules import MoleculeEncoder, MoleculeFeatures, dose_scale, morgan_fingerprints
from ._vocabulary import PerturbationVocabulary, split_perturbation

__all__ = [
    "GeneGraph",
    "MoleculeEncoder",
    "MoleculeFeatures",
    "dose_scale",
    "morgan_fingerprints",
    "PerturbationEncoder",
    "PerturbationVocabulary",
    "coexpression_edges",
    "go_edges",
    "resolve_gene_graph",
    "freeze_prior",
    "thaw_prior",
    "split_perturbation",
]
