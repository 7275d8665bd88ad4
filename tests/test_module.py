"""The torch module: masked diffusion loss (Eq. 9, 13) and sparsity-mask sampling (A.11)."""

import numpy as np
import pytest
import torch

from scdoloris.module import MaskReference, sample_activation_mask


# ---------------------------------------------------------------------------------------- masked loss
@pytest.fixture(scope="module")
def perturbed_batch(trained_model):
    """A batch of perturbed (target) cells: their loss is masked to expressed genes."""
    train = trained_model.adata
    labels = list(trained_model.summary_["perturbation_labels"])
    rows = np.flatnonzero((train.obs["perturbation"] != "control").to_numpy())[::7][:48]
    x = torch.as_tensor(np.asarray(train.X[rows]), dtype=torch.float32)
    codes = torch.as_tensor([labels.index(p) for p in train.obs["perturbation"].iloc[rows]])
    cell_types = torch.as_tensor(
        [trained_model.cell_types.index(c) for c in train.obs["cell_type"].iloc[rows]], dtype=torch.long
    )
    assert not bool(trained_model.module.is_control[codes].any())
    return x, codes, cell_types


def _diffusion_loss_with(module, monkeypatch, batch, delta):
    """Diffusion loss when the denoiser predicts exactly ``x0 + delta`` (fixed seed)."""
    x, codes, cell_types = batch
    x0 = x / module.x_max

    def fake_forward(*args, **kwargs):
        return x0 + delta

    with monkeypatch.context() as patch:
        patch.setattr(module.denoiser, "forward", fake_forward)
        torch.manual_seed(0)
        with torch.no_grad():
            return float(module.loss(x, codes, cell_types)["diffusion_loss"])


def test_masked_loss_ignores_unexpressed_genes(trained_model, perturbed_batch, monkeypatch):
    module = trained_model.module
    x = perturbed_batch[0]
    zeros = (x == 0).float()
    assert 0.1 < float(zeros.mean()) < 0.9  # the batch has both expressed and silent genes
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=generator)
    assert _diffusion_loss_with(module, monkeypatch, perturbed_batch, torch.zeros_like(x)) == 0.0
    # Any error at silent genes is invisible to the loss.
    assert _diffusion_loss_with(module, monkeypatch, perturbed_batch, 5.0 * noise * zeros) == 0.0
    # An error at expressed genes is not.
    assert _diffusion_loss_with(module, monkeypatch, perturbed_batch, 0.1 * noise * (1 - zeros)) > 1e-4


def test_masked_loss_value(trained_model, perturbed_batch, monkeypatch):
    """``||M (x0 - x0_hat)||^2 / sum(M)`` per cell, averaged over cells."""
    module = trained_model.module
    x = perturbed_batch[0]
    expressed = (x != 0).double()
    # A constant error on expressed genes gives exactly that error squared, whatever the sparsity.
    loss = _diffusion_loss_with(module, monkeypatch, perturbed_batch, torch.full_like(x, 0.1))
    assert loss == pytest.approx(0.01, rel=1e-5)
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    expected = ((expressed * delta.double() ** 2).sum(1) / expressed.sum(1)).mean()
    assert _diffusion_loss_with(module, monkeypatch, perturbed_batch, delta) == pytest.approx(float(expected), rel=1e-5)


