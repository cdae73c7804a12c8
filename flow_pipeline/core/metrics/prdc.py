"""Sample-quality metrics between generated and real embeddings.

All inputs are numpy arrays (n, dim), converted to float64. Distances are Euclidean, computed in row chunks with
``torch.cdist`` so that memory stays at (chunk, m) whatever n is.

The metrics are chosen so that no single degenerate generator can game them: the ranking metric ``ranking_kid``
(unbiased KID in train-normalised space, :mod:`flow_pipeline.core.distances`, with a rule that ranks sets copying
training rows below every other set), FD∞ and the dispersion ratios, the Fréchet distance relative to the floor of
two real sets of the same size, precision/recall/density/coverage (Naeem et al. 2020), two memorisation measures, and
norm / nearest-neighbour cosine diagnostics. There is deliberately no "distribution MSE" that mode collapse would
win. The adversary tests (flow_pipeline_tests/core/test_adversaries.py) hold the ranking against shrunk, inflated,
collapsed and copied sample sets.
"""

from __future__ import annotations

import numpy as np
import torch

from flow_pipeline.core.distances import (  # noqa: F401  (frechet_distance and subsample are re-exported)
    TrainSpace,
    _as_float64,
    dispersion,
    fd_infinity,
    frechet_distance,
    kid,
    subsample,
)
from flow_pipeline.core.data.stats import row_chunks

# Rows of the left operand per distance chunk: the (chunk, m) float64 block is 80 MB for m = 10k reference rows.
_CHUNK = 1024
# A copy is at most this fraction of its distance to the nearest held-out row away from its nearest training row.
COPY_TRAIN_TEST_RATIO = 0.5


def _torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


def _distance_chunks(a: np.ndarray, b: np.ndarray):
    """Yield (row_slice, distances (chunk, n_b)) of Euclidean distances from row chunks of a (n_a, dim) to b."""
    ta, tb = _torch(a), _torch(b)
    for start in range(0, ta.shape[0], _CHUNK):
        rows = slice(start, min(start + _CHUNK, ta.shape[0]))
        yield rows, torch.cdist(ta[rows], tb)


def kth_neighbour_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x (n, dim) to its k-th nearest other row, excluding itself: (n,).

    The self-distance is the smallest entry of each row, so this is the (k+1)-th smallest distance (as in the
    reference PRDC code); exact duplicates of a row count as neighbours at distance 0.
    """
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, n-1] = [1, {x.shape[0] - 1}], got {k}")
    radii = np.empty(x.shape[0])
    for rows, dist in _distance_chunks(x, x):
        radii[rows] = torch.topk(dist, k + 1, dim=1, largest=False).values[:, -1].numpy()
    return radii


def nearest_distance(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distance from each row of x (n, dim) to its nearest row of reference (m, dim): (n,)."""
    out = np.empty(x.shape[0])
    for rows, dist in _distance_chunks(x, reference):
        out[rows] = dist.min(dim=1).values.numpy()
    return out


