"""The prepared real side (FD with a reused root, KID with a reused K_yy, shared distance passes) gives the numbers
of the independently written metric functions and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from flow_pipeline.core.metrics.distances import TrainSpace, dispersion, fd_infinity, frechet_distance, kid, subsample
from flow_pipeline.core.metrics.copies import (COPY_FRACTION_LIMIT, copy_threshold, memorization_ratio, train_copy_fraction)
from flow_pipeline.core.metrics.prdc import nn_cosine, norm_stats, prdc
from flow_pipeline.core.metrics.real_side import evaluate_samples
from flow_pipeline.core.metrics.real_side import RealSide
from flow_pipeline.core.metrics.reference_stats import FrechetReference, KidReference


def sqrtm_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """FD written from its definition with scipy's general matrix square root (np.cov: ddof = 1)."""
    s_x, s_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    cross = scipy.linalg.sqrtm(s_x @ s_y).real
    return float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s_x) + np.trace(s_y) - 2.0 * np.trace(cross))


@pytest.mark.parametrize("n_real, n_x, dim", [(40, 60, 8), (30, 25, 12)])
def test_frechet_reference_matches_scipy_sqrtm(n_real, n_x, dim):
    rng = np.random.default_rng(n_real)
    mixing = rng.normal(size=(dim, dim))
    real = rng.normal(size=(n_real, dim)) @ mixing
    reference = FrechetReference.fit(real)
    for shift in (0.0, 0.7):
        x = rng.normal(size=(n_x, dim)) @ (mixing * 1.3) + shift
        assert reference.distance(x) == pytest.approx(sqrtm_frechet(x, real), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("n_x", [9, 45])
def test_frechet_reference_of_a_singular_real_set_matches_the_one_shot_distance(n_x):
    rng = np.random.default_rng(n_x)
    real, x = rng.normal(size=(6, 20)), rng.normal(size=(n_x, 20)) * 1.5  # real covariance singular (6 < dim)
    # 9 rows: both small, the Gram route; 45 rows: the root of the singular real covariance
    assert FrechetReference.fit(real).distance(x) == pytest.approx(frechet_distance(x, real), rel=1e-9)


# The kernel's inner products are float32 matrix products (distances._cubic_kernel): each kernel value is off by
# ~1e-7 of itself, so a KID of kernel values of order 1 is held to the float64 formula at 1e-6 absolute (a wrong
# normalisation or a diagonal left in moves it by 1e-2 and more).
KID_ABS = 1e-6


def brute_force_kid(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    return sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i]) for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("chunk", [3, 7, 100])
def test_kid_reference_gives_kid_with_its_se_and_interval(chunk):
    rng = np.random.default_rng(chunk)
    y = rng.normal(size=(19, 5))
    reference = KidReference.fit(y, n_bootstrap=40, seed=3, chunk=chunk)
    for scale in (1.0, 1.4):
        x = rng.normal(size=(23, 5)) * scale + 0.1  # longer than y: its first 19 rows are paired
        prepared = reference.kid(x)
        assert prepared["kid"] == pytest.approx(brute_force_kid(x[:19], y), abs=KID_ABS)
        # se and the bootstrap interval: the same draws as the one-shot function, to the float32 products' round-off
        assert prepared == pytest.approx(kid(x, y, n_bootstrap=40, seed=3, chunk=5), rel=1e-6, abs=KID_ABS)


def test_kid_reference_rejects_too_few_rows():
    reference = KidReference.fit(np.ones((6, 3)))
    with pytest.raises(ValueError, match="at least that many rows"):
        reference.kid(np.ones((5, 3)))


