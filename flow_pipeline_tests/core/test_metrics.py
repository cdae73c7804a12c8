"""Metrics against independent formulas, brute-force loops, and a ranking on data with a known distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.linalg import sqrtm
from scipy.stats import ortho_group

from flow_pipeline.core.metrics.copies import (memorization_ratio, copy_threshold, nearest_distance_streamed, train_copy_fraction)
from flow_pipeline.core.metrics.distances import frechet_distance
from flow_pipeline.core.metrics.prdc import nn_cosine, norm_stats, prdc
from flow_pipeline.core.metrics.real_side import evaluate_samples

# ----------------------------------------------------------------------------------------- Fréchet distance


def exact_moment_gaussian(rng, n, mean, sigma, basis):
    """n rows whose sample mean is exactly ``mean`` (dim,) and whose unbiased sample covariance is exactly
    basis diag(sigma^2) basis^T, with basis (dim, r) orthonormal and sigma (r,)."""
    z = rng.standard_normal((n, len(sigma)))
    q, _ = np.linalg.qr(z - z.mean(axis=0))  # orthonormal, zero-mean columns
    return mean + (math.sqrt(n - 1) * q * sigma) @ basis.T


@pytest.mark.parametrize(
    ("n_x", "n_y", "dim", "rank"),
    [
        (300, 400, 8, 8),  # n >> dim, full-rank covariances
        (20, 20, 64, 10),  # n < dim: singular covariances
        (10, 50, 30, 5),  # unequal sizes, both singular
    ],
)
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians(n_x, n_y, dim, rank):
    rng = np.random.default_rng(n_x + dim)
    basis = ortho_group.rvs(dim, random_state=1)[:, :rank]  # same rotated, possibly low-rank subspace
    mu_x, mu_y = rng.normal(size=dim), rng.normal(size=dim)
    sigma_x, sigma_y = rng.uniform(0.5, 3.0, rank), rng.uniform(0.5, 3.0, rank)
    x = exact_moment_gaussian(rng, n_x, mu_x, sigma_x, basis)
    y = exact_moment_gaussian(rng, n_y, mu_y, sigma_y, basis)
    # Commuting covariances: tr sqrt(S_x S_y) = sum sigma_x sigma_y, so FD = ||dmu||^2 + sum (sigma_x - sigma_y)^2.
    expected = np.sum((mu_x - mu_y) ** 2) + np.sum((sigma_x - sigma_y) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_matches_scipy_sqrtm_for_general_covariances():
    rng = np.random.default_rng(0)
    dim = 10
    x = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim)) + 1.0
    y = rng.normal(size=(700, dim)) @ rng.normal(size=(dim, dim)) - 0.5
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    cross = sqrtm(s_x @ s_y).real
    expected = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s_x + s_y - 2 * cross)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("n", "dim"), [(200, 16), (30, 256)])
def test_frechet_distance_of_a_set_with_itself_is_zero(n, dim):
    x = np.random.default_rng(n).normal(size=(n, dim)) * 2.0 + 3.0
    assert frechet_distance(x, x) < 1e-8 * np.trace(np.cov(x, rowvar=False))


def test_frechet_distance_is_symmetric_and_positive_for_different_sets():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(50, 80)), rng.normal(size=(60, 80)) * 1.5
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, y) > 1.0


# ----------------------------------------------------------------------------------------- PRDC


def naive_prdc(real, fake, k):
    """Naeem et al. 2020 with plain loops."""

    def dist(a, b):
        return math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(a, b)))

    def kth_radius(points, i):
        others = sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)
        return others[k - 1]

    r = [kth_radius(real, i) for i in range(len(real))]
    s = [kth_radius(fake, j) for j in range(len(fake))]
    d = [[dist(real[i], fake[j]) for j in range(len(fake))] for i in range(len(real))]
    n_real, n_fake = len(real), len(fake)
    precision = sum(any(d[i][j] < r[i] for i in range(n_real)) for j in range(n_fake)) / n_fake
    recall = sum(any(d[i][j] < s[j] for j in range(n_fake)) for i in range(n_real)) / n_real
    density = sum(d[i][j] < r[i] for i in range(n_real) for j in range(n_fake)) / (k * n_fake)
    coverage = sum(min(d[i]) < r[i] for i in range(n_real)) / n_real
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize(("k", "shift", "seed"), [(3, 0.6, 0), (5, 1.0, 1), (2, 0.3, 2)])
def test_prdc_equals_naive_loops(k, shift, seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(40, 6))
    fake = rng.normal(size=(33, 6)) * 1.3 + shift  # overlapping but different: values strictly inside (0, 1)
    got, expected = prdc(real, fake, k=k), naive_prdc(real, fake, k)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1


def test_prdc_rejects_k_not_smaller_than_the_set():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        prdc(rng.normal(size=(5, 3)), rng.normal(size=(9, 3)), k=5)


# ----------------------------------------------------------------------------------------- memorization, norms, cosine


def test_memorization_ratio_equals_median_of_nearest_distance_ratios():
    rng = np.random.default_rng(5)
    generated, train, test = rng.normal(size=(25, 7)), rng.normal(size=(30, 7)), rng.normal(size=(30, 7))
    ratios = [
        min(np.linalg.norm(g - t) for t in train) / (min(np.linalg.norm(g - t) for t in test) + 1e-12)
        for g in generated
    ]
    assert memorization_ratio(generated, train, test) == pytest.approx(float(np.median(ratios)), rel=1e-10)


def test_memorization_ratio_equalizes_reference_sizes():
    # A train set 8x larger than test sits closer to everything; without subsampling, fresh data would score < 1.
    rng = np.random.default_rng(6)
    train, test, fresh = rng.normal(size=(1600, 8)), rng.normal(size=(200, 8)), rng.normal(size=(300, 8))
    assert 0.85 < memorization_ratio(fresh, train, test) < 1.15


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_streamed_nearest_distance_equals_brute_force(chunk_rows, tmp_path):
    rng = np.random.default_rng(7)
    x, reference = rng.normal(size=(19, 5)), rng.normal(size=(50, 5)).astype(np.float32)
    want = [min(np.linalg.norm(row - ref) for ref in reference.astype(np.float64)) for row in x]
    np.save(tmp_path / "reference.npy", reference)
    mapped = np.load(tmp_path / "reference.npy", mmap_mode="r")  # read through one mapping per chunk
    for ref in (reference, mapped):
        np.testing.assert_allclose(nearest_distance_streamed(x, ref, chunk_rows=chunk_rows), want, rtol=1e-12)


def _nearest_train(rows, train):
    return np.array([min(np.linalg.norm(r - t) for t in train) for r in rows])


def test_train_copy_fraction_equals_its_definition():
    rng = np.random.default_rng(8)
    generated, train, test = rng.normal(size=(40, 6)), rng.normal(size=(90, 6)), rng.normal(size=(60, 6))
    generated[:10] = train[rng.choice(90, 10, replace=False)]  # a quarter are exact copies
    want_threshold = np.quantile(_nearest_train(test, train), 0.05)
    threshold = copy_threshold(train, test, quantile=0.05)
    assert threshold == pytest.approx(want_threshold, rel=1e-12)
    fraction = train_copy_fraction(generated, train, threshold)
    assert fraction == float(np.mean(_nearest_train(generated, train) < want_threshold)) >= 0.25


def test_copy_threshold_ignores_test_rows_that_duplicate_train_rows():
    """5% of the test rows also sit in train: their distance 0 must not become the 1% threshold."""
    rng = np.random.default_rng(9)
    train, test = rng.normal(size=(200, 6)), rng.normal(size=(100, 6))
    test[:5] = train[:5]
    distances = _nearest_train(test, train)
    threshold = copy_threshold(train, test)
    assert threshold == pytest.approx(np.quantile(distances[5:], 0.01), rel=1e-12)
    assert threshold > 0.1 * np.median(distances)
    assert train_copy_fraction(train[100:150], train, threshold) == 1.0


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5])
def test_copy_threshold_rejects_a_quantile_outside_the_unit_interval(bad):
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="quantile"):
        copy_threshold(x, x, quantile=bad)


def test_copies_of_train_rows_outside_the_memorization_subsample_are_caught():
    """With a train split 10x the sample size, memorization_ratio sees a random tenth of it: copies of the other
    rows look fresh to it. train_copy_fraction scans the whole split."""
    rng = np.random.default_rng(10)
    mixture = LowRankMixture(seed=11)
    train, test = mixture.draw(10 * N, rng), mixture.draw(N, rng)
    copies = train[rng.choice(train.shape[0], N, replace=False)] + 0.01 * rng.standard_normal((N, DIM))
    fresh = mixture.draw(N, rng)
    caught, missed = evaluate_samples(copies, train, test, seed=0), evaluate_samples(fresh, train, test, seed=0)
    assert caught["memorization_ratio"] > 0.5  # the subsampled ratio misses most copies...
    assert caught["train_copy_fraction"] > 0.95  # ...the full scan does not
    assert missed["train_copy_fraction"] < 0.05 and 0.9 < missed["memorization_ratio"] < 1.1
    # The threshold handed back gives the same result without the second scan.
    again = evaluate_samples(copies, train, test, seed=0, train_copy_threshold=caught["copy_threshold"])
    assert again == caught


def test_norm_stats_and_nn_cosine_equal_naive_formulas():
    rng = np.random.default_rng(7)
    generated, test = rng.normal(size=(12, 5)) + 0.3, rng.normal(size=(17, 5))
    norms = [math.sqrt(sum(v * v for v in row)) for row in generated]
    mean = sum(norms) / len(norms)
    std = math.sqrt(sum((v - mean) ** 2 for v in norms) / len(norms))
    assert norm_stats(generated) == pytest.approx({"mean": mean, "std": std}, rel=1e-12)

    def cosine(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    expected = np.mean([max(cosine(g, t) for t in test) for g in generated])
    assert nn_cosine(generated, test) == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------------------- ranking on known data

DIM, RANK, CLUSTERS, N = 512, 24, 16, 500


class LowRankMixture:
    """Seeded mixture of 16 Gaussians in a 24-d subspace of R^512 plus small isotropic noise (a stand-in for
    sentence embeddings: clustered, low intrinsic dimension, non-zero mean)."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.basis, _ = np.linalg.qr(rng.standard_normal((DIM, RANK)))
        self.centres = rng.standard_normal((CLUSTERS, RANK)) * 3.0
        self.offset = rng.standard_normal(DIM) * 0.5

    def draw(self, n: int, rng) -> np.ndarray:
        z = self.centres[rng.integers(CLUSTERS, size=n)] + rng.standard_normal((n, RANK))
        return self.offset + z @ self.basis.T + 0.05 * rng.standard_normal((n, DIM))


