"""Diffusion math on tensors: noise schedule, forward noising, DDIM sampling and inversion.

Nothing here knows about genes, graphs or AnnData, so it can be tested exactly.
"""

from ._schedule import GaussianDiffusion, linear_beta_schedule

__all__ = ["GaussianDiffusion", "linear_beta_schedule"]