def test_loss_terms_finite_and_positive(trained_model, perturbed_batch):
    torch.manual_seed(0)
    with torch.no_grad():
        losses = trained_model.module.loss(*perturbed_batch)
    assert set(losses) >= {"loss", "diffusion_loss", "mask_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["mask_loss"]) > 0 and float(losses["diffusion_loss"]) > 0
    assert float(losses["loss"]) == pytest.approx(float(losses["diffusion_loss"] + losses["mask_loss"]), rel=1e-6)


def test_target_zeros_imputed_from_condition(trained_model, perturbed_batch):
    """Zeros of perturbed cells become draws from the condition's nonzero values; nothing else changes."""
    module = trained_model.module
    x, codes, cell_types = perturbed_batch
    x0 = (x / module.x_max).repeat(50, 1)
    codes, cell_types = codes.repeat(50), cell_types.repeat(50)
    is_target = torch.arange(len(codes)) % 2 == 0  # pretend every other row is a control row
    torch.manual_seed(0)
    filled = module._impute_target_zeros(x0, codes, cell_types, None, is_target)
    kept = (x0 != 0) | ~is_target[:, None]
    assert torch.equal(filled[kept], x0[kept])
    imputed = (x0 == 0) & is_target[:, None]
    assert bool((filled[imputed] >= 0).all()) and float((filled[imputed] > 0).float().mean()) > 0.9
    # Draws centre on the condition's nonzero mean (clamping at 0 only raises the mean).
    condition = module.condition_lookup[codes, cell_types, 0]
    expected = module.expressed_mean[condition][imputed]
    assert float((filled[imputed] - expected).mean()) == pytest.approx(0.0, abs=0.01)


def test_skip_parametrization_is_gaussian_posterior_mean():
    """With the network's output at zero, the denoiser is E[x0 | x_t] for independent Gaussian genes."""
    from scdoloris.diffusion import GaussianDiffusion
    from scdoloris.module._denoiser import Denoiser

    torch.manual_seed(0)
    n, genes = 6, 5
    denoiser = Denoiser(genes, n_cell_types=1, n_perturbation=3, n_hidden=8, n_blocks=1)
    torch.nn.init.zeros_(denoiser.output[1].weight)
    torch.nn.init.zeros_(denoiser.output[1].bias)
    mu, sd = torch.rand(n, genes), 0.05 + torch.rand(n, genes) / 3
    abar = GaussianDiffusion(500).alphas_cumprod.float()[torch.tensor([0, 10, 100, 250, 400, 499])]
    x_t = torch.randn(n, genes)
    t = torch.zeros(n, dtype=torch.long)
    condition = denoiser.condition(t, t.bool(), torch.zeros(n, 3), torch.zeros(n, genes), prior=mu, sigma_data=sd)
    out = denoiser(x_t, t, condition, abar=abar)
    a = abar[:, None]
    posterior = mu + sd**2 * a.sqrt() / (a * sd**2 + 1 - a) * (x_t - a.sqrt() * mu)
    torch.testing.assert_close(out, posterior, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- mask sampling
N_GENES = 20


def _reference(patterns_per_condition, cell_types):
    """MaskReference from lists of boolean patterns, one list per condition."""
    masks = np.concatenate([np.asarray(p, dtype=bool) for p in patterns_per_condition])
    condition = np.concatenate([np.full(len(p), i) for i, p in enumerate(patterns_per_condition)])
    frequencies = np.stack([np.asarray(p, dtype=float).mean(axis=0) for p in patterns_per_condition])
    return MaskReference(frequencies, cell_types, np.packbits(masks, axis=1), condition, N_GENES)


@pytest.fixture(scope="module")
def two_conditions():
    """Condition 0 expresses ~20% of genes per cell, condition 1 ~80%; distinct patterns."""
    rng = np.random.default_rng(0)
    low = rng.random((30, N_GENES)) < 0.2
    high = rng.random((30, N_GENES)) < 0.8
    return low, high


def _rows_in(masks, patterns):
    patterns = {tuple(p) for p in np.asarray(patterns, dtype=bool)}
    return [tuple(m) in patterns for m in np.asarray(masks, dtype=bool)]


def test_mask_reference_unpacks(two_conditions):
    low, high = two_conditions
    reference = _reference([low, high], [0, 0])
    np.testing.assert_array_equal(reference.masks(np.arange(30)), low)
    np.testing.assert_array_equal(reference.masks(np.array([30, 59])), high[[0, 29]])


def test_thresholds_override_reference(two_conditions):
    low, high = two_conditions
    reference = _reference([np.zeros((5, N_GENES), bool), np.ones((5, N_GENES), bool)], [0, 0])
    probs = torch.full((40, N_GENES), 0.5)
    probs[:, :5] = 0.97  # forced on even when the drawn pattern is off
    probs[:, 5:10] = 0.03  # forced off even when the drawn pattern is on
    probs[:, 10] = 0.95  # thresholds are inclusive
    probs[:, 11] = 0.05
    mask = sample_activation_mask(
        probs, torch.zeros(40, dtype=torch.long), reference, np.random.default_rng(0), strategy="reference"
    )
    assert mask.shape == probs.shape and mask.dtype == probs.dtype
    assert bool((mask[:, :5] == 1).all()) and bool((mask[:, 10] == 1).all())
    assert bool((mask[:, 5:10] == 0).all()) and bool((mask[:, 11] == 0).all())
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # Custom thresholds.
    mask = sample_activation_mask(
        probs,
        torch.zeros(40, dtype=torch.long),
        reference,
        np.random.default_rng(0),
        high=0.99,
        low=0.01,
        strategy="reference",
    )
    # Nothing is beyond them now: every cell keeps its drawn pattern, which is constant across genes here.
    assert bool((mask == mask[:, :1]).all())


def test_reference_patterns_are_real_cells(two_conditions):
    low, high = two_conditions
    reference = _reference([low, high], [0, 0])
    probs = torch.full((200, N_GENES), 0.7)  # strictly between the thresholds: no override
    mask = sample_activation_mask(
        probs, torch.zeros(200, dtype=torch.long), reference, np.random.default_rng(0), strategy="reference"
    )
    assert all(_rows_in(mask.numpy(), np.concatenate([low, high])))
    assert len({tuple(m) for m in mask.numpy().astype(bool)}) > 10  # a real draw, not one fixed cell


def test_nearest_condition_is_chosen(two_conditions):
    low, high = two_conditions
    reference = _reference([low, high], [0, 0])
    cell_types = torch.zeros(100, dtype=torch.long)
    near_high = sample_activation_mask(
        torch.full((100, N_GENES), 0.75), cell_types, reference, np.random.default_rng(0), strategy="reference"
    )
    assert all(_rows_in(near_high.numpy(), high))
    near_low = sample_activation_mask(
        torch.full((100, N_GENES), 0.25), cell_types, reference, np.random.default_rng(0), strategy="reference"
    )
    assert all(_rows_in(near_low.numpy(), low))
    # Per cell: mixed batch.
    probs = torch.cat([torch.full((50, N_GENES), 0.25), torch.full((50, N_GENES), 0.75)])
    mixed = sample_activation_mask(probs, cell_types, reference, np.random.default_rng(0), strategy="reference").numpy()
    assert all(_rows_in(mixed[:50], low)) and all(_rows_in(mixed[50:], high))


def test_nearest_condition_within_cell_type(two_conditions):
    low, high = two_conditions
    reference = _reference([low, high], [0, 1])
    probs = torch.full((60, N_GENES), 0.75)  # nearest overall is condition 1 (cell type 1)
    mask = sample_activation_mask(
        probs, torch.zeros(60, dtype=torch.long), reference, np.random.default_rng(0), strategy="reference"
    )
    assert all(_rows_in(mask.numpy(), low))  # but cell type 0 only has condition 0


def test_reference_subset_of_several_conditions(two_conditions):
    low, high = two_conditions
    reference = _reference([low, high], [0, 0])
    mask = sample_activation_mask(
        torch.full((400, N_GENES), 0.75),
        torch.zeros(400, dtype=torch.long),
        reference,
        np.random.default_rng(0),
        n_reference_conditions=2,
        strategy="reference",
    ).numpy()
    from_low = np.array(_rows_in(mask, low))
    from_high = np.array(_rows_in(mask, high))
    assert (from_low | from_high).all()
    assert 0.35 < from_low.mean() < 0.65  # uniform over the union of both conditions' cells


def test_bernoulli_mean_matches_probabilities():
    p = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9] * 4)
    probs = p.expand(20_000, N_GENES).clone()
    mask = sample_activation_mask(
        probs,
        torch.zeros(20_000, dtype=torch.long),
        None,
        np.random.default_rng(0),
        strategy="bernoulli",
        high=1.1,
        low=-0.1,
    )
    np.testing.assert_allclose(mask.mean(0).numpy(), p.numpy(), atol=0.015)
    # Genes are drawn independently: no two columns agree on every cell.
    assert not bool((mask[:, 2] == mask[:, 7]).all())