@pytest.fixture(scope="module")
def ranking():
    rng = np.random.default_rng(123)
    mixture = LowRankMixture(seed=9)
    train, test = mixture.draw(N, rng), mixture.draw(N, rng)
    mean = train.mean(axis=0)
    matched_sigma = math.sqrt(train.var(axis=0).sum() / DIM)  # same total variance, spread over all directions
    candidates = {
        "held_out": mixture.draw(N, rng),
        "train_copies": train + 0.01 * rng.standard_normal(train.shape),
        "mean_collapse": mean + 1e-3 * rng.standard_normal(train.shape),
        "isotropic": mean + matched_sigma * rng.standard_normal(train.shape),
    }
    return {name: evaluate_samples(x, train, test, k=5, seed=0) for name, x in candidates.items()}


def test_evaluate_samples_returns_all_metrics(ranking):
    expected_keys = {
        "fd", "fd_floor", "fd_ratio", "precision", "recall", "density", "coverage", "memorization_ratio",
        "train_copy_fraction", "copy_threshold", "norm_mean", "norm_std", "real_norm_mean", "real_norm_std",
        "nn_cosine", "n", "kid", "kid_se", "kid_ci_low", "kid_ci_high", "ranking_kid", "fd_inf", "fd_inf_slope",
        "variance_ratio", "norm_ratio", "memorising",
    }  # fmt: skip
    for metrics in ranking.values():
        assert set(metrics) == expected_keys
        assert metrics["n"] == N
        assert metrics["fd_ratio"] == pytest.approx(metrics["fd"] / metrics["fd_floor"])


