import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import wasserstein_distance

from scdoloris.metrics._distances import edistance, emd, rmse_mean


def _brute_edistance(x, y):
    def mean_dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).mean()

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def _scipy_emd(x, y):
    return np.mean([wasserstein_distance(x[:, j], y[:, j]) for j in range(x.shape[1])])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_edistance_self_is_zero(rng):
    x = rng.normal(size=(40, 8))
    assert edistance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert edistance(x, x, squared=False) == pytest.approx(0.0, abs=1e-6)


def test_edistance_symmetric_and_matches_brute_force(rng):
    x = rng.normal(size=(23, 7))
    y = rng.normal(0.3, 1.2, size=(31, 7))
    expected = _brute_edistance(x, y)
    assert expected > 0
    assert edistance(x, y) == pytest.approx(expected, rel=1e-12)
    assert edistance(y, x) == pytest.approx(edistance(x, y), rel=1e-12)
    assert edistance(x, y, squared=False) == pytest.approx(np.sqrt(expected), rel=1e-12)


def test_edistance_grows_with_shift(rng):
    x = rng.normal(size=(60, 10))
    noise = rng.normal(size=(60, 10))
    values = [edistance(x, noise + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values[0] > 0
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


def test_edistance_blocks_match_unblocked(rng, monkeypatch):
    import scdoloris.metrics._distances as mod

    x = rng.normal(size=(50, 6))
    y = rng.normal(1.0, size=(45, 6))
    full = edistance(x, y)
    monkeypatch.setattr(mod, "_BLOCK_ENTRIES", 100)
    assert edistance(x, y) == pytest.approx(full, rel=1e-12)


def test_emd_matches_scipy(rng):
    x = rng.normal(size=(200, 50))
    y = rng.gamma(2.0, size=(150, 50))
    assert emd(x, y) == pytest.approx(_scipy_emd(x, y), abs=1e-10)


def test_emd_with_ties_matches_scipy(rng):
    # Zero-inflated, rounded values produce many ties within and across sets.
    x = np.round(rng.exponential(size=(80, 20)) * (rng.random((80, 20)) > 0.5), 1)
    y = np.round(rng.exponential(1.5, size=(60, 20)) * (rng.random((60, 20)) > 0.3), 1)
    assert emd(x, y) == pytest.approx(_scipy_emd(x, y), abs=1e-10)
    assert emd(x, x) == 0.0


def test_emd_pure_shift(rng):
    x = rng.normal(size=(100, 12))
    assert emd(x, x + 0.7) == pytest.approx(0.7, abs=1e-10)
    assert emd(x + 0.7, x) == pytest.approx(0.7, abs=1e-10)


def test_rmse_mean(rng):
    x = rng.normal(size=(30, 5))
    y = rng.normal(size=(20, 5))
    expected = np.sqrt(np.mean((x.mean(0) - y.mean(0)) ** 2))
    assert rmse_mean(x, y) == pytest.approx(expected, rel=1e-12)
    assert rmse_mean(x, x + 1.5) == pytest.approx(1.5)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_input(rng, fmt):
    x = rng.exponential(size=(40, 9)) * (rng.random((40, 9)) > 0.6)
    y = rng.exponential(size=(35, 9)) * (rng.random((35, 9)) > 0.4)
    xs, ys = sp.csr_matrix(x).asformat(fmt), sp.csr_array(y).asformat(fmt)
    assert edistance(xs, ys) == pytest.approx(edistance(x, y), rel=1e-12)
    assert emd(xs, ys) == pytest.approx(emd(x, y), abs=1e-12)
    assert rmse_mean(xs, ys) == pytest.approx(rmse_mean(x, y), rel=1e-12)
    assert edistance(xs, y) == pytest.approx(edistance(x, y), rel=1e-12)


def test_float32_input(rng):
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.normal(size=(30, 4)).astype(np.float32)
    assert edistance(x, y) == pytest.approx(_brute_edistance(x.astype(float), y.astype(float)), rel=1e-10)


@pytest.mark.parametrize("func", [edistance, emd, rmse_mean])
def test_errors(rng, func):
    x = rng.normal(size=(10, 5))
    with pytest.raises(ValueError, match="same number of genes"):
        func(x, rng.normal(size=(10, 6)))
    with pytest.raises(ValueError, match="empty"):
        func(x, np.zeros((0, 5)))
    with pytest.raises(ValueError, match="empty"):
        func(np.zeros((0, 5)), x)
    with pytest.raises(ValueError, match="2-D"):
        func(x[0], x)


def test_emd_fast_enough(rng):
    import time

    x = rng.normal(size=(200, 500))
    y = rng.normal(size=(200, 500))
    start = time.perf_counter()
    emd(x, y)
    assert time.perf_counter() - start < 0.5
