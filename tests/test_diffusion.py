"""Diffusion math checked exactly: schedule, forward noising, DDIM grid, inversion and sampling.

With Gaussian data ``N(m, s^2)`` the optimal x0-denoiser is known in closed form, so DDIM inversion
followed by DDIM sampling must give back the input up to the discretisation error of the ODE.
"""

import pytest
import torch

from scdoloris.diffusion import GaussianDiffusion, linear_beta_schedule

T = 500
S = 0.2  # data spread of the Gaussian test data


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(T)


@pytest.fixture(scope="module")
def gaussian_data():
    generator = torch.Generator().manual_seed(0)
    mean = torch.linspace(0.2, 0.8, 8, dtype=torch.float64)
    x0 = mean + S * torch.randn(2000, 8, generator=generator, dtype=torch.float64)
    return x0, mean


def optimal_denoiser(diffusion, mean, s=S):
    """Exact posterior mean ``E[x0 | x_t]`` for ``x0 ~ N(mean, s^2)``."""

    def predict(x_t, t):
        abar = diffusion.alphas_cumprod[t][:, None].to(x_t.dtype)
        return mean + abar.sqrt() * s**2 / (abar * s**2 + 1 - abar) * (x_t - abar.sqrt() * mean)

    return predict


def round_trip(diffusion, x0, mean, n_steps, spacing="quadratic"):
    predict = optimal_denoiser(diffusion, mean)
    latent = diffusion.invert(x0, predict, n_steps, spacing)
    return latent, diffusion.sample(latent, predict, n_steps, spacing)


# ---------------------------------------------------------------------------------------- schedule
def test_linear_betas_endpoints():
    betas = linear_beta_schedule(T)
    assert betas.shape == (T,)
    assert betas.dtype == torch.float64
    assert float(betas[0]) == pytest.approx(2e-4, rel=1e-9)
    assert float(betas[-1]) == pytest.approx(0.04, rel=1e-9)
    assert bool((betas[1:] > betas[:-1]).all())
    # guided-diffusion's original 1,000-step schedule is the same total noise.
    betas_1000 = linear_beta_schedule(1000)
    assert float(betas_1000[0]) == pytest.approx(1e-4) and float(betas_1000[-1]) == pytest.approx(0.02)


def test_alphas_cumprod(diffusion):
    abar = diffusion.alphas_cumprod
    assert abar.shape == (T,)
    assert float(abar[0]) == pytest.approx(1 - 2e-4, rel=1e-12)
    assert bool((abar[1:] < abar[:-1]).all())
    assert 0 < float(abar[-1]) < 1e-3
    torch.testing.assert_close(abar, torch.cumprod(1 - linear_beta_schedule(T), 0))


