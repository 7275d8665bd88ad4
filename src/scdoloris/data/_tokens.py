"""How perturbations become tokens: gene-graph nodes, learned categories and molecules; ``gene_graph="auto"``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..perturbation import (
    GeneGraph,
    MoleculeFeatures,
    PerturbationVocabulary,
    freeze_prior,
    split_perturbation,
    thaw_prior,
)
from ._rows import read_rows

MAX_COEXPRESSION_CELLS = 5000


@dataclass(frozen=True)
class _Tokens:
    """How the perturbations are embedded: gene graph nodes, learned categories and molecules."""

    graph: GeneGraph
    categories: list[str]  # components that are neither molecules nor graph nodes
    train_recipes: np.ndarray  # (labels, width) token rows of the gene and category components
    molecules: MoleculeFeatures | None
    molecule_recipes: np.ndarray  # (labels, width) molecule rows, -1 padded


def _molecules(
    components: list[list[str]],
    perturbation_codes: np.ndarray,
    smiles: Sequence[str] | None,
    molecule_table: pd.DataFrame | None,
) -> tuple[dict[str, str | None], MoleculeFeatures | None]:
    """The components that are molecules (with a SMILES, or named in ``molecule_table``) and their features."""
    molecule_smiles = _molecule_smiles(components, perturbation_codes, smiles) if smiles is not None else {}
    if molecule_table is not None:
        in_table = {str(name) for name in molecule_table.index}
        for comps in components:
            molecule_smiles.update({c: None for c in comps if c in in_table and c not in molecule_smiles})
        if not molecule_smiles:
            raise ValueError(
                "molecule_table was given, but no perturbation is a molecule: register a SMILES column "
                "(setup_anndata(..., smiles_key=...)) or index the table by the perturbation labels' components."
            )
        return molecule_smiles, MoleculeFeatures.from_table(molecule_table, molecule_smiles)
    return molecule_smiles, MoleculeFeatures.from_smiles(molecule_smiles) if molecule_smiles else None


def _perturbation_tokens(
    X,
    perturbation_codes: np.ndarray,
    perturbation_labels: Sequence[str],
    control_values: Sequence[str],
    gene_names: Sequence[str],
    cell_is_control: np.ndarray,
    gene_graph,
    smiles: Sequence[str] | None,
    molecule_table: pd.DataFrame | None,
    rng: np.random.Generator,
) -> _Tokens:
    """Perturbation components: molecules (with a SMILES), genes known to the graph prior, the rest learned categories.

    A co-expression prior is computed from up to ``MAX_COEXPRESSION_CELLS`` control cells of ``X``.
    """
    components = [split_perturbation(label, control_values) for label in perturbation_labels]
    molecule_smiles, molecules = _molecules(components, perturbation_codes, smiles, molecule_table)
    gene_components = [[c for c in comps if c not in molecule_smiles] for comps in components]
    all_components = sorted({c for comps in gene_components for c in comps})
    gene_names = [str(g) for g in gene_names]
    control_rows = np.flatnonzero(cell_is_control)
    if len(control_rows) > MAX_COEXPRESSION_CELLS:
        control_rows = np.sort(rng.choice(control_rows, MAX_COEXPRESSION_CELLS, replace=False))
    if isinstance(gene_graph, str) and gene_graph == "auto":
        gene_graph = auto_graph(all_components, gene_names)
    specs = gene_graph if isinstance(gene_graph, list | tuple) else [gene_graph]
    needs_controls = any(isinstance(s, str) and s == "coexpression" for s in specs)
    frozen = freeze_prior(gene_graph, read_rows(X, control_rows) if needs_controls else None, gene_names)
    graph = GeneGraph.build(thaw_prior(frozen), gene_names, all_components, frozen)
    node_set = set(graph.nodes)
    categories = [c for c in all_components if c not in node_set]
    train_recipes = PerturbationVocabulary(graph.nodes, categories).recipes(gene_components)
    if molecules is not None:
        molecule_components = [[c for c in comps if c in molecule_smiles] for comps in components]
        molecule_recipes, _ = molecules.recipes(molecule_components, [0.0] * len(components))
    else:
        molecule_recipes = np.full((len(components), 1), -1, dtype=np.int64)
    return _Tokens(graph, categories, train_recipes, molecules, molecule_recipes)


def _split_smiles(value: str) -> list[str]:
    """Split ``"A+B"`` SMILES at ``+`` outside brackets (``[N+]`` is a charge, not a separator)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(value):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "+" and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    return parts + [value[start:]]


def _molecule_smiles(components, perturbation_codes, smiles) -> dict[str, str]:
    """``{molecule: SMILES}`` from a per-cell SMILES column (``"+"``-joined like the labels)."""
    smiles = np.asarray(smiles, dtype=object)
    found: dict[str, str] = {}
    for code, comps in enumerate(components):
        if not comps:
            continue
        values = {str(v) for v in smiles[perturbation_codes == code] if isinstance(v, str) and v not in ("", "nan")}
        if len(values) > 1:
            raise ValueError(f"Cells of perturbation {'+'.join(comps)!r} carry different SMILES: {sorted(values)[:3]}.")
        if not values:
            continue
        value = next(iter(values))
        parts = [value] if len(comps) == 1 else _split_smiles(value)
        if len(parts) != len(comps):
            raise ValueError(
                f"Perturbation {'+'.join(comps)!r} has {len(comps)} component(s) but its SMILES has {len(parts)}; "
                "join the SMILES of a combination with '+' in the order of the label."
            )
        for name, value in zip(comps, parts, strict=True):
            if found.setdefault(name, value) != value:
                raise ValueError(f"Molecule {name!r} has two SMILES: {found[name]!r} and {value!r}.")
    return found


def auto_graph(components: Sequence[str], gene_names: Sequence[str]):
    """The graph prior ``gene_graph="auto"`` stands for, picked from the data.

    ``"go"`` when a perturbed component is a gene of the bundled GO graph (human gene symbols), else
    ``"coexpression"`` when one is a measured gene, else ``None`` (no prior: all components are
    learned categories). Doloris and the linear baseline apply this same rule.

    Parameters
    ----------
    components
        Perturbed components (genes or other names) of the training labels.
    gene_names
        Measured genes.

    Returns
    -------
    ``"go"``, ``"coexpression"`` or ``None``.

    Examples
    --------
    >>> from scdoloris.data import auto_graph
    >>> auto_graph(["G001"], ["G001", "G002"]), auto_graph(["drugA"], ["G001"]), auto_graph([], ["G001"])
    ('coexpression', None, None)
    """
    from ..perturbation import go_edges, symbol_candidates

    if not components:
        return None
    go = go_edges()
    go_genes = set(go["source"]) | set(go["target"])
    if any(c in go_genes or any(s in go_genes for s in symbol_candidates(c)) for c in components):
        return "go"  # also when the screen names genes by old symbols (MARCH1 for MARCHF1)
    if any(c in set(gene_names) for c in components):
        return "coexpression"
    return None