def test_held_out_real_data_scores_best(ranking):
    held = ranking["held_out"]
    assert 0.5 < held["fd_ratio"] < 1.5  # FD itself is not ~0 at n ~ dim, but matches the real-vs-real floor
    assert held["precision"] > 0.7 and held["recall"] > 0.7 and held["coverage"] > 0.8
    assert 0.9 < held["memorization_ratio"] < 1.1
    assert held["train_copy_fraction"] < 0.05
    assert held["norm_mean"] == pytest.approx(held["real_norm_mean"], rel=0.05)
    for bad in ("mean_collapse", "isotropic"):
        assert held["fd_ratio"] < ranking[bad]["fd_ratio"]
        for name in ("precision", "recall", "coverage", "nn_cosine"):
            assert held[name] > ranking[bad][name], (bad, name)


def test_copies_of_train_are_flagged_by_memorization_only(ranking):
    copies = ranking["train_copies"]
    assert copies["memorization_ratio"] < 0.3
    assert copies["train_copy_fraction"] > 0.95
    # The distribution-level metrics cannot tell copies from fresh samples; that is why memorization is reported.
    assert 0.5 < copies["fd_ratio"] < 1.5 and copies["coverage"] > 0.8


def test_mean_collapse_scores_bad(ranking):
    collapse = ranking["mean_collapse"]
    assert collapse["recall"] < 0.05 and collapse["coverage"] < 0.05
    assert collapse["fd_ratio"] > 10
    assert collapse["norm_std"] < 0.1 * collapse["real_norm_std"]


def test_isotropic_gaussian_with_matched_scale_scores_bad(ranking):
    iso = ranking["isotropic"]
    assert iso["precision"] < 0.05 and iso["density"] < 0.05 and iso["coverage"] < 0.05
    assert iso["fd_ratio"] > 10