# ---------------------------------------------------------------------------------------- forward process
def test_q_sample_formula_and_endpoints(diffusion, gaussian_data):
    x0, _ = gaussian_data
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for step in (0, 17, 250, T - 1):
        t = torch.full((x0.shape[0],), step)
        abar = diffusion.alphas_cumprod[step]
        torch.testing.assert_close(diffusion.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    at_zero = diffusion.q_sample(x0, torch.zeros(x0.shape[0], dtype=torch.long), noise)
    assert (at_zero - x0).abs().mean() < 0.02
    assert (at_zero - x0).abs().max() < 0.1
    at_end = diffusion.q_sample(x0, torch.full((x0.shape[0],), T - 1), noise)
    assert (at_end - noise).abs().max() < 0.02


def test_q_sample_per_row_timesteps(diffusion):
    x0 = torch.ones(3, 4)
    t = torch.tensor([0, 100, 499])
    out = diffusion.q_sample(x0, t, torch.zeros(3, 4))
    expected = diffusion.alphas_cumprod[t].sqrt().float()[:, None].expand(3, 4)
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32


def test_sample_timesteps_in_range(diffusion):
    t = diffusion.sample_timesteps(10_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long
    assert int(t.min()) == 0 and int(t.max()) == T - 1


# ---------------------------------------------------------------------------------------- DDIM grid
@pytest.mark.parametrize("spacing", ["quadratic", "uniform"])
@pytest.mark.parametrize("n_steps", [1, 2, 10, 50, 200, 499])
def test_ddim_grid(diffusion, n_steps, spacing):
    grid = diffusion.ddim_grid(n_steps, spacing)
    assert len(grid) == n_steps + 1
    assert grid[0] == 0 and grid[-1] == T - 1
    assert all(b > a for a, b in zip(grid[:-1], grid[1:], strict=True))
    assert all(isinstance(t, int) for t in grid)


def test_ddim_grid_quadratic_is_denser_near_zero(diffusion):
    quadratic, uniform = diffusion.ddim_grid(50, "quadratic"), diffusion.ddim_grid(50, "uniform")
    assert quadratic[5] < uniform[5]
    assert quadratic[1] - quadratic[0] < quadratic[-1] - quadratic[-2]


@pytest.mark.parametrize("bad", [0, T, -3])
def test_ddim_grid_rejects_bad_steps(diffusion, bad):
    with pytest.raises(ValueError):
        diffusion.ddim_grid(bad)
    with pytest.raises(ValueError):
        diffusion.ddim_grid(10, spacing="cosine")


def test_ddim_step_is_reversible_for_fixed_prediction(diffusion):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    x0_hat = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    up = diffusion.ddim_step(x, x0_hat, 20, 300)
    torch.testing.assert_close(diffusion.ddim_step(up, x0_hat, 300, 20), x)
    # With a perfect prediction the step lands exactly on the forward process with the same noise.
    x0 = torch.rand(5, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    x_40 = diffusion.q_sample(x0, torch.full((5,), 40), noise)
    torch.testing.assert_close(
        diffusion.ddim_step(x_40, x0, 40, 400), diffusion.q_sample(x0, torch.full((5,), 400), noise)
    )


# ---------------------------------------------------------------------------------------- inversion + sampling
def test_invert_then_sample_reconstructs(diffusion, gaussian_data):
    x0, mean = gaussian_data
    latent, reconstruction = round_trip(diffusion, x0, mean, 50)
    assert latent.dtype == torch.float64 and reconstruction.shape == x0.shape
    assert float((reconstruction - x0).abs().mean()) < 0.02


def test_reconstruction_error_shrinks_with_steps(diffusion, gaussian_data):
    x0, mean = gaussian_data
    errors = [float((round_trip(diffusion, x0, mean, n)[1] - x0).abs().mean()) for n in (10, 50, 200)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.006


def test_latent_is_standard_gaussian(diffusion, gaussian_data):
    x0, mean = gaussian_data
    latent, _ = round_trip(diffusion, x0, mean, 200)
    assert abs(float(latent.std()) - 1.0) < 0.1
    assert abs(float(latent.mean())) < 0.05
    # The exact probability-flow map of a Gaussian is affine: the latent is the standardised input.
    standardised = (x0 - mean) / S
    corr = torch.corrcoef(torch.stack([latent.flatten(), standardised.flatten()]))[0, 1]
    assert float(corr) > 0.99


def test_quadratic_spacing_beats_uniform(diffusion, gaussian_data):
    x0, mean = gaussian_data
    quadratic = float((round_trip(diffusion, x0, mean, 50, "quadratic")[1] - x0).abs().mean())
    uniform = float((round_trip(diffusion, x0, mean, 50, "uniform")[1] - x0).abs().mean())
    assert quadratic < 0.6 * uniform


@pytest.mark.parametrize("n_steps", [7, 50])
def test_network_called_once_per_step(diffusion, n_steps):
    calls = []

    def predict(x_t, t):
        calls.append(t.clone())
        return torch.zeros_like(x_t)

    x0 = torch.rand(4, 3)
    latent = diffusion.invert(x0, predict, n_steps)
    assert len(calls) == n_steps
    grid = diffusion.ddim_grid(n_steps)
    assert [int(t[0]) for t in calls] == grid[:-1]  # inversion evaluates at the lower level, going up
    assert all(t.shape == (4,) and t.dtype == torch.long for t in calls)
    calls.clear()
    diffusion.sample(latent, predict, n_steps)
    assert [int(t[0]) for t in calls] == grid[:0:-1]  # sampling starts at T - 1 and goes down


@pytest.mark.parametrize("n_timesteps", [2, 10, 20, 50])
def test_short_schedules_stay_valid(n_timesteps):
    """Rescaled betas would pass 1 below ~21 steps; clipped, abar stays in (0, 1) and decreasing."""
    abar = GaussianDiffusion(n_timesteps).alphas_cumprod
    assert bool((abar > 0).all() and (abar < 1).all() and (abar[1:] < abar[:-1]).all())
    diffusion = GaussianDiffusion(n_timesteps)
    x = torch.rand(4, 3, dtype=torch.float64)
    out = diffusion.sample(diffusion.invert(x, lambda x_t, t: x, 1), lambda x_t, t: x, 1)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
