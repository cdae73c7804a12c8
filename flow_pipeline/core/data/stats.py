"""Streaming per-dimension statistics for embedding arrays that may be memory-mapped and larger than RAM."""

from __future__ import annotations

import mmap

import numpy as np

from flow_pipeline.core.data import DataError

# 2048 rows x 1024 dims: an 8 MB float32 chunk. Over a 4.3 GB file (benchmarks/bench_norm_stats.py) it was as fast
# as 8192 rows (2.4 GB/s) at 17 MB above the interpreter's RSS, and float32 sums over fewer rows round less.
DEFAULT_CHUNK_ROWS = 2048


def streaming_mean_std(array, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-dimension mean and sample std (ddof=1) of a (rows, dim) array in one pass over ``chunk_rows``-row chunks.

    ``array`` is anything sliceable by rows: a NumPy array, an ``np.memmap`` (read one chunk at a time through its
    own mapping, so files larger than RAM work) or a CPU torch tensor. Each chunk is summarised as (count, mean, M2 =
    sum of squared deviations) in its own precision (float32 for float32/float16 embeddings, float64 otherwise) with
    BLAS sums around the chunk's own mean, and the summaries are merged in float64 with Chan et al.'s parallel
    update, which stays accurate when the mean is large relative to the spread (unlike sum / sum-of-squares). For
    float32 embeddings the result agrees with a float64 two-pass computation to ~1e-7 relative (a few 1e-7 when the
    mean is 1e5 times the spread), far below what float32 normalisation resolves; a float32 chunk whose squares
    would overflow, and float64 data, are summed in float64.

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
    buffers: dict[np.dtype, np.ndarray] = {}  # one work buffer per precision, reused by every chunk
    for chunk in row_chunks(array, chunk_rows):
        chunk = _as_float_array(chunk)
        with np.errstate(over="ignore"):  # an overflow is handled just below
            moments = _chunk_moments(chunk, _buffer(buffers, chunk.dtype, min(chunk_rows, rows), dim))
        if chunk.dtype == np.float32 and not np.isfinite(moments[2]).all():
            # Finite float32 values beyond ~1e19 overflow when squared: redo this chunk in float64 (real NaN/inf
            # stay non-finite there and are reported below).
            chunk = chunk.astype(np.float64)
            moments = _chunk_moments(chunk, _buffer(buffers, chunk.dtype, min(chunk_rows, rows), dim))
        n, mean, m2 = _merge_moments(n, mean, m2, *moments)
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


def _as_float_array(chunk) -> np.ndarray:
    """A row chunk (NumPy, memmap or CPU tensor) -> float32 ndarray for float32/float16 data, else float64."""
    if hasattr(chunk, "detach"):  # torch.Tensor, without importing torch here
        chunk = chunk.detach().cpu()
        chunk = (chunk.float() if chunk.is_floating_point() and chunk.element_size() <= 4 else chunk.double()).numpy()
    chunk = np.asarray(chunk)
    low_precision = chunk.dtype.kind == "f" and chunk.dtype.itemsize <= 4
    return np.asarray(chunk, dtype=np.float32 if low_precision else np.float64)


def _buffer(buffers: dict, dtype: np.dtype, rows: int, dim: int) -> np.ndarray:
    """The (rows, dim) work buffer of ``dtype`` in ``buffers``, created on first use."""
    if dtype not in buffers:
        buffers[dtype] = np.empty((rows, dim), dtype=dtype)
    return buffers[dtype]


def _chunk_moments(chunk: np.ndarray, buffer: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(k, dim) float32/float64 chunk -> (k, mean (dim,) float64, M2 (dim,) float64); ``buffer`` (>= k, dim) of the
    chunk's dtype is scratch space.

    Column sums are ``ones @ x`` (a BLAS matrix-vector product, ~2x faster than ``sum(axis=0)``). The deviations are
    taken from the chunk's rounded centre c, so they are small and their sum s is ~0: mean = c + s/k and
    M2 = sum(dev^2) - s^2/k are exact for that c, whatever the data's offset.
    """
    k = chunk.shape[0]
    ones = np.ones(k, dtype=chunk.dtype)
    centre = ones @ chunk / chunk.dtype.type(k)
    deviations = buffer[:k]
    np.subtract(chunk, centre, out=deviations)
    s = (ones @ deviations).astype(np.float64)
    np.multiply(deviations, deviations, out=deviations)
    m2 = (ones @ deviations).astype(np.float64) - s * s / k  # >= 0: sum(d^2) >= (sum d)^2 / k (Cauchy-Schwarz)
    return k, centre.astype(np.float64) + s / k, m2


def _merge_moments(
    n_a: int, mean_a: np.ndarray, m2_a: np.ndarray, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al. (1979) merge of two (count, mean, M2) summaries of disjoint row sets."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta**2 * (n_a * n_b / n)
    return n, mean, m2


def streaming_scatter(array, mean: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray, float, int]:
    """Scatter matrix and fourth moment of a (rows, dim) array around a given ``mean``, one chunk in memory at a time.

    Returns (scatter = sum_k (x_k - mean)(x_k - mean)^T, (dim, dim) float64; sum_k ||x_k - mean||^4 as a float;
    rows). Summed in float64 (a 1024-d chunk of 2048 rows is one ~4 GFLOP product), so a mean that is large next
    to the spread loses nothing. ``array`` is anything :func:`row_chunks` reads; the caller has checked it is finite.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    mean = np.asarray(mean, dtype=np.float64)
    dim = int(array.shape[1])
    if mean.shape != (dim,):
        raise ValueError(f"mean must have shape ({dim},), got {mean.shape}")
    scatter, fourth, rows = np.zeros((dim, dim)), 0.0, 0
    for chunk in row_chunks(array, chunk_rows):
        centred = np.asarray(_as_float_array(chunk), dtype=np.float64) - mean
        scatter += centred.T @ centred
        fourth += float(np.square(np.einsum("ij,ij->i", centred, centred)).sum())
        rows += centred.shape[0]
    return scatter, fourth, rows


def ledoit_wolf_shrinkage(scatter: np.ndarray, fourth: float, rows: int) -> float:
    """Ledoit & Wolf's (2004) optimal weight ``a`` in ``(1 - a) S + a mu I`` (``S = scatter / rows``, ``mu`` its mean
    eigenvalue), from the moments :func:`streaming_scatter` returns; in [0, 1].

    ``a = min(b2, d2) / d2`` with ``d2 = ||S - mu I||_F^2 / dim`` (how far S is from isotropic) and
    ``b2 = (sum_k ||x_k||^4 / rows - ||S||_F^2) / (rows * dim)`` (the estimation error of S). Few rows next to the
    dimension give a large ``a``; many rows drive it to 0.
    """
    dim = scatter.shape[0]
    sample_cov = scatter / rows
    mu = float(np.trace(sample_cov)) / dim
    frobenius_sq = float(np.square(sample_cov).sum())
    d2 = (frobenius_sq - 2.0 * mu * float(np.trace(sample_cov)) + dim * mu * mu) / dim
    b2 = max(0.0, (fourth / rows - frobenius_sq) / (rows * dim))
    if d2 <= 0.0:
        return 0.0  # already isotropic: nothing to shrink towards
    return min(b2, d2) / d2


# Shrinkage intensities tried on val (with Ledoit–Wolf's own): 0 (the sample covariance) to 1 (a multiple of I).
SHRINKAGE_GRID = np.linspace(0.0, 1.0, 41)


def val_chosen_shrinkage(eigenvalues: np.ndarray, eigenvectors: np.ndarray, mean: np.ndarray, val,
                         candidates=SHRINKAGE_GRID) -> float:
    """The intensity ``a`` among ``candidates`` whose Gaussian N(mean, V diag((1 - a) e + a mu) V^T) gives the val
    rows (m, dim) the highest mean log-likelihood; e (dim,) the unshrunk covariance's eigenvalues, V (dim, dim) its
    eigenvectors as columns, mu = mean(e) (shrinkage keeps the trace). One eigendecomposition scores every candidate:
    with z the val rows in V's basis, the log-likelihood is -(sum_i z_i^2 / e'_i + log e'_i + log 2 pi) / 2. A
    candidate with a zero eigenvalue (intensity 0 with fewer rows than dimensions) scores -inf."""
    eigenvalues = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    candidates = np.asarray(candidates, dtype=np.float64)
    mu = float(eigenvalues.mean())
    shrunk = (1 - candidates)[:, None] * eigenvalues[None, :] + candidates[:, None] * mu  # (A, dim)
    z_sq = ((np.asarray(val, dtype=np.float64) - mean) @ eigenvectors) ** 2  # (m, dim)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = -0.5 * ((z_sq @ (1.0 / shrunk).T).mean(0) + np.log(shrunk).sum(1) + eigenvalues.size * np.log(2 * np.pi))
    return float(candidates[int(np.nanargmax(np.where(np.isfinite(scores), scores, -np.inf)))])
