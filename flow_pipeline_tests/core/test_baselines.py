"""Gaussian baselines: Ledoit–Wolf shrinkage against the paper's formulas written out row by row, and sampling."""

from __future__ import annotations

import numpy as np
import pytest

from flow_pipeline.core.baselines import GaussianBaseline, fit_baseline, ledoit_wolf


def ledoit_wolf_by_rows(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit & Wolf (2004), Lemmas 3.2-3.4, with an explicit (dim, dim) matrix per row."""
    n, p = x.shape
    c = x - x.mean(axis=0)
    s = c.T @ c / n
    mu = np.trace(s) / p
    delta_sq = np.linalg.norm(s - mu * np.eye(p), "fro") ** 2
    beta_bar_sq = sum(np.linalg.norm(np.outer(row, row) - s, "fro") ** 2 for row in c) / n**2
    shrinkage = min(beta_bar_sq, delta_sq) / delta_sq
    return shrinkage * mu * np.eye(p) + (1 - shrinkage) * s, shrinkage


@pytest.mark.parametrize(("n", "p"), [(30, 12), (200, 8), (9, 25)])
def test_ledoit_wolf_matches_the_row_by_row_formula(n, p):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) + 3.0
    expected_cov, expected_shrinkage = ledoit_wolf_by_rows(x)
    fit = ledoit_wolf(x.astype(np.float64), chunk_rows=7)  # several chunks
    assert fit.shrinkage == pytest.approx(expected_shrinkage, rel=1e-9)
    np.testing.assert_allclose(fit.covariance, expected_cov, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fit.mean, x.mean(0), rtol=1e-12)


def test_ledoit_wolf_shrinks_fully_for_isotropic_data_and_little_for_well_sampled_structure():
    rng = np.random.default_rng(0)
    assert ledoit_wolf(rng.normal(size=(20, 100))).shrinkage > 0.85
    scales = np.linspace(0.1, 3.0, 10)
    assert ledoit_wolf(rng.normal(size=(5000, 10)) * scales).shrinkage < 0.01


def test_gaussian_full_samples_have_the_fitted_moments():
    rng = np.random.default_rng(1)
    train = (rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1.5).astype(np.float32)
    baseline = fit_baseline("gaussian-full", train)
    fit = ledoit_wolf(train)
    drawn = baseline.sample(40_000, seed=0).astype(np.float64)
    np.testing.assert_allclose(drawn.mean(0), fit.mean, atol=0.05)
    np.testing.assert_allclose(np.cov(drawn, rowvar=False), fit.covariance, atol=0.08 * np.abs(fit.covariance).max())
    assert baseline.shrinkage == pytest.approx(fit.shrinkage)
    np.testing.assert_array_equal(baseline.sample(5, seed=3), baseline.sample(5, seed=3))


def test_gaussian_diag_samples_have_the_per_dimension_moments_and_no_correlation():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(500, 3)) @ np.array([[1.0, 0.9, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, 2.0]])
    drawn = fit_baseline("gaussian-diag", train).sample(50_000, seed=1).astype(np.float64)
    np.testing.assert_allclose(drawn.std(0), train.std(0, ddof=1), rtol=0.03)
    assert abs(np.corrcoef(drawn, rowvar=False)[0, 1]) < 0.03 < abs(np.corrcoef(train, rowvar=False)[0, 1])


def test_unknown_baseline_is_rejected_naming_the_valid_ones():
    with pytest.raises(ValueError, match="gaussian-full, gaussian-diag"):
        fit_baseline("gaussian-mixture", np.zeros((4, 2)))


def test_the_val_chosen_shrinkage_is_the_val_likelihood_maximum():
    """Against an independent brute force: every intensity of the grid refitted and scored with log_prob."""
    rng = np.random.default_rng(11)
    dim = 24
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    scale = np.geomspace(3.0, 0.05, dim)
    draw = lambda n: (rng.standard_normal((n, dim)) * scale) @ basis.T + 1.5  # noqa: E731
    train, val, test = draw(40), draw(400), draw(4000)
    lw = ledoit_wolf(train)
    chosen = fit_baseline("gaussian-full", train, val)
    assert chosen.chosen_on_val and not fit_baseline("gaussian-full", train).chosen_on_val

    def val_score(intensity):
        sample = np.cov(train.T, bias=True)
        mu = np.trace(sample) / dim
        covariance = (1 - intensity) * sample + intensity * mu * np.eye(dim)
        factor = np.linalg.cholesky(covariance)
        return GaussianBaseline("g", train.mean(0), factor).log_prob(val).mean()

    grid = sorted({*np.linspace(0, 1, 41), lw.shrinkage} - {0.0})  # 40 rows in 24 dims: S itself is not singular
    best = max(grid, key=val_score)
    assert chosen.shrinkage == pytest.approx(best, abs=1e-12)
    # The held-out choice is at least as good as Ledoit–Wolf's on fresh rows of the same distribution (here better).
    assert chosen.log_prob(test).mean() > fit_baseline("gaussian-full", train).log_prob(test).mean()
