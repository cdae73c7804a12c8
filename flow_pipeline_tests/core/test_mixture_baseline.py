"""The gaussian-mixture reference: one component is the training rows' Gaussian in closed form, a known 3-component
mixture is found and its density written out with scipy, the raw-space density follows a change of units and
integrates to 1, samples carry the mixture's moments, and bad input is named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from scipy.stats import multivariate_normal

from flow_pipeline.core.baselines import fit_baseline
from flow_pipeline.core.mixture_baseline import (MIN_ROWS_PER_COMPONENT, VARIANCE_FLOOR, MixtureBaseline,
                                                 MixtureDataError, fit_mixture_baseline)


def correlated_rows(rng: np.random.Generator, dim: int):
    """A sampler of SONAR-scaled correlated Gaussian rows (n, dim)."""
    mixing, offset = rng.normal(size=(dim, dim)), rng.normal(size=dim)
    return lambda n: (rng.normal(size=(n, dim)) @ mixing + offset) * 1e-3


class ThreeGroups:
    """3 Gaussians in 5 dims with diagonal covariances in one rotated frame, apart along its first axis only (so the
    rows' principal frame is that frame and diagonal components can express the truth)."""

    weights = np.array([0.5, 0.3, 0.2])
    offsets = np.array([-10.0, 0.0, 10.0])

    def __init__(self, seed: int, dim: int = 5):
        self.rng = np.random.default_rng(seed)
        self.frame, _ = np.linalg.qr(self.rng.normal(size=(dim, dim)))
        self.variances = np.geomspace(3.0, 0.2, dim) * self.rng.uniform(0.5, 1.5, size=(3, dim))
        self.centre = self.rng.normal(size=dim)

    def means(self) -> np.ndarray:
        return self.centre + np.outer(self.offsets, self.frame[:, 0])

    def draw(self, n: int) -> np.ndarray:
        labels = self.rng.choice(3, size=n, p=self.weights)
        z = self.rng.normal(size=(n, self.centre.size)) * np.sqrt(self.variances[labels])
        z[:, 0] += self.offsets[labels]
        return self.centre + z @ self.frame.T

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        parts = [math.log(w) + multivariate_normal(mean, self.frame @ np.diag(v) @ self.frame.T).logpdf(x)
                 for w, mean, v in zip(self.weights, self.means(), self.variances)]
        return scipy.special.logsumexp(np.stack(parts, axis=1), axis=1)


def written_out_log_prob(mixture: MixtureBaseline, x: np.ndarray) -> np.ndarray:
    """The fitted mixture as raw-space Gaussians: component k has mean m + A [mu_k; 0] and covariance
    A diag([s_k^2; 1]) A^T with A = basis diag(scales), each through scipy."""
    a = mixture.basis * mixture.scales
    rest = np.zeros(mixture.mean.size - mixture.dims)
    parts = [math.log(w) + multivariate_normal(mixture.mean + a @ np.concatenate([mu, rest]),
                                               a @ np.diag(np.concatenate([s2, rest + 1.0])) @ a.T).logpdf(x)
             for w, mu, s2 in zip(mixture.weights, mixture.means, mixture.variances)]
    return scipy.special.logsumexp(np.stack(parts, axis=1), axis=1)


def test_one_component_is_the_training_rows_gaussian_in_closed_form():
    rng = np.random.default_rng(41)
    draw = correlated_rows(rng, 12)
    train, val, test = draw(150), draw(60), draw(80)
    mixture = fit_mixture_baseline(train, val, components=(1,))
    full = fit_baseline("gaussian-full", train, val)
    assert mixture.components == 1 and 0 < full.shrinkage < 1
    # gaussian-full's principal directions; along the leading r the rows' own (1/n) variance plus the floor, along
    # the rest gaussian-full's (shrunk) variance.
    eigval, eigvec = np.linalg.eigh(full.factor @ full.factor.T)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    lead = eigvec[:, : mixture.dims]
    variances = eigval.copy()
    variances[: mixture.dims] = (np.einsum("ji,jk,ki->i", lead, np.cov(train, rowvar=False, bias=True), lead)
                                 + VARIANCE_FLOOR * eigval[: mixture.dims])
    expected = multivariate_normal(train.mean(0), eigvec @ np.diag(variances) @ eigvec.T).logpdf(test)
    np.testing.assert_allclose(mixture.log_prob(test), expected, rtol=1e-9)
    assert [c.components for c in mixture.candidates] == [1] * len(mixture.candidates)


def test_a_known_three_component_mixture_is_found_and_its_density_written_out_agrees():
    truth = ThreeGroups(seed=0)
    train, val, test = truth.draw(3000), truth.draw(1000), truth.draw(500)
    mixture = fit_mixture_baseline(train, val, components=(1, 2, 3, 4, 5, 6))
    assert (mixture.components, mixture.dims) == (3, 5)
    tried = {(c.components, c.dims): c.val_log_likelihood for c in mixture.candidates}
    assert tried[3, 5] > max(tried[1, 5], tried[2, 5], tried[4, 5])  # K = 4 tried, not better: the search stopped
    assert set(tried) == {(1, 5), (2, 5), (3, 5), (4, 5), (3, 2)}
    # Within noise of the truth on val: 3 x 11 fitted parameters cost ~33 / (2 x 3000) nats per row.
    assert tried[3, 5] == pytest.approx(float(truth.log_prob(val).mean()), abs=0.05)
    np.testing.assert_allclose(np.sort(mixture.weights), np.sort(truth.weights), atol=0.03)
    np.testing.assert_allclose(mixture.log_prob(test), written_out_log_prob(mixture, test), rtol=1e-9)
    assert np.abs(mixture.log_prob(test) - truth.log_prob(test)).mean() < 0.1  # row by row, on fresh rows too


def test_a_change_of_units_shifts_the_raw_log_density_by_the_jacobian():
    truth = ThreeGroups(seed=3)
    train, val, test = truth.draw(1500), truth.draw(500), truth.draw(200)
    scale, shift = 4.0, truth.rng.normal(size=5) * 7.0
    mixture = fit_mixture_baseline(train, val, components=(1, 2, 3, 4))
    moved = fit_mixture_baseline(train * scale + shift, val * scale + shift, components=(1, 2, 3, 4))
    assert (moved.components, moved.dims) == (mixture.components, mixture.dims)
    # p_Y(4 x + b) = p_X(x) / 4^dim.
    np.testing.assert_allclose(moved.log_prob(test * scale + shift), mixture.log_prob(test) - 5 * math.log(scale),
                               rtol=1e-7)


def test_the_raw_space_density_integrates_to_one():
    truth = ThreeGroups(seed=5, dim=2)
    train, val = truth.draw(600) * 1e-3, truth.draw(300) * 1e-3  # SONAR-like units: a Jacobian of ~1e6
    mixture = fit_mixture_baseline(train, val, components=(1, 2, 3, 4))
    assert mixture.components > 1
    low, high = train.min(0) - 5e-3, train.max(0) + 5e-3
    axes = [np.linspace(lo, hi, 1201) for lo, hi in zip(low, high)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 2)
    cell = np.prod([axis[1] - axis[0] for axis in axes])
    assert np.exp(mixture.log_prob(grid)).sum() * cell == pytest.approx(1.0, abs=2e-3)


def test_samples_have_the_mixtures_mean_and_covariance():
    truth = ThreeGroups(seed=8)
    mixture = fit_mixture_baseline(truth.draw(1500), truth.draw(500), components=(1, 2, 3, 4))
    assert mixture.components > 1
    # In whitened coordinates: mean sum_k w_k mu_k, covariance sum_k w_k (diag s_k^2 + mu_k mu_k^T) - mean mean^T
    # on the leading r, I on the rest; then mapped back by basis diag(scales).
    a = mixture.basis * mixture.scales
    lead_mean = mixture.weights @ mixture.means
    lead_cov = (np.einsum("k,ki,kj->ij", mixture.weights, mixture.means, mixture.means)
                + np.diag(mixture.weights @ mixture.variances) - np.outer(lead_mean, lead_mean))
    z_cov = np.eye(5)
    z_cov[: mixture.dims, : mixture.dims] = lead_cov
    z_mean = np.concatenate([lead_mean, np.zeros(5 - mixture.dims)])
    drawn = mixture.sample(200_000, seed=4).astype(np.float64)
    assert drawn.dtype == np.float64 and mixture.sample(3, seed=4).dtype == np.float32
    np.testing.assert_allclose(drawn.mean(0), mixture.mean + a @ z_mean, atol=0.03)
    expected_cov = a @ z_cov @ a.T
    np.testing.assert_allclose(np.cov(drawn, rowvar=False), expected_cov, atol=0.02 * np.abs(expected_cov).max())
    np.testing.assert_array_equal(mixture.sample(7, seed=2), mixture.sample(7, seed=2))


def test_the_fit_is_deterministic_and_survives_its_arrays():
    rng = np.random.default_rng(12)
    draw = correlated_rows(rng, 6)
    train, val, test = draw(300), draw(100), draw(50)
    first, second = fit_mixture_baseline(train, val), fit_mixture_baseline(train, val)
    for name in ("weights", "means", "variances", "basis"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert first.candidates == second.candidates
    stored = MixtureBaseline.from_arrays({name: np.array(value) for name, value in first.arrays().items()})
    np.testing.assert_array_equal(stored.log_prob(test), first.log_prob(test))
    assert stored.candidates == first.candidates and stored.note() == first.note()
    assert f"K = {first.components} " in first.note() and f"r = {first.dims} " in first.note()


def test_bad_input_is_named():
    rng = np.random.default_rng(2)
    draw = correlated_rows(rng, 4)
    rows = 2 * MIN_ROWS_PER_COMPONENT
    with pytest.raises(MixtureDataError, match="no val rows"):
        fit_mixture_baseline(draw(rows), None)
    with pytest.raises(MixtureDataError, match="no val rows"):
        fit_mixture_baseline(draw(rows), draw(0))
    with pytest.raises(MixtureDataError, match=f"at least {rows} training rows .* got {rows - 1}"):
        fit_mixture_baseline(draw(rows - 1), draw(30))
    with pytest.raises(MixtureDataError, match="same dim"):
        fit_mixture_baseline(draw(rows), draw(30)[:, :3])
    with pytest.raises(MixtureDataError, match="no candidate K in \\(8,\\)"):
        fit_mixture_baseline(draw(rows), draw(30), components=(8,))
