from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps, shape ``(len(t), dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class ResidualBlock(nn.Module):
    """``h + Dropout(SiLU(LayerNorm(Linear(h + cond))))``: the MLP block of the reference, with residual.

    LayerNorm rather than BatchNorm: rows of a batch can be identical (the same control cell under
    several perturbations), which BatchNorm would wash out.
    """

    def __init__(self, n_hidden: int, dropout: float):
        super().__init__()
        self.cond = nn.Linear(n_hidden, n_hidden)
        self.net = nn.Sequential(nn.Linear(n_hidden, n_hidden), nn.LayerNorm(n_hidden), nn.SiLU(), nn.Dropout(dropout))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return h + self.net(h + self.cond(cond))