def one_shot_metrics(generated, train, test, k=5, seed=0):
    """Every metric from the one-shot functions, each on its own subsamples: the composition the prepared path
    replaces (each function is tested against naive formulas in test_metrics.py / test_distances.py)."""
    n = generated.shape[0]
    rng = np.random.default_rng(seed)
    test_n, train_n = subsample(test, n, rng), subsample(train, n, rng)
    space = TrainSpace.fit(train)
    z_generated, z_test = space.transform(generated), space.transform(test_n)
    threshold = copy_threshold(train, test_n)
    kernel = kid(z_generated, z_test, seed=seed)
    copies = train_copy_fraction(generated, train, threshold, test_n)
    fd, fd_floor = frechet_distance(generated, test_n), frechet_distance(train_n, test_n)
    gen_norms, real_norms = norm_stats(generated), norm_stats(test_n)
    return {
        **kernel, "ranking_kid": float("inf") if copies > COPY_FRACTION_LIMIT else kernel["kid"],
        **fd_infinity(z_generated, z_test, seed=seed), **dispersion(generated, test_n),
        "fd": fd, "fd_floor": fd_floor, "fd_ratio": fd / fd_floor, **prdc(test_n, generated, k=k),
        "memorization_ratio": memorization_ratio(generated, train_n, test_n, seed=seed),
        "train_copy_fraction": copies, "copy_threshold": threshold, "memorising": float(copies > COPY_FRACTION_LIMIT),
        "norm_mean": gen_norms["mean"], "norm_std": gen_norms["std"], "real_norm_mean": real_norms["mean"],
        "real_norm_std": real_norms["std"], "nn_cosine": nn_cosine(generated, test_n), "n": n,
    }


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(11)
    mixing = rng.normal(size=(24, 24)) / 5
    draw = lambda count: rng.normal(size=(count, 24)) @ mixing + 0.3  # noqa: E731
    return {"train": draw(150), "test": draw(90), "fresh": draw(60), "rng": rng}


@pytest.mark.parametrize("seed", [0, 4])
def test_prepared_side_scores_every_set_as_the_one_shot_functions_do(rows, seed, tmp_path):
    path = tmp_path / "train.npy"
    np.save(path, rows["train"])
    train = np.load(path, mmap_mode="r")  # scanned in chunks as a memory-mapped split
    rng = rows["rng"]
    copies = rows["train"][rng.choice(150, 60, replace=False)] + 1e-4 * rng.normal(size=(60, 24))
    candidates = {"fresh": rows["fresh"], "shrunk": rows["fresh"] * 0.5, "copies": copies}
    side = RealSide.prepare(train, rows["test"], 60, k=3, seed=seed)
    for name, generated in candidates.items():
        expected = one_shot_metrics(generated, rows["train"], rows["test"], k=3, seed=seed)
        got = side.score(generated)
        assert list(got) == list(expected), name
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-10), name
    assert side.score(copies)["ranking_kid"] == float("inf")


def test_train_smaller_than_n_and_test_larger_take_the_one_shot_subsamples(rows):
    # (test rows that duplicate samples would put samples exactly on k-NN radii, where round-off decides)
    train, test, generated = rows["train"][:40], np.vstack([rows["test"], rows["train"][40:]]), rows["fresh"]
    expected = one_shot_metrics(generated, train, test, k=4, seed=2)
    assert evaluate_samples(generated, train, test, k=4, seed=2) == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_score_rejects_a_set_of_another_size(rows):
    side = RealSide.prepare(rows["train"], rows["test"], 60)
    with pytest.raises(ValueError, match="prepared for 60 samples"):
        side.score(rows["fresh"][:50])


@pytest.mark.parametrize("n", [60, 12])  # n > dim: FD keeps covariance roots; n <= dim: centred rows (Gram route)
def test_a_side_prepared_from_kept_statistics_scores_exactly_as_a_fresh_one(rows, n):
    fresh = RealSide.prepare(rows["train"], rows["test"], n, k=3, seed=5)
    statistics = fresh.statistics()
    assert all(isinstance(value, np.ndarray) for value in statistics.values())
    reused = RealSide.prepare(rows["train"], rows["test"], n, k=3, seed=5, statistics=statistics)
    generated = rows["fresh"][:n] * 0.8 + 0.05
    assert reused.score(generated) == fresh.score(generated)
    other_seed = RealSide.prepare(rows["train"], rows["test"], n, k=3, seed=6).statistics()
    assert not np.array_equal(other_seed["real_radii"], statistics["real_radii"])