# --------------------------------------------------------------------------------------------- PRDC


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of fake (M, dim) against real (N, dim), Naeem et al. 2020.

    With r_i the distance from real_i to its k-th nearest other real point, s_j the same for fake_j within fake,
    and B(c, r) the open ball {x : ||x - c|| < r}:

    * precision = (1/M) sum_j 1[exists i: fake_j in B(real_i, r_i)]
    * recall    = (1/N) sum_i 1[exists j: real_i in B(fake_j, s_j)]
    * density   = (1/(kM)) sum_j sum_i 1[fake_j in B(real_i, r_i)]   (can exceed 1)
    * coverage  = (1/N) sum_i 1[exists j: fake_j in B(real_i, r_i)]
    """
    real, fake = _as_float64(real), _as_float64(fake)
    real_radii = kth_neighbour_distance(real, k)
    fake_radii = torch.from_numpy(kth_neighbour_distance(fake, k))
    fake_in_some_real_ball = torch.zeros(fake.shape[0], dtype=torch.bool)
    fake_ball_count = torch.zeros(fake.shape[0], dtype=torch.float64)
    real_in_some_fake_ball = np.empty(real.shape[0], dtype=bool)
    real_ball_has_fake = np.empty(real.shape[0], dtype=bool)
    for rows, dist in _distance_chunks(real, fake):  # dist: (chunk of real, M)
        inside_real_ball = dist < torch.from_numpy(real_radii[rows])[:, None]
        fake_in_some_real_ball |= inside_real_ball.any(dim=0)
        fake_ball_count += inside_real_ball.sum(dim=0)
        real_ball_has_fake[rows] = inside_real_ball.any(dim=1).numpy()
        real_in_some_fake_ball[rows] = (dist < fake_radii[None, :]).any(dim=1).numpy()
    return {
        "precision": float(fake_in_some_real_ball.double().mean()),
        "recall": float(real_in_some_fake_ball.mean()),
        "density": float(fake_ball_count.mean()) / k,
        "coverage": float(real_ball_has_fake.mean()),
    }


# --------------------------------------------------------------------------------------------- memorization


def memorization_ratio(
    generated: np.ndarray, train: np.ndarray, test: np.ndarray, eps: float = 1e-12, seed: int = 0
) -> float:
    """Median over generated rows g of  d(g, train) / (d(g, test) + eps), d = distance to the nearest row.

    generated (n, dim), train (n_train, dim), test (n_test, dim). The larger of train/test is first subsampled
    (seeded, without replacement) to the size of the smaller, because nearest-neighbour distances shrink with the
    reference set's size. Then samples from the data distribution that are not in train give about 1, and copies
    of training points give about 0 (their train distance vanishes). ``eps`` only guards against division by zero.
    """
    generated, train, test = _as_float64(generated), _as_float64(train), _as_float64(test)
    rng = np.random.default_rng(seed)
    size = min(train.shape[0], test.shape[0])
    train, test = subsample(train, size, rng), subsample(test, size, rng)
    ratios = nearest_distance(generated, train) / (nearest_distance(generated, test) + eps)
    return float(np.median(ratios))


def nearest_distance_streamed(x: np.ndarray, reference, chunk_rows: int = 8192) -> np.ndarray:
    """:func:`nearest_distance` of x (n, dim) to a reference (m, dim) read ``chunk_rows`` rows at a time: (n,).

    A file-backed ``np.memmap`` reference (a split on disk) is read through one short-lived mapping per chunk
    (:func:`flow_pipeline.core.data.stats.row_chunks`), so a split far larger than memory never becomes resident.
    """
    best = np.full(x.shape[0], np.inf)
    for chunk in row_chunks(reference, chunk_rows):
        best = np.minimum(best, nearest_distance(x, _as_float64(chunk)))
    return best


def copy_threshold(train, test: np.ndarray, quantile: float = 0.01) -> float:
    """The ``quantile`` of the nearest-train distances of held-out test rows (m, dim): closer than this to a
    training row, a sample is nearer to the training data than all but ``quantile`` of real unseen rows are.

    train (n_train, dim): the whole split, scanned in chunks. Test rows that duplicate a training row (distance
    at most 1e-5 of the median: cdist's matmul form leaves ~1e-8 |x| of round-off on an exact duplicate) are left
    out, so duplicates across the splits cannot pull the threshold to 0.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    distances = nearest_distance_streamed(_as_float64(test), train)
    distinct = distances[distances > 1e-5 * np.median(distances)]
    return float(np.quantile(distinct if distinct.size else distances, quantile))


def train_copy_fraction(generated: np.ndarray, train, threshold: float, test: np.ndarray | None = None) -> float:
    """Share of generated rows (n, dim) that are copies of training rows: their nearest row of train (all rows the
    model was trained on, scanned in chunks, may be memory-mapped) is closer than ``threshold``
    (:func:`copy_threshold`) and, when held-out ``test`` rows (m, dim) are given, at most
    :data:`COPY_TRAIN_TEST_RATIO` times the distance to the nearest test row.

    The second condition keeps collapse apart from copying: in high dimension the data mean is closer to every row
    than rows are to each other, so a collapsed or shrunk sample passes the absolute threshold, but it is as close
    to test rows as to train rows; a copy (or near copy) of a training row is not. Held-out real data scores at
    most the threshold's quantile (0.01); copies score 1.
    """
    generated = _as_float64(generated)
    near_train = nearest_distance_streamed(generated, train)
    is_copy = near_train < threshold
    if test is not None:
        is_copy &= near_train <= COPY_TRAIN_TEST_RATIO * nearest_distance(generated, _as_float64(test))
    return float(np.mean(is_copy))


# --------------------------------------------------------------------------------------------- diagnostics


def norm_stats(x: np.ndarray) -> dict[str, float]:
    """Mean and (population) standard deviation of the L2 norms of the rows of x (n, dim)."""
    norms = np.linalg.norm(_as_float64(x), axis=1)
    return {"mean": float(norms.mean()), "std": float(norms.std())}


def _unit_rows(x: np.ndarray) -> torch.Tensor:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return _torch(x / np.maximum(norms, 1e-12))  # zero rows stay zero (cosine 0) instead of NaN


def nn_cosine(generated: np.ndarray, test: np.ndarray) -> float:
    """Mean over generated rows (n, dim) of the largest cosine similarity to any test row (m, dim)."""
    g, t = _unit_rows(_as_float64(generated)), _unit_rows(_as_float64(test))
    best = torch.cat([(g[s : s + _CHUNK] @ t.T).max(dim=1).values for s in range(0, g.shape[0], _CHUNK)])
    return float(best.mean())


# --------------------------------------------------------------------------------------------- all together


# A sample set whose train-copy fraction exceeds this is "memorising" and ranks below every set that is not.
# Held-out real rows score about the copy threshold's quantile (0.01) by construction; 0.05 is five times that,
# and ~10 binomial standard errors above it at n = 1,000 (0.003).
COPY_FRACTION_LIMIT = 0.05
RANKING_METRIC = "ranking_kid"
RANKING_RULE = (f"{RANKING_METRIC} = KID (unbiased MMD², cubic kernel, train-normalised space; E = 0 for held-out "
                f"real data) for sample sets whose train_copy_fraction is at most {COPY_FRACTION_LIMIT}; +inf for "
                f"sets above it (memorising: exact or near copies of training rows, which a distribution distance "
                f"cannot tell from held-out real rows), so they rank below every non-copying set. Lower is better.")
# The space every metric is computed in (the evaluation's metadata repeats this next to the numbers).
METRIC_SPACES = {
    "train-normalised (z-scored with the training rows' mean and floored std)": (
        "kid", "kid_se", "kid_ci_low", "kid_ci_high", "ranking_kid", "fd_inf", "fd_inf_slope"),
    "raw embedding space": (
        "fd", "fd_floor", "fd_ratio", "precision", "recall", "density", "coverage", "memorization_ratio",
        "train_copy_fraction", "copy_threshold", "variance_ratio", "norm_ratio", "norm_mean", "norm_std",
        "real_norm_mean", "real_norm_std", "nn_cosine"),
}


def evaluate_samples(
    generated: np.ndarray, train: np.ndarray, test: np.ndarray, k: int = 5, seed: int = 0,
    train_copy_threshold: float | None = None, train_space: TrainSpace | None = None,
) -> dict[str, float]:
    """All metrics of generated (n, dim) against held-out test, and against train: the rows the model was trained
    on (for the floor, the normalisation of the kernel distances, and both memorisation measures).

    Every comparison uses the same n: test and train are subsampled (seeded by ``seed``, without replacement) to n
    rows when they are larger, because FD and the k-NN metrics depend strongly on sample size. The real reference
    for every distance is the test subsample, so memorizing train is not rewarded there.

    Returns a flat dict (spaces: :data:`METRIC_SPACES`):
    kid, kid_se, kid_ci_low, kid_ci_high (:func:`~flow_pipeline.core.distances.kid` against test_n, in the space
    z-scored with train's statistics; pass ``train_space`` to reuse them); ranking_kid (:data:`RANKING_RULE`);
    fd_inf, fd_inf_slope (:func:`~flow_pipeline.core.distances.fd_infinity`, same space); variance_ratio,
    norm_ratio (:func:`~flow_pipeline.core.distances.dispersion` against test_n);
    fd: FD(generated, test_n); fd_floor: FD(train_n, test_n), what two real sets of this size score, since FD is far
    from 0 when n ~ dim; fd_ratio = fd / fd_floor (biased: rewards shrunk samples, kept for comparison); precision,
    recall, density, coverage (:func:`prdc` with real = test_n); memorization_ratio (about 1 for fresh samples,
    near 0 for train copies); train_copy_fraction against all of train (about 0.01 for fresh samples, 1 for copies
    of any training row) and its copy_threshold (:func:`copy_threshold` of test_n; pass it back as
    ``train_copy_threshold`` to skip recomputing it for more samples of the same n and seed); memorising (1.0 when
    train_copy_fraction > :data:`COPY_FRACTION_LIMIT`); norm_mean, norm_std of generated norms; real_norm_mean,
    real_norm_std of test_n norms; nn_cosine of generated to test_n; n = len(generated).

    Several sample sets of the same size against the same rows: prepare the real side once
    (:meth:`flow_pipeline.core.real_side.RealSide.prepare`) and :meth:`~flow_pipeline.core.real_side.RealSide.score`
    each set; this function does both for one set.
    """
    # real_side builds on this module's pieces, so it is imported here rather than at the top.
    from flow_pipeline.core.real_side import RealSide

    generated = _as_float64(generated)
    side = RealSide.prepare(train, test, generated.shape[0], k=k, seed=seed,
                            train_copy_threshold=train_copy_threshold, train_space=train_space)
    return side.score(generated)
