"""Memorisation: how close generated rows (n, dim) are to the rows the model was trained on, against held-out rows.

Two measures: :func:`memorization_ratio` (median nearest-train / nearest-test distance, about 1 for fresh samples)
and :func:`train_copy_fraction` (the share of rows that are copies of a training row, below :func:`copy_threshold`).
"""

from __future__ import annotations

import numpy as np

from flow_pipeline.core.data.stats import row_chunks
from flow_pipeline.core.metrics.distances import _as_float64, subsample
from flow_pipeline.core.metrics.prdc import nearest_distance

# A copy is at most this fraction of its distance to the nearest held-out row away from its nearest training row.
COPY_TRAIN_TEST_RATIO = 0.5
# A sample set whose train-copy fraction exceeds this is "memorising" and ranks below every set that is not.
# Held-out real rows score about the copy threshold's quantile (0.01) by construction; 0.05 is five times that,
# and ~10 binomial standard errors above it at n = 1,000 (0.003).
COPY_FRACTION_LIMIT = 0.05


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
