from __future__ import annotations

from collections.abc import Callable

import torch

# A denoiser maps (x_t, t) to its estimate of the clean sample x_0 (Doloris predicts x_0, Sec. 3.3).
X0Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_beta_schedule(n_timesteps: int = 500) -> torch.Tensor:
    """Linear betas of guided-diffusion rescaled to ``n_timesteps`` steps.

    guided-diffusion uses ``1e-4 .. 0.02`` over 1,000 steps; scaling by ``1000 / n_timesteps``
    keeps the total noise the same, giving ``2e-4 .. 0.04`` at the 500 steps of Doloris. Below
    about 21 steps the rescaled betas would pass 1 (a negative ``alpha``); they are clipped at
    0.999, as guided-diffusion clips its cosine schedule.

    Parameters
    ----------
    n_timesteps
        Number of diffusion steps ``T``.

    Returns
    -------
    torch.Tensor
        Float64 tensor of shape ``(n_timesteps,)``.

    Examples
    --------
    >>> betas = linear_beta_schedule(500)
    >>> float(betas[0]), round(float(betas[-1]), 6)
    (0.0002, 0.04)
    """
    if n_timesteps < 2:
        raise ValueError(f"n_timesteps must be at least 2, got {n_timesteps}.")
    scale = 1000.0 / n_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, n_timesteps, dtype=torch.float64).clamp(max=0.999)


class GaussianDiffusion:
    """Variance-preserving diffusion with an x0-predicting network and deterministic DDIM.

    Forward process (paper Eq. 1): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
    DDIM with ``eta = 0`` (Eq. 3) runs on a sub-grid ``tau_0 = 0 < ... < tau_N = T - 1``;
    :meth:`invert` walks the grid upwards (Eq. 15), :meth:`sample` downwards (Eq. 16), and the two
    are inverse to each other up to the usual first-order DDIM-inversion error.

    Parameters
    ----------
    n_timesteps
        Number of diffusion steps ``T``.

    Examples
    --------
    >>> diffusion = GaussianDiffusion(500)
    >>> x0 = torch.rand(4, 10)
    >>> x_t = diffusion.q_sample(x0, torch.full((4,), 499), torch.randn(4, 10))
    >>> x_t.shape, x_t.dtype
    (torch.Size([4, 10]), torch.float32)
    """

    def __init__(self, n_timesteps: int = 500):
        self.n_timesteps = n_timesteps
        betas = linear_beta_schedule(n_timesteps)
        # float64 for the cumulative product; the steps cast to the input's dtype.
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(like.device)[t].to(like.dtype)
        return abar.reshape(-1, *([1] * (like.dim() - 1)))

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform training timesteps in ``[0, T)``."""
        return torch.randint(0, self.n_timesteps, (n,), generator=generator, device=device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (paper Eq. 1, 7, 11)."""
        abar = self._abar(t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def ddim_grid(self, n_steps: int, spacing: str = "quadratic") -> list[int]:
        """The ``n_steps + 1`` increasing timesteps, from ``tau_0 = 0`` to ``tau_N = T - 1``, that DDIM visits.

        ``"quadratic"`` (the default, DDIM paper Sec. D.2) packs steps where the noise level changes
        fastest, near ``t = 0``; on Gaussian data with the exact denoiser it reconstructs 2.7x closer
        than ``"uniform"`` spacing at 50 steps (``tests/test_diffusion.py``).
        """
        last = self.n_timesteps - 1
        if not 1 <= n_steps <= last:
            raise ValueError(f"n_steps must be in [1, {last}], got {n_steps}.")
        fractions = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
        if spacing == "quadratic":
            fractions = fractions**2
        elif spacing != "uniform":
            raise ValueError(f"spacing must be 'quadratic' or 'uniform', got {spacing!r}.")
        grid = (fractions * last).round().long().tolist()
        # Rounding can repeat early steps; keep the grid strictly increasing and ending at T - 1.
        for k in range(1, len(grid)):
            grid[k] = max(grid[k], grid[k - 1] + 1)
        for k in range(len(grid) - 2, -1, -1):
            grid[k] = min(grid[k], grid[k + 1] - 1)
        return grid

    def ddim_step(self, x: torch.Tensor, x0_hat: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
        """Move ``x`` from noise level ``t_from`` to ``t_to`` along the DDIM ODE (eta = 0, Eq. 3).

        The noise implied by the x0 prediction (Eq. 6) is kept and the signal is re-scaled:
        ``x_to = sqrt(abar_to) x0_hat + sqrt(1 - abar_to) eps_hat``. The same step serves sampling
        (``t_to < t_from``) and inversion (``t_to > t_from``).
        """
        abar_from = float(self.alphas_cumprod[t_from])
        abar_to = float(self.alphas_cumprod[t_to])
        # eps_hat = (x - sqrt(abar_from) x0_hat) / sqrt(1 - abar_from), substituted: one linear
        # combination of x and x0_hat, two passes over the data instead of six.
        noise_scale = ((1.0 - abar_to) / (1.0 - abar_from)) ** 0.5
        return torch.add(x0_hat * (abar_to**0.5 - noise_scale * abar_from**0.5), x, alpha=noise_scale)

    @torch.no_grad()
    def invert(
        self, x0: torch.Tensor, predict_x0: X0Predictor, n_steps: int = 50, spacing: str = "quadratic"
    ) -> torch.Tensor:
        """DDIM inversion of clean samples to the shared Gaussian latent (paper Eq. 15).

        The network is evaluated at the current point and level (``tau_{k-1}``), the standard
        first-order inversion.

        Parameters
        ----------
        x0
            Clean samples, shape ``(n, d)``.
        predict_x0
            ``(x_t, t) -> x0_hat`` with ``t`` a long tensor of shape ``(n,)``.
        n_steps
            Number of DDIM steps (network evaluations).
        spacing
            Grid of timesteps, see :meth:`ddim_grid`.
        """
        grid = self.ddim_grid(n_steps, spacing)
        x = x0
        for t_from, t_to in zip(grid[:-1], grid[1:], strict=True):
            t = torch.full((x.shape[0],), t_from, dtype=torch.long, device=x.device)
            x = self.ddim_step(x, predict_x0(x, t), t_from, t_to)
        return x

    @torch.no_grad()
    def sample(
        self, x_latent: torch.Tensor, predict_x0: X0Predictor, n_steps: int = 50, spacing: str = "quadratic"
    ) -> torch.Tensor:
        """Deterministic DDIM sampling from the latent back to data (paper Eq. 16).

        Parameters
        ----------
        x_latent
            Latents at level ``T - 1``, shape ``(n, d)``.
        predict_x0
            ``(x_t, t) -> x0_hat`` with ``t`` a long tensor of shape ``(n,)``.
        n_steps
            Number of DDIM steps (network evaluations).
        spacing
            Grid of timesteps, see :meth:`ddim_grid`.
        """
        grid = self.ddim_grid(n_steps, spacing)
        x = x_latent
        for t_from, t_to in zip(grid[:0:-1], grid[-2::-1], strict=True):
            t = torch.full((x.shape[0],), t_from, dtype=torch.long, device=x.device)
            x = self.ddim_step(x, predict_x0(x, t), t_from, t_to)
        return x
