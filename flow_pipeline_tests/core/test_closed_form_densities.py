"""Closed-form log-densities: the fitted Gaussian baselines and the built-in generator's mixture, against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats

from flow_pipeline.core.baselines import GaussianBaseline, fit_baseline
from flow_pipeline.core.data.synthetic import GaussianMixture, sonar_mixture, synthetic_sonar_mixture


def _scipy_mixture_log_prob(mixture: GaussianMixture, x: np.ndarray) -> np.ndarray:
    parts = [np.log(w) + scipy.stats.multivariate_normal(mixture.means[k], mixture.component_covariance(k)).logpdf(x)
             for k, w in enumerate(mixture.weights)]
    return scipy.special.logsumexp(np.stack(parts, axis=1), axis=1)


@pytest.mark.parametrize("name", ["gaussian-full", "gaussian-diag"])
def test_baseline_log_prob_is_the_fitted_gaussians_density(name):
    train = synthetic_sonar_mixture(300, dim=20, seed=1)
    baseline = fit_baseline(name, train)
    x = synthetic_sonar_mixture(50, dim=20, seed=2).astype(np.float64)
    factor = baseline.factor if name == "gaussian-full" else np.diag(baseline.factor)
    covariance = factor @ factor.T
    expected = scipy.stats.multivariate_normal(baseline.mean, covariance).logpdf(x)
    np.testing.assert_allclose(baseline.log_prob(x), expected, rtol=1e-9, atol=1e-6)


def test_baseline_log_prob_rejects_bad_rows_and_a_singular_covariance():
    baseline = GaussianBaseline("gaussian-diag", np.zeros(3), np.array([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="singular"):
        baseline.log_prob(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"x must be \(n, 3\)"):
        baseline.log_prob(np.ones((2, 4)))


def test_mixture_log_prob_matches_scipy_for_the_generator_and_for_an_unstructured_noise_floor():
    mixture = sonar_mixture(24, seed=3, n_components=6)
    rng = np.random.default_rng(4)
    x, _ = mixture.sample(40, rng)
    np.testing.assert_allclose(mixture.log_prob(x), _scipy_mixture_log_prob(mixture, x), rtol=0, atol=1e-7)
    # per-dimension noise that differs: the latent Gram matrix is no longer diagonal (the general solve)
    uneven = GaussianMixture(mixture.weights, mixture.means, mixture.basis, mixture.latent_var,
                             mixture.diag_var * rng.uniform(0.5, 2.0, 24))
    x, _ = uneven.sample(40, rng)
    np.testing.assert_allclose(uneven.log_prob(x), _scipy_mixture_log_prob(uneven, x), rtol=0, atol=1e-7)


def test_the_built_in_rows_are_the_mixtures_draws_so_its_density_applies():
    """synthetic_sonar_mixture returns mixture.sample's rows unchanged: no transform whose Jacobian log_prob misses."""
    mixture = sonar_mixture(16, seed=5)
    expected, _ = mixture.sample(30, np.random.default_rng([5, 1]))
    np.testing.assert_array_equal(synthetic_sonar_mixture(30, dim=16, seed=5), expected)
    with pytest.raises(ValueError, match="diag_var > 0"):
        GaussianMixture(mixture.weights, mixture.means, mixture.basis, mixture.latent_var,
                        np.zeros(16)).log_prob(expected)
