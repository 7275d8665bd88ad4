"""The model's training summary and a prediction request, as tensors for the module."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import TrainingSummary
from ..module import GraphTensors, ModuleInputs
from ..perturbation import GeneGraph, resolve_names, symbol_candidates, thaw_prior
from ..prediction import Request


def graph_tensors(summary: TrainingSummary, graph: GeneGraph | None = None) -> GraphTensors:
    """The gene graph as tensors: the training graph, or ``graph`` extended with new genes (unmeasured features 0)."""
    graph = summary.gene_graph if graph is None else graph
    features = np.zeros((graph.n_nodes, summary.node_features.shape[1]), dtype=np.float32)
    features[: summary.node_features.shape[0]] = summary.node_features
    measured = np.arange(graph.n_nodes) < graph.n_measured
    return GraphTensors(
        torch.as_tensor(features),
        torch.as_tensor(measured),
        torch.as_tensor(graph.edges),
        torch.as_tensor(graph.weights),
    )


def condition_lookup(summary: TrainingSummary) -> np.ndarray:
    """Row of each (perturbation code, cell-type code, dose code) in the per-condition tables, -1 if untrained."""
    shape = (len(summary.perturbation_labels), len(summary.cell_types), len(summary.dose_values))
    lookup = np.full(shape, -1, dtype=np.int64)
    rows = np.arange(len(summary.condition_perturbation))
    lookup[summary.condition_perturbation, summary.condition_cell_type, summary.condition_dose] = rows
    return lookup


def module_inputs(summary: TrainingSummary) -> ModuleInputs:
    """The module's typed input, made from the training summary (the one source of truth)."""
    molecules = summary.molecule_features
    return ModuleInputs(
        x_max=summary.x_max,
        control_mean=torch.as_tensor(summary.control_mean),
        control_std=torch.as_tensor(summary.control_std),
        graph=graph_tensors(summary),
        n_categories=len(summary.categories),
        train_recipes=torch.as_tensor(summary.train_recipes),
        is_control=torch.as_tensor(summary.is_control),
        expressed_prior_mean=torch.as_tensor(summary.cell_type_expressed_mean),
        expressed_prior_std=torch.as_tensor(summary.cell_type_expressed_std),
        condition_lookup=torch.as_tensor(condition_lookup(summary)),
        expressed_mean=torch.as_tensor(summary.condition_expressed_mean),
        expressed_std=torch.as_tensor(summary.condition_expressed_std),
        molecule_features=None if molecules is None else torch.as_tensor(molecules.features),
        molecule_recipes=torch.as_tensor(summary.molecule_recipes),
        dose_values=torch.as_tensor(summary.dose_values),
    )


@dataclass
class PerturbationInputs:
    """Token recipes of the asked perturbations, with the graph and molecules they need."""

    recipes: torch.Tensor
    graph: GraphTensors
    molecules: torch.Tensor | None = None
    molecule_doses: torch.Tensor | None = None
    molecule_features: torch.Tensor | None = None
    # Asked gene names read under another symbol: {asked: node or prior symbol}; ``renamed`` holds
    # those that are the model's own nodes under another name ({asked: node}).
    aliases: dict = field(default_factory=dict)
    renamed: dict = field(default_factory=dict)

    def to(self, device) -> tuple:
        """The arguments of :meth:`~scdoloris.module.DolorisModule.embed`, on ``device``."""
        tensors = (self.recipes, self.graph, self.molecules, self.molecule_doses, self.molecule_features)
        return tuple(None if t is None else t.to(device) for t in tensors)


