"""Streaming per-dimension statistics for embedding arrays that may be memory-mapped and larger than RAM."""

from __future__ import annotations

import mmap

import numpy as np

from flow_pipeline.core.sources import DataError

# 8192 rows x 1024 dims: ~64 MB per float64 chunk, so a pass stays far below 1 GB of memory.
DEFAULT_CHUNK_ROWS = 8192
# A dimension's std is floored at max(ABS, REL * median std). 0.1 * median (~5e-4 on SONAR) lifts the two
# near-constant SONAR dimensions (std ~2e-5 and ~2e-4) so a tiny shift in them cannot become a z-score of 10-100,
# while leaving every ordinary dimension (all within ~0.6-1.6x the median) untouched. The absolute floor only
# matters when most dimensions are constant.
DEFAULT_REL_STD_FLOOR = 0.1
DEFAULT_ABS_STD_FLOOR = 1e-8


def streaming_mean_std(array, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-dimension mean and sample std (ddof=1) of a (rows, dim) array in one pass over ``chunk_rows``-row chunks.

    ``array`` is anything sliceable by rows: a NumPy array, an ``np.memmap`` (only one chunk is in memory at a time,
    so files larger than RAM work) or a CPU torch tensor. Each chunk's mean and sum of squared deviations (M2) are
    computed in float64 and merged with Chan et al.'s parallel update, which stays accurate when the mean is large
    relative to the spread (unlike sum / sum-of-squares).

    Returns (mean (dim,) float64, std (dim,) float64, n rows). Sample std because the statistics estimate the
    population the training split was drawn from. Raises DataError for fewer than 2 rows (sample std undefined)
    or non-finite values, and ValueError for a non-2-D array or ``chunk_rows < 1``.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if len(array.shape) != 2:
        raise ValueError(f"expected a 2-D array (rows, dim), got shape {tuple(array.shape)}")
    rows, dim = int(array.shape[0]), int(array.shape[1])
    if rows < 2:
        raise DataError(f"need at least 2 rows for a sample std, got {rows}")
    n, mean, m2 = 0, np.zeros(dim), np.zeros(dim)
    for chunk in row_chunks(array, chunk_rows):
        n, mean, m2 = _merge_moments(n, mean, m2, *_chunk_moments(_as_float64(chunk)))
    std = np.sqrt(m2 / (n - 1))
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise DataError("array contains NaN or inf values; run validate_embeddings on it first")
    return mean, std, n


def row_chunks(array, chunk_rows: int):
    """Row chunks of ``array``. A file-backed ``np.memmap`` is read through one short-lived mapping per chunk:
    pages touched through a single whole-file mapping stay counted in the process's memory until it is unmapped,
    so a pass over a file larger than RAM would otherwise grow to the file's size."""
    rows = array.shape[0]
    per_chunk_maps = isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous
    for start in range(0, rows, chunk_rows):
        count = min(chunk_rows, rows - start)
        if per_chunk_maps:
            yield np.memmap(array.filename, dtype=array.dtype, mode="r", shape=(count, *array.shape[1:]),
                            offset=array.offset + start * array.strides[0])
        else:
            yield array[start : start + count]


def _as_float64(chunk) -> np.ndarray:
    """A row chunk (NumPy, memmap or CPU tensor) -> float64 ndarray."""
    if hasattr(chunk, "detach"):  # torch.Tensor, without importing torch here
        chunk = chunk.detach().cpu().double().numpy()
    return np.asarray(chunk, dtype=np.float64)


def _chunk_moments(chunk: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, dim) float64 -> (rows, mean (dim,), M2 (dim,)), M2 = sum of squared deviations from the chunk mean."""
    mean = chunk.mean(axis=0)
    return chunk.shape[0], mean, ((chunk - mean) ** 2).sum(axis=0)


def _merge_moments(
    n_a: int, mean_a: np.ndarray, m2_a: np.ndarray, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al. (1979) merge of two (count, mean, M2) summaries of disjoint row sets."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta**2 * (n_a * n_b / n)
    return n, mean, m2


def floor_std(
    std: np.ndarray, rel_floor: float = DEFAULT_REL_STD_FLOOR, abs_floor: float = DEFAULT_ABS_STD_FLOOR
) -> np.ndarray:
    """Floor a (dim,) std at ``max(abs_floor, rel_floor * median(std))``; returns a new float64 array.

    Relative to the median so the floor follows the data's scale (raw SONAR, rescaled or synthetic data alike);
    the absolute floor keeps the result positive when the median itself is 0. See DEFAULT_REL_STD_FLOOR for why 0.1.
    """
    std = np.asarray(std, dtype=np.float64)
    if std.ndim != 1 or std.size == 0:
        raise ValueError(f"std must be a non-empty 1-D array, got shape {std.shape}")
    if rel_floor < 0 or abs_floor <= 0:
        raise ValueError(f"need rel_floor >= 0 and abs_floor > 0, got {rel_floor} and {abs_floor}")
    floor = max(abs_floor, rel_floor * float(np.median(std)))
    return np.maximum(std, floor)
