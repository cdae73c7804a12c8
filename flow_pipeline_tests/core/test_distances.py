"""KID, FD∞, dispersion and the train-normalised space against independently written formulas."""

from __future__ import annotations

import numpy as np
import pytest

from flow_pipeline.core.metrics.distances import TrainSpace, dispersion, fd_infinity, frechet_distance, kid


# The kernel's inner products are float32 matrix products (distances._cubic_kernel): each kernel value is off by
# ~1e-7 of itself, so a KID of kernel values of order 1 is held to the float64 formula at 1e-6 absolute (a wrong
# normalisation or a diagonal left in moves it by 1e-2 and more).
KID_ABS = 1e-6


def brute_force_kid(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² of Bińkowski et al. (eq. 4), written with explicit double loops."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return xx + yy - 2.0 * xy


@pytest.mark.parametrize("chunk", [3, 7, 100])
def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel(chunk):
    rng = np.random.default_rng(chunk)
    x, y = rng.normal(size=(23, 5)), rng.normal(size=(23, 5)) * 1.3 + 0.2
    result = kid(x, y, chunk=chunk, n_bootstrap=50)
    assert result["kid"] == pytest.approx(brute_force_kid(x, y), abs=KID_ABS)


def test_kid_standard_error_is_the_jackknife_over_pairs():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(15, 4)), rng.normal(size=(15, 4)) * 1.2
    leave_one_out = np.array([brute_force_kid(np.delete(x, i, 0), np.delete(y, i, 0)) for i in range(15)])
    expected = np.sqrt(14 / 15 * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    assert kid(x, y, chunk=4, n_bootstrap=20)["kid_se"] == pytest.approx(expected, rel=1e-8)


def test_kid_uses_the_first_rows_of_the_longer_set():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(20, 3))
    assert kid(x, y, n_bootstrap=10)["kid"] == pytest.approx(brute_force_kid(x, y[:12]), abs=KID_ABS)


def test_kid_is_zero_in_expectation_for_one_distribution_and_its_interval_separates_another():
    rng = np.random.default_rng(3)
    same = [kid(rng.normal(size=(200, 16)), rng.normal(size=(200, 16)), n_bootstrap=100, seed=s) for s in range(12)]
    estimates = np.array([r["kid"] for r in same])
    # Unbiased: the mean of 12 independent estimates is within 3 standard errors of the mean of 0.
    assert abs(estimates.mean()) < 3 * estimates.std(ddof=1) / np.sqrt(12)
    # The jackknife se is about the spread of the estimates (conservative: not smaller than half of it).
    assert 0.5 * estimates.std() < np.mean([r["kid_se"] for r in same]) < 3 * estimates.std()
    assert sum(r["kid_ci_low"] <= 0 <= r["kid_ci_high"] for r in same) >= 10
    shifted = kid(rng.normal(size=(300, 16)) * 0.6, rng.normal(size=(300, 16)))
    assert shifted["kid_ci_low"] > 0 and shifted["kid"] > 3 * shifted["kid_se"]


def test_kid_rejects_too_few_rows_and_mismatched_dimensions():
    with pytest.raises(ValueError, match="at least 4 rows"):
        kid(np.zeros((3, 2)), np.zeros((9, 2)))
    with pytest.raises(ValueError, match="dimension mismatch"):
        kid(np.zeros((9, 2)), np.zeros((9, 3)))


def test_fd_infinity_removes_the_small_sample_bias():
    rng = np.random.default_rng(4)
    dim = 40
    x = rng.normal(size=(1600, dim))
    y = rng.normal(size=(1600, dim)) * 1.2
    true_fd = dim * (1.2 - 1.0) ** 2  # isotropic Gaussians: sum (sigma_x - sigma_y)^2, equal means
    result = fd_infinity(x, y, seed=0)
    assert abs(result["fd_inf"] - true_fd) < 0.5 * abs(frechet_distance(x[:800], y[:800]) - true_fd)
    assert abs(result["fd_inf"] - true_fd) < 0.15 * true_fd
    assert result["fd_inf_slope"] > 0  # FD's bias is positive and falls as 1/n


def test_dispersion_ratios_match_their_definitions():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(300, 6)) + 2.0
    generated = 2.0 + 0.5 * (real - 2.0)
    result = dispersion(generated, real)
    expected_var = np.trace(np.cov(generated, rowvar=False)) / np.trace(np.cov(real, rowvar=False))
    assert result["variance_ratio"] == pytest.approx(expected_var, rel=1e-12) == pytest.approx(0.25, rel=1e-12)
    expected_norm = np.mean([np.sqrt(r @ r) for r in generated]) / np.mean([np.sqrt(r @ r) for r in real])
    assert result["norm_ratio"] == pytest.approx(expected_norm, rel=1e-12)


def test_train_space_z_scores_with_the_floored_train_statistics():
    rng = np.random.default_rng(6)
    train = rng.normal(size=(500, 4)) * np.array([1.0, 2.0, 3.0, 1e-9]) + 5.0
    space = TrainSpace.fit(train)
    z = space.transform(train)
    np.testing.assert_allclose(z[:, :3].mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[:, :3].std(0, ddof=1), 1.0, rtol=1e-9)
    # The near-constant column is divided by the floor (0.1 x median std), not by its own ~1e-9.
    assert np.abs(z[:, 3]).max() < 1e-6