def _unknown_components(unknown: list[str], graph, molecules) -> ValueError:
    """The error for components the model cannot embed, naming ambiguous old symbols apart."""
    prior = thaw_prior(graph.prior)
    in_prior = set() if prior is None else set(prior["source"]) | set(prior["target"])
    candidates = {name: [s for s in symbol_candidates(name) if s in in_prior] for name in unknown}
    ambiguous = {name: symbols for name, symbols in candidates.items() if len(symbols) > 1}
    unknown = [name for name in unknown if name not in ambiguous]
    parts = []
    if ambiguous:
        choices = "; ".join(f"{name!r} could be {symbols}" for name, symbols in ambiguous.items())
        parts.append(f"Ambiguous gene symbol(s): {choices}. Ask for the current symbol you mean.")
    if unknown:
        hint = " Molecules never seen in training need their SMILES: smiles={name: SMILES}." if molecules else ""
        parts.append(
            f"Unknown perturbation component(s) {unknown}: not a perturbation seen in training, and not a gene "
            f"(nor an old symbol of one) that the model's gene-graph prior links to its {graph.n_measured} "
            "measured genes within two steps." + hint
        )
    return ValueError(" ".join(parts))


def perturbation_inputs(
    summary: TrainingSummary, request: Request, smiles: dict[str, str] | None, needs_dose: bool
) -> PerturbationInputs:
    """What the module's encoders need for ``request``: graph tokens and molecule rows with doses.

    Genes unknown to the training graph are added when the gene-graph prior links them to the
    measured genes; molecules never seen in training come from ``smiles`` (or the molecule table).

    Raises
    ------
    ValueError
        A component that is not a trained perturbation, a gene the prior links, or a known molecule;
        ``smiles`` for a model without molecules; a molecule without a dose where doses were trained.
    """
    components, doses = request.components, request.doses
    molecules = summary.molecule_features
    if smiles:
        if molecules is None:
            raise ValueError(
                "smiles= was given, but this model was trained without molecules; set it up with "
                "setup_anndata(..., smiles_key=...) to predict molecules from their structure."
            )
        # A trained molecule given again must be the same structure (extended() refuses another one).
        molecules = molecules.extended(smiles)
    if molecules is not None and molecules.table is not None:
        # Table features: molecules named in the table need no SMILES.
        in_table = {str(name) for name in molecules.table.index}
        named = {c: None for comps in components for c in comps if c in in_table and c not in molecules}
        molecules = molecules.extended(named) if named else molecules
    molecule_names = set(molecules.names) if molecules is not None else set()
    gene_parts = [[c for c in comps if c not in molecule_names] for comps in components]
    molecule_parts = [[c for c in comps if c in molecule_names] for comps in components]
    if any(molecule_parts) and not request.has_doses and needs_dose:
        raise ValueError("Molecular perturbations need a dose: pass dose= (a number, or one per perturbation).")

    graph = summary.gene_graph
    known = set(graph.nodes) | set(summary.categories)
    # A gene asked by another symbol than the model's node for it ("MARCHF1" for a "MARCH1" node).
    renamed = resolve_names(
        sorted({c for comps in gene_parts for c in comps if c not in known}), graph.nodes, graph.aliases
    )
    gene_parts = [[renamed.get(c, c) for c in comps] for comps in gene_parts]
    new_genes = sorted({c for comps in gene_parts for c in comps if c not in known})
    try:
        extended = graph.extended(new_genes)
    except KeyError as error:
        raise _unknown_components(error.args[0], graph, molecules) from None
    aliases = {**renamed, **{g: extended.aliases[g] for g in new_genes if g in extended.aliases}}
    recipes = summary.vocabulary(extended).recipes(gene_parts)
    inputs = PerturbationInputs(
        torch.as_tensor(recipes), graph_tensors(summary, extended), aliases=aliases, renamed=renamed
    )
    if molecules is not None:
        # Without a dose column every molecule acts at dose 1 (the scale's unit).
        rows, molecule_doses = molecules.recipes(molecule_parts, [1.0 if d is None else d for d in doses])
        inputs.molecules = torch.as_tensor(rows)
        inputs.molecule_doses = torch.as_tensor(molecule_doses)
        inputs.molecule_features = torch.as_tensor(molecules.features)
    return inputs
