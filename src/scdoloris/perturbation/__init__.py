"""Perturbation labels, gene-graph priors and molecule features, torch-free.

The torch encoders that embed perturbations (``PerturbationEncoder``, ``MoleculeEncoder``,
``dose_scale``) live in :mod:`scdoloris.module`, a floor above: this package imports nothing of it.
"""

from ._aliases import align_prior, resolve_names, symbol_candidates
from ._gene_graph import GeneGraph, coexpression_edges, freeze_prior, go_edges, resolve_gene_graph, thaw_prior
from ._molecules import MoleculeFeatures, morgan_fingerprints
from ._vocabulary import COMBINATION_SEPARATOR as COMBINATION_SEPARATOR  # used by sibling packages
from ._vocabulary import DOSE_SEPARATOR as DOSE_SEPARATOR
from ._vocabulary import PerturbationVocabulary, dosed_label, split_perturbation
from ._vocabulary import canonical as canonical  # the order-free key of a condition

__all__ = [
    "GeneGraph",
    "MoleculeFeatures",
    "morgan_fingerprints",
    "PerturbationVocabulary",
    "coexpression_edges",
    "go_edges",
    "resolve_gene_graph",
    "freeze_prior",
    "thaw_prior",
    "split_perturbation",
    "dosed_label",
    "symbol_candidates",
    "align_prior",
    "resolve_names",
]
