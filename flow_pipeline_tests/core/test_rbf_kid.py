"""KID with the Gaussian RBF kernel against a naive O(n²) unbiased MMD² written out here, its bandwidth against
scipy's pairwise distances, and the case the cubic kernel cannot see: a bimodal mixture against the Gaussian with its
mean and covariance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist, pdist

from flow_pipeline.core.metrics.distances import kid
from flow_pipeline.core.metrics.rbf_kid import BANDWIDTH_RULE, median_bandwidth, rbf_kid
from flow_pipeline_tests.core.two_sample_data import matched_gaussian, mixture


def naive_unbiased_mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Gretton et al. 2012, eq. (4) for equal sizes: the U-statistic over i != j of
    k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)."""
    m = x.shape[0]
    kernel = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * bandwidth**2))  # noqa: E731
    h = kernel(x, x) + kernel(y, y) - kernel(x, y) - kernel(x, y).T
    return float((h.sum() - np.trace(h)) / (m * (m - 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_naive_unbiased_mmd2_and_the_median_of_all_pairwise_distances(seed):
    rng = np.random.default_rng(seed)
    m, dim = 60 + 7 * seed, 5 + seed
    x = rng.normal(0.3, 1.0, (m, dim))
    y = rng.standard_normal((m + 5, dim)) * rng.uniform(0.5, 2.0, dim)  # extra rows beyond m are not paired
    result = rbf_kid(x, y, n_bootstrap=50, seed=seed)
    assert result.bandwidth == pytest.approx(float(np.median(pdist(np.concatenate([x, y])))))
    assert result.kid == pytest.approx(naive_unbiased_mmd2(x, y[:m], result.bandwidth), rel=1e-5, abs=1e-9)
    assert result.ci_low <= result.kid <= result.ci_high and result.se > 0
    assert result.bandwidth_rule == BANDWIDTH_RULE and result.as_metrics()["rbf_kid_bandwidth"] == result.bandwidth
    narrow = rbf_kid(x, y, n_bootstrap=10, seed=seed, bandwidth_scale=0.3)
    assert narrow.bandwidth == pytest.approx(0.3 * result.bandwidth) and narrow.bandwidth_scale == 0.3
    assert narrow.kid == pytest.approx(naive_unbiased_mmd2(x, y[:m], narrow.bandwidth), rel=1e-5, abs=1e-9)


def test_standard_error_is_the_jackknife_over_pairs():
    """Leave pair i out, recompute the naive estimate, and take the jackknife variance of those m estimates."""
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((30, 3)), rng.standard_normal((30, 3)) + 0.2
    result = rbf_kid(x, y, n_bootstrap=20)
    keep = lambda i: np.arange(30) != i  # noqa: E731
    loo = np.array([naive_unbiased_mmd2(x[keep(i)], y[keep(i)], result.bandwidth) for i in range(30)])
    assert result.se == pytest.approx(np.sqrt(29 / 30 * np.sum((loo - loo.mean()) ** 2)), rel=1e-5)


def test_separates_a_mixture_from_its_matched_gaussian_where_the_cubic_kid_sees_nothing():
    rng = np.random.default_rng(21)
    real, gaussian, fresh = mixture(rng, 1000), matched_gaussian(rng, 1000), mixture(rng, 1000)
    cubic = kid(gaussian, real)
    assert abs(cubic["kid"]) < 3 * cubic["kid_se"]  # first three moments agree: the cubic kernel's MMD² is 0
    separated = rbf_kid(gaussian, real)
    assert separated.kid > 4 * separated.se and separated.ci_low > 0
    same = rbf_kid(fresh, real)
    assert abs(same.kid) < 3 * same.se and separated.kid > 5 * abs(same.kid)


def test_subsampled_median_is_close_to_the_full_one_and_identical_rows_are_refused():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((1500, 8)), rng.standard_normal((1500, 8)) * 1.2
    full = float(np.median(pdist(np.concatenate([x, y]))))
    assert median_bandwidth(x, y, max_rows=500) == pytest.approx(full, rel=0.03)
    with pytest.raises(ValueError, match="median distance between rows is 0"):
        median_bandwidth(np.ones((10, 3)), np.ones((10, 3)))
