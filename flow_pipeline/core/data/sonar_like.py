"""A seeded generator of vectors whose statistics match real SONAR text embeddings (near-Gaussian: a low-rank
mixture with a per-row gain). Fast; used by tests and benchmarks. The pipeline's built-in source is the calibrated
mixture of :mod:`flow_pipeline.core.data.synthetic`.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

# The first two are targets measured on real SONAR text embeddings (1024-d, unnormalised), stated per dimension so
# other ``dim`` values keep the same per-dimension scale; the rest were fitted so that the eigen-spectrum,
# per-dimension std spread and norm spread match the real file (see synthetic_sonar_like).
# Synthetic generator. The first two are targets measured on real SONAR text embeddings (1024-d, unnormalised),
# stated per dimension so other ``dim`` values keep the same per-dimension scale; the rest were fitted so that the
# eigen-spectrum, per-dimension std spread and norm spread match the real file (see synthetic_sonar_like).
_TOTAL_VARIANCE_PER_DIM = 2.84e-5  # trace(cov) / dim; median per-dimension std is then ~0.0053
_MEAN_SQ_NORM_PER_DIM = 0.113**2 / 1024  # ||E[x]||^2 / dim
_LATENT_RANK_FRACTION = 0.375  # 384 latent directions at dim 1024
_SPECTRUM_EXPONENT = 1.05  # latent variances lambda_i ~ (i + offset)^-exponent
_SPECTRUM_OFFSET = 4.0
_NOISE_FRACTION = 0.02  # share of the variance in the isotropic floor (the real spectrum's long tail)
_BETWEEN_CLUSTER_FRACTION = 0.15  # share of the latent variance that separates cluster centres
_ROW_GAIN_STD = 0.048  # per-row gain; widens the norm distribution as real sentence norms vary
_NEAR_CONSTANT_STDS = (2e-5, 2e-4)  # the real vectors have two dimensions with std ~1.8e-5 and ~2.2e-4


def synthetic_sonar_like(n: int, dim: int = 1024, seed: int = 0, n_clusters: int = 32) -> np.ndarray:
    """Draw ``n`` seeded vectors that look like real SONAR sentence embeddings; returns (n, dim) float32.

    Construction (all randomness from ``np.random.default_rng(seed)``, so a seed fixes the output):

    1. Two dimensions (for ``dim >= 8``) are near-constant: the mean plus noise with std 2e-5 and 2e-4, as in the real
       vectors (1.8e-5 and 2.2e-4). The other ``dim - 2`` "free" dimensions carry the structure.
    2. A low-rank latent space of ``r = 0.375 * dim`` directions (384 at 1024) with variances
       ``lambda_i ~ (i + 4)^-1.05``, embedded by a random orthonormal basis (r, free dims). This power law, fitted to
       the real eigen-spectrum, gives a covariance participation ratio of ~67 (~62 when estimated from 800 rows, as
       on the real file) and spreads the variance evenly over dimensions (per-dimension std 0.0053, 5-95% range
       0.0046-0.0061 as in the real vectors).
    3. A Gaussian mixture in that latent space: ``n_clusters`` centres that carry 15% of each latent direction's
       variance (centred and rescaled per direction, so the covariance stays on target whatever the seed), rows
       assigned uniformly at random, within-cluster Gaussian noise for the other 85%.
    4. An isotropic noise floor over the free dimensions with 2% of the variance: the long tail of the real spectrum.
    5. A mean vector in a random direction with norm 0.113 * sqrt(dim / 1024).
    6. A per-row gain ``1 + 0.048 * N(0, 1)`` on the free dimensions: widens the norm distribution to the real
       0.204 +- 0.016 (the Gaussian alone gives +- 0.013) and puts extra variance along the mean, as real data has.

    The variance is budgeted so that ``trace(cov) = 2.84e-5 * dim`` after the gain (median per-dimension std 0.0053).
    Cost: one (n, r) x (r, dim) float32 matrix product and (n, dim) normal draws, ~0.4 s for 14,000 x 1024 on an idle
    2-core CPU.
    """
    _check_generator_args(n, dim, n_clusters)
    rng = np.random.default_rng(seed)
    n_const = len(_NEAR_CONSTANT_STDS) if dim >= 8 else 0
    const_dims = np.sort(rng.choice(dim, size=n_const, replace=False))
    free_dims = np.setdiff1d(np.arange(dim), const_dims)
    rank = max(1, min(len(free_dims), round(_LATENT_RANK_FRACTION * dim)))

    mean = _random_direction(rng, dim) * math.sqrt(_MEAN_SQ_NORM_PER_DIM * dim)
    structured_var = _structured_variance(dim, float(mean[free_dims] @ mean[free_dims]))
    latent_var = _power_law_spectrum(rank) * (1.0 - _NOISE_FRACTION) * structured_var
    noise_std = math.sqrt(_NOISE_FRACTION * structured_var / len(free_dims))

    basis = np.zeros((rank, dim), dtype=np.float32)
    basis[:, free_dims] = _random_orthonormal_rows(rng, rank, len(free_dims))
    latent = _mixture_latents(rng, n, latent_var, n_clusters)

    x = latent @ basis  # (n, dim); the near-constant columns of `basis` are zero
    x += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(noise_std)
    x += mean.astype(np.float32)
    x *= 1.0 + _ROW_GAIN_STD * rng.standard_normal((n, 1), dtype=np.float32)
    const_noise = rng.standard_normal((n, n_const)) * np.asarray(_NEAR_CONSTANT_STDS[:n_const])
    x[:, const_dims] = (mean[const_dims] + const_noise).astype(np.float32)
    return x


def _check_generator_args(n: int, dim: int, n_clusters: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")


def _structured_variance(dim: int, mean_free_sq_norm: float) -> float:
    """trace(cov) of the latent + noise part such that the total after the row gain is on target.

    With gain ``g = 1 + s * eps``: sum over free dims of Var[g * (mu + y)] = (1 + s^2) trace(cov_y) + s^2 ||mu_free||^2.
    """
    gain_var = _ROW_GAIN_STD**2
    return (_TOTAL_VARIANCE_PER_DIM * dim - gain_var * mean_free_sq_norm) / (1.0 + gain_var)


def _power_law_spectrum(rank: int) -> np.ndarray:
    """(rank,) float64 variances proportional to (i + offset)^-exponent, summing to 1."""
    lam = (np.arange(rank) + _SPECTRUM_OFFSET) ** -_SPECTRUM_EXPONENT
    return lam / lam.sum()


def _random_direction(rng: np.random.Generator, dim: int) -> np.ndarray:
    """(dim,) float64 unit vector, uniform on the sphere."""
    v = rng.standard_normal(dim)
    return v / np.linalg.norm(v)


def _random_orthonormal_rows(rng: np.random.Generator, rank: int, width: int) -> np.ndarray:
    """(rank, width) float32 with orthonormal rows, Haar-distributed; rank <= width.

    Cholesky QR of a Gaussian matrix ``a = q r`` with ``r = cholesky(a^T a)^T``: three BLAS-3 calls instead of LAPACK's
    Householder QR, whose many thread synchronisations cost seconds on a busy machine. A Gaussian ``a`` with
    rank/width <= 0.375 has condition number ~4, so ``q`` is orthonormal to ~1e-14; ``r`` has a positive diagonal, which
    makes ``q`` exactly Haar-distributed.
    """
    a = rng.standard_normal((width, rank))
    lower = np.linalg.cholesky(a.T @ a)
    q_t = scipy.linalg.solve_triangular(lower, a.T, lower=True)  # (rank, width) = (a r^-1)^T
    return q_t.astype(np.float32)


def _mixture_latents(rng: np.random.Generator, n: int, latent_var: np.ndarray, n_clusters: int) -> np.ndarray:
    """(n, rank) float32 draws of a Gaussian mixture whose covariance per latent direction is ``latent_var``.

    Cluster centres are centred and rescaled per direction, so the between-cluster variance is exactly
    ``_BETWEEN_CLUSTER_FRACTION * latent_var`` over the centres, whatever the seed.
    """
    between = _BETWEEN_CLUSTER_FRACTION if n_clusters > 1 else 0.0
    centres = np.zeros((n_clusters, latent_var.size))
    if n_clusters > 1:
        raw = rng.standard_normal((n_clusters, latent_var.size))
        raw -= raw.mean(axis=0)
        centres = raw / raw.std(axis=0) * np.sqrt(between * latent_var)
    labels = rng.integers(n_clusters, size=n)
    within_std = np.sqrt((1.0 - between) * latent_var).astype(np.float32)
    z = rng.standard_normal((n, latent_var.size), dtype=np.float32) * within_std
    z += centres.astype(np.float32)[labels]
    return z
