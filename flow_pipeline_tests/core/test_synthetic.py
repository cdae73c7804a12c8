"""The built-in Gaussian-mixture generator: marginal statistics, known truth, calibration on real SONAR vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance

from flow_pipeline.core.data.synthetic import (frechet_to_gaussian, ledoit_wolf_gaussian, sonar_mixture,
                                               synthetic_sonar_mixture)
from flow_pipeline.core.metrics.prdc import nearest_distance, prdc
from flow_pipeline.core.metrics.real_side import evaluate_samples

REAL_EMBEDDINGS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sonar_embeddings_real.npy"


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return synthetic_sonar_mixture(3000, seed=0).astype(np.float64)


def test_marginal_statistics_match_real_sonar(rows):
    norms = np.linalg.norm(rows, axis=1)
    std = rows.std(axis=0, ddof=1)
    cov = np.cov(rows, rowvar=False)
    assert norms.mean() == pytest.approx(0.204, rel=0.05)
    # The mixture's per-component anisotropy widens the norm spread (real: 0.016); see synthetic.py.
    assert 0.012 < norms.std() < 0.032
    assert np.median(std) == pytest.approx(0.0053, rel=0.10)
    assert np.trace(cov) ** 2 / np.sum(cov**2) == pytest.approx(65, rel=0.20)
    order = np.sort(std)
    assert order[1] < 5e-4 and order[0] > 1e-6 and order[2] > 2e-3  # exactly two near-constant dimensions


def test_weights_are_heavy_tailed_and_clusters_local():
    mixture = sonar_mixture(256, seed=1)
    w = np.sort(mixture.weights)[::-1]
    assert w.sum() == pytest.approx(1.0) and w.size == 100
    assert w[0] / w[-1] == pytest.approx(100**0.5, rel=1e-9)  # Zipf exponent 0.5
    x, labels = mixture.sample(600, np.random.default_rng(0))
    dist = scipy.spatial.distance.cdist(x.astype(np.float64), x.astype(np.float64))
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(600, dtype=bool)
    # rows of one component are closer to each other than to the rest
    assert np.median(dist[same & off_diag]) < 0.9 * np.median(dist[~same])


def test_true_mean_and_covariance_match_many_samples():
    mixture = sonar_mixture(32, seed=2, n_components=20)
    x = mixture.sample(200_000, np.random.default_rng(3))[0].astype(np.float64)
    mean, cov = mixture.mean(), mixture.covariance()
    assert np.abs(x.mean(axis=0) - mean).max() < 5 * np.sqrt(cov.diagonal().max() / 200_000)
    assert np.abs(np.cov(x, rowvar=False) - cov).max() < 0.03 * np.abs(cov).max()
    assert np.trace(cov) == pytest.approx(2.84e-5 * 32, rel=1e-9)  # the variance budget holds exactly
    # the mixture covariance is the law of total covariance over the components
    total = sum(w * (mixture.component_covariance(k) + np.outer(m - mean, m - mean))
                for k, (w, m) in enumerate(zip(mixture.weights, mixture.means)))
    np.testing.assert_allclose(cov, total, rtol=1e-9, atol=1e-15)


def test_generator_is_deterministic_per_seed():
    a = synthetic_sonar_mixture(50, dim=64, seed=3)
    assert a.dtype == np.float32 and a.shape == (50, 64)
    np.testing.assert_array_equal(a, synthetic_sonar_mixture(50, dim=64, seed=3))
    assert not np.allclose(a, synthetic_sonar_mixture(50, dim=64, seed=4))
    with pytest.raises(ValueError, match="n_components"):
        sonar_mixture(64, n_components=0)


def test_frechet_to_gaussian_matches_sqrtm_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))
    mean, root = rng.standard_normal(6), rng.standard_normal((6, 6))
    cov = root @ root.T
    s_x = np.cov(x, rowvar=False)
    expected = np.sum((x.mean(0) - mean) ** 2) + np.trace(s_x + cov) - 2 * np.trace(scipy.linalg.sqrtm(s_x @ cov)).real
    assert frechet_to_gaussian(x, mean, cov) == pytest.approx(expected, rel=1e-6)


def test_ledoit_wolf_matches_the_textbook_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 50)) * rng.uniform(0.5, 2.0, 50)
    mean, cov = ledoit_wolf_gaussian(x)
    c = x - x.mean(0)
    n, p = c.shape
    s = c.T @ c / n
    mu = np.trace(s) / p
    d2 = np.sum((s - mu * np.eye(p)) ** 2) / p
    b2 = sum(np.sum((np.outer(r, r) - s) ** 2) for r in c) / n**2 / p
    shrink = min(b2, d2) / d2
    np.testing.assert_allclose(mean, x.mean(0))
    np.testing.assert_allclose(cov, shrink * mu * np.eye(p) + (1 - shrink) * s, rtol=1e-10, atol=1e-12)
    assert np.linalg.eigvalsh(cov).min() > 0  # positive definite although n < dim


@pytest.mark.slow
def test_true_samples_score_like_held_out_rows():
    """The sampling-and-metrics chain: fresh rows of the true distribution score as the data's own held-out rows."""
    mixture = sonar_mixture(1024, seed=0)
    data = mixture.sample(1000, np.random.default_rng(1))[0]
    fit, held, other = data[:600], data[600:800], data[800:]
    fresh = mixture.sample(200, np.random.default_rng(2))[0]
    ref, true = evaluate_samples(other, fit, held), evaluate_samples(fresh, fit, held)
    for key in ("precision", "recall", "coverage"):
        assert true[key] == pytest.approx(ref[key], abs=0.12), key
    assert true["fd_ratio"] == pytest.approx(ref["fd_ratio"], rel=0.1)
    mean, cov = mixture.mean(), mixture.covariance()
    assert frechet_to_gaussian(fresh, mean, cov) == pytest.approx(frechet_to_gaussian(other, mean, cov), rel=0.1)


def _gaussian_scores(x: np.ndarray, seed: int) -> np.ndarray:
    """[precision, coverage, NN-distance quantiles] of a Ledoit-Wolf Gaussian fitted to 600 of x's 800 rows."""
    x = np.asarray(x, np.float64)
    perm = np.random.default_rng(seed).permutation(800)
    fit, held = x[perm[:600]], x[perm[600:]]
    mean, cov = ledoit_wolf_gaussian(fit)
    gen = mean + np.random.default_rng(seed + 10).standard_normal((200, x.shape[1])) @ np.linalg.cholesky(cov).T
    scores = prdc(held, gen, k=5)
    quantiles = np.quantile(nearest_distance(held, fit), (0.1, 0.5, 0.9))
    return np.array([scores["precision"], scores["coverage"], *quantiles])


@pytest.mark.slow
@pytest.mark.skipif(not REAL_EMBEDDINGS.is_file(), reason="../shared/data is absent (not part of the repository)")
def test_baseline_scores_on_generator_as_on_real_vectors():
    """Calibration: a full-covariance Gaussian scores precision / coverage within 0.1 of real's; held-out rows'
    nearest-fit-row distances have 10/50/90% quantiles within 15%."""
    real = np.mean([_gaussian_scores(np.load(REAL_EMBEDDINGS), s) for s in range(5)], axis=0)
    fake = np.mean([_gaussian_scores(synthetic_sonar_mixture(800, seed=0), s) for s in range(5)], axis=0)
    assert fake[:2] == pytest.approx(real[:2], abs=0.1)
    assert fake[2:] == pytest.approx(real[2:], rel=0.15)
