from __future__ import annotations

import torch
from torch import nn

from ._layers import ResidualBlock, sinusoidal_embedding


class Denoiser(nn.Module):
    """One x0-predicting network for both diffusion models of Doloris (paper Sec. 3.7).

    A row is a *source* row (control cells; conditioned on cell type only, Eq. 8) or a *target* row
    (perturbed cells; conditioned on cell type, perturbation embedding and control information,
    Sec. 3.4). Target rows predict ``x0`` as a residual on their control input, source rows
    directly.

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
    """

    def __init__(
        self,
        n_genes: int,
        n_cell_types: int,
        n_perturbation: int,
        n_hidden: int = 512,
        n_blocks: int = 3,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.n_hidden = n_hidden
        self.input = nn.Linear(n_genes, n_hidden)
        self.control_input = nn.Linear(n_genes, n_hidden)
        self.time = nn.Sequential(nn.Linear(n_hidden, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden))
        self.cell_type = nn.Embedding(n_cell_types, n_hidden)
        self.domain = nn.Embedding(2, n_hidden)  # 0: source, 1: target
        self.perturbation = nn.Linear(n_perturbation, n_hidden)
        self.blocks = nn.ModuleList(ResidualBlock(n_hidden, dropout) for _ in range(n_blocks))
        self.output = nn.Sequential(nn.LayerNorm(n_hidden), nn.Linear(n_hidden, n_genes))

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cell_type: torch.Tensor,
        is_target: torch.Tensor,
        perturbation: torch.Tensor,
        control: torch.Tensor,
    ) -> torch.Tensor:
        """Predict ``x0``.

        Parameters
        ----------
        x_t
            Noisy expression ``(n, genes)``.
        t
            Timesteps ``(n,)``.
        cell_type
            Cell-type codes ``(n,)``.
        is_target
            Bool ``(n,)``: target (perturbed) rows.
        perturbation
            Perturbation embeddings ``(n, n_perturbation)``; ignored on source rows.
        control
            Control information ``(n, genes)``: ``mu + sigma * eps`` in training (Eq. 12), the
            real control cell at inference; ignored on source rows.
        """
        target = is_target.to(x_t.dtype)[:, None]
        control = control * target
        cond = (
            self.time(sinusoidal_embedding(t, self.n_hidden))
            + self.cell_type(cell_type)
            + self.domain(is_target.long())
            + self.perturbation(perturbation * target)
        )
        h = self.input(x_t) + self.control_input(control)
        for block in self.blocks:
            h = block(h, cond)
        return self.output(h) + control
