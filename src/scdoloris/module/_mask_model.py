from __future__ import annotations

import torch
from torch import nn

from ._layers import ResidualBlock


class MaskModel(nn.Module):
    """Predicts each gene's probability of being expressed under a perturbation (paper Sec. 3.5).

    Conditioned like the target model (cell type, perturbation, control information). The logit
    of each gene is an MLP readout plus a per-gene affine term in that gene's control value, so a
    gene expressed in the source cell starts out likely to stay expressed.

    Parameters
    ----------
    n_genes
        Number of genes.
    n_cell_types
        Number of cell types.
    n_perturbation
        Width of the perturbation embedding.
    n_hidden
        Hidden width.
    n_blocks
        Residual MLP blocks.
    dropout
        Dropout in each block.

    Examples
    --------
    >>> import torch
    >>> mask_model = MaskModel(n_genes=10, n_cell_types=2, n_perturbation=8, n_hidden=32, n_blocks=1)
    >>> logits = mask_model(torch.rand(4, 10), torch.tensor([0, 1, 0, 1]), torch.randn(4, 8))
    >>> probs = torch.sigmoid(logits)  # probability that each gene is expressed
    >>> probs.shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        n_genes: int,
        n_cell_types: int,
        n_perturbation: int,
        n_hidden: int = 256,
        n_blocks: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.control_input = nn.Linear(n_genes, n_hidden)
        self.cell_type = nn.Embedding(n_cell_types, n_hidden)
        self.perturbation = nn.Linear(n_perturbation, n_hidden)
        self.blocks = nn.ModuleList(ResidualBlock(n_hidden, dropout) for _ in range(n_blocks))
        self.readout = nn.Sequential(nn.LayerNorm(n_hidden), nn.Linear(n_hidden, n_genes))
        self.control_scale = nn.Parameter(torch.ones(n_genes))
        self.gene_bias = nn.Parameter(torch.zeros(n_genes))

    def forward(self, control: torch.Tensor, cell_type: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        """Logits of ``x != 0`` per gene, shape ``(n, genes)``."""
        cond = self.cell_type(cell_type) + self.perturbation(perturbation)
        h = self.control_input(control)
        for block in self.blocks:
            h = block(h, cond)
        return self.readout(h) + self.control_scale * control + self.gene_bias