def test_mask_sampling_deterministic_given_seed(two_conditions):
    low, high = two_conditions
    reference = _reference([low, high], [0, 0])
    probs = torch.rand(80, N_GENES, generator=torch.Generator().manual_seed(0))
    cell_types = torch.zeros(80, dtype=torch.long)
    for strategy in ("reference", "bernoulli", "matched"):
        a = sample_activation_mask(probs, cell_types, reference, np.random.default_rng(5), strategy)
        b = sample_activation_mask(probs, cell_types, reference, np.random.default_rng(5), strategy)
        c = sample_activation_mask(probs, cell_types, reference, np.random.default_rng(6), strategy)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_mask_sampling_errors(two_conditions):
    probs = torch.full((4, N_GENES), 0.5)
    cell_types = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reference"):
        sample_activation_mask(probs, cell_types, None, np.random.default_rng(0), "reference")
    reference = _reference(list(two_conditions), [0, 0])
    with pytest.raises(ValueError, match="strategy"):
        sample_activation_mask(probs, cell_types, reference, np.random.default_rng(0), "gumbel")


def _nested_pool(n_cells: int, seed: int = 0):
    """Real-looking patterns with strong co-expression: one 'depth' per cell switches genes on in order."""
    rng = np.random.default_rng(seed)
    depth = rng.random((n_cells, 1))
    q = np.linspace(0.15, 0.85, N_GENES)
    return depth > 1.0 - q[None, :]  # gene g on iff depth > 1 - q_g: marginals q, nested patterns


def test_tilt_matches_moments_and_stays_close_to_uniform():
    from scdoloris.module._mask_sampling import effective_cells, tilt_to_moments

    patterns = torch.from_numpy(np.random.default_rng(0).random((400, 6)) < 0.5).float()
    target = torch.tensor([0.2, 0.3, 0.5, 0.6, 0.7, 0.8])
    weights = tilt_to_moments(patterns, target)
    assert weights.min() >= 0 and abs(weights.sum().item() - 1) < 1e-9
    torch.testing.assert_close(weights.float() @ patterns, target, atol=1e-4, rtol=0)
    # Already matching: the weights stay uniform.
    uniform = tilt_to_moments(patterns, patterns.mean(0))
    torch.testing.assert_close(uniform.float(), torch.full((400,), 1 / 400), atol=1e-6, rtol=0)
    assert effective_cells(uniform) == pytest.approx(400)
    # A ridge trades exactness for spread.
    relaxed = tilt_to_moments(patterns, target, ridge=1.0)
    assert effective_cells(relaxed) > effective_cells(weights)


