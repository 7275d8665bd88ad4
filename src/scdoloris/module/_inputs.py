"""The typed input of :class:`~scdoloris.module.DolorisModule`: what it keeps of its training data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._perturbation_encoder import GraphTensors


@dataclass
class ModuleInputs:
    """Tensors the module is built from, made from the model's training summary.

    Statistics are on the ``[0, 1]`` scale (expression divided by ``x_max``, paper Sec. 3.2).

    Attributes
    ----------
    x_max
        Maximum of the training expression.
    control_mean, control_std
        ``(cell types, genes)`` statistics of the training controls (Eq. 12).
    graph
        Gene-graph tensors of the GAT.
    n_categories
        Perturbation components without a prior (learned embeddings).
    train_recipes
        ``(perturbation codes, width)`` token rows of each registered label, ``-1`` padded; controls all ``-1``.
    is_control
        ``(perturbation codes,)`` whether a registered label is a control.
    expressed_prior_mean, expressed_prior_std
        ``(cell types, genes)`` moments of each cell type's nonzero values: the target model's prior.
    condition_lookup
        ``(perturbation codes, cell types, doses)`` row of each training condition in the two tables
        below, ``-1`` where it was not trained.
    expressed_mean, expressed_std
        ``(conditions, genes)`` moments of each training condition's nonzero values.
    molecule_features
        ``(molecules, features)`` structure features of the trained molecules, ``None`` without molecules.
    molecule_recipes
        ``(perturbation codes, width)`` molecule rows of each registered label, ``-1`` padded.
    dose_values
        Sorted trained doses (a cell's dose code is its position here); ``None`` without doses.

    Examples
    --------
    One cell type, 10 genes, an empty gene graph and two learned categories (labels ``control``,
    ``P1``, ``P2``):

    >>> import torch
    >>> from scdoloris.module import GraphTensors, ModuleInputs
    >>> inputs = ModuleInputs(
    ...     x_max=5.0,
    ...     control_mean=torch.full((1, 10), 0.3),
    ...     control_std=torch.full((1, 10), 0.1),
    ...     graph=GraphTensors.empty(),
    ...     n_categories=2,
    ...     train_recipes=torch.tensor([[-1], [0], [1]]),
    ...     is_control=torch.tensor([True, False, False]),
    ... )
    >>> inputs.n_genes, inputs.n_cell_types
    (10, 1)
    """

    x_max: float
    control_mean: torch.Tensor
    control_std: torch.Tensor
    graph: GraphTensors
    n_categories: int
    train_recipes: torch.Tensor
    is_control: torch.Tensor
    expressed_prior_mean: torch.Tensor | None = None
    expressed_prior_std: torch.Tensor | None = None
    condition_lookup: torch.Tensor | None = None
    expressed_mean: torch.Tensor | None = None
    expressed_std: torch.Tensor | None = None
    molecule_features: torch.Tensor | None = None
    molecule_recipes: torch.Tensor | None = None
    dose_values: torch.Tensor | None = None

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return int(self.control_mean.shape[1])

    @property
    def n_cell_types(self) -> int:
        """Number of cell types."""
        return int(self.control_mean.shape[0])