def _mean_correlation(mask: torch.Tensor) -> float:
    corr = np.corrcoef(mask.numpy().T)
    return float(np.nanmean(corr[np.triu_indices(N_GENES, 1)]))


def test_matched_mask_has_the_predicted_frequencies():
    pool = _nested_pool(300)
    reference = _reference([pool[:150], pool[150:]], [0, 0])
    n = 4000
    # Two perturbations of one cell type: one shifts every gene's probability up, one down.
    frequencies = pool.mean(axis=0)
    up = torch.from_numpy(frequencies + 0.08).float().clamp(max=0.9)
    down = torch.from_numpy(frequencies - 0.08).float().clamp(min=0.1)
    probs = torch.cat([up.expand(n, -1), down.expand(n, -1)])
    groups = torch.repeat_interleave(torch.tensor([0, 1]), n)
    cell_type = torch.zeros(2 * n, dtype=torch.long)
    mask = sample_activation_mask(probs, cell_type, reference, np.random.default_rng(0), "matched", groups=groups)
    np.testing.assert_allclose(mask[:n].mean(0).numpy(), up.numpy(), atol=0.025)
    np.testing.assert_allclose(mask[n:].mean(0).numpy(), down.numpy(), atol=0.025)
    # The nearest-condition reference cannot follow the shift: its frequencies stay the pool's.
    nearest = sample_activation_mask(probs, cell_type, reference, np.random.default_rng(0), strategy="reference")
    assert np.abs(nearest[:n].mean(0).numpy() - up.numpy()).mean() > 0.05
    # Frequencies the pool's cells cannot reach (every gene at 0.5) are still met, by the coupling.
    half = sample_activation_mask(
        torch.full((n, N_GENES), 0.5), cell_type[:n], reference, np.random.default_rng(0), "matched"
    )
    np.testing.assert_allclose(half.mean(0).numpy(), 0.5, atol=0.025)


def test_matched_mask_keeps_real_co_expression():
    pool = _nested_pool(600)
    reference = _reference([pool[:300], pool[300:]], [0, 0])
    # A perturbation whose cells are the 'deep' half of the pool: frequencies that real cells have.
    deep = torch.from_numpy(np.asarray(pool[pool.sum(axis=1) >= N_GENES // 2], dtype=np.float32))
    probs = deep.mean(0).clamp(0.06, 0.94).expand(3000, -1)
    cell_type = torch.zeros(3000, dtype=torch.long)
    mask = sample_activation_mask(probs, cell_type, reference, np.random.default_rng(0), "matched")
    bernoulli = sample_activation_mask(probs, cell_type, reference, np.random.default_rng(0), "bernoulli")
    # Most masks are real cells' patterns, and the nested co-expression survives (Bernoulli loses it).
    assert np.mean(_rows_in(mask.numpy(), pool)) > 0.8
    assert np.mean(_rows_in(bernoulli.numpy(), pool)) < 0.2
    assert _mean_correlation(mask) > 0.3 > _mean_correlation(bernoulli) + 0.2
    np.testing.assert_allclose(mask.mean(0).numpy(), probs[0].numpy(), atol=0.03)


def test_matched_mask_respects_cell_types_and_thresholds():
    pool = _nested_pool(200)
    reference = _reference([pool[:100], ~pool[100:]], [0, 1])  # cell type 1: complementary patterns
    frequencies = [torch.from_numpy(p.mean(axis=0)).float() for p in (pool[:100], ~pool[100:])]
    probs = torch.stack([frequencies[0]] * 25 + [frequencies[1]] * 25)
    probs[:, 0] = 0.99
    cell_type = torch.tensor([0] * 25 + [1] * 25)
    mask = sample_activation_mask(probs, cell_type, reference, np.random.default_rng(0), "matched")
    assert bool((mask[:, 0] == 1).all())  # Eq. 27
    assert np.mean(_rows_in(mask[:25, 1:].numpy(), pool[:100, 1:])) > 0.8
    assert np.mean(_rows_in(mask[25:, 1:].numpy(), ~pool[100:, 1:])) > 0.8
    with pytest.raises(ValueError, match="one cell type"):
        sample_activation_mask(
            probs, cell_type, reference, np.random.default_rng(0), "matched", groups=torch.zeros(50, dtype=torch.long)
        )
