"""Closed-form baselines every model must beat: Gaussians fitted to the training rows a run used.

* ``gaussian-full``: mean and Ledoit–Wolf-shrunk covariance (shrinkage towards a multiple of the identity, with the
  intensity of Ledoit & Wolf 2004, so the covariance is well conditioned also when rows < dim).
* ``gaussian-diag``: mean and per-dimension variances only.

Both are fitted in raw embedding space with two streamed passes over the rows (a memory-mapped split is never
loaded whole) and sampled with a seed, so they are scored exactly like a model's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flow_pipeline.core.stats import DEFAULT_CHUNK_ROWS, row_chunks, streaming_mean_std

BASELINES = ("gaussian-full", "gaussian-diag")


@dataclass(frozen=True)
class LedoitWolf:
    """mean (dim,), the shrunk covariance (dim, dim) = (1 - shrinkage) S + shrinkage (tr S / dim) I, with S the
    maximum-likelihood (1/n) covariance, and the shrinkage intensity in [0, 1]."""

    mean: np.ndarray
    covariance: np.ndarray
    shrinkage: float


def ledoit_wolf(x, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> LedoitWolf:
    """Ledoit–Wolf shrinkage of the covariance of x (n, dim), streamed over row chunks.

    With centred rows x_k, S = (1/n) sum_k x_k x_k^T, mu = tr S / dim, delta² = ||S - mu I||_F², and
    beta² = min(delta², (1/n²) sum_k ||x_k x_k^T - S||_F²), the intensity is beta² / delta² (Ledoit & Wolf 2004,
    Lemma 3.2–3.4). The sum over k needs no dim x dim matrix per row: ||x_k x_k^T - S||_F² = ||x_k||⁴ -
    2 x_k^T S x_k + ||S||_F², and sum_k x_k^T S x_k = n ||S||_F², so it equals sum_k ||x_k||⁴ - n ||S||_F².
    """
    mean, _, n = streaming_mean_std(x, chunk_rows)
    dim = mean.shape[0]
    scatter, fourth = np.zeros((dim, dim)), 0.0
    for chunk in row_chunks(x, chunk_rows):
        centred = np.asarray(chunk, dtype=np.float64) - mean
        scatter += centred.T @ centred
        fourth += float(np.sum(np.sum(centred**2, axis=1) ** 2))
    sample_cov = scatter / n
    mu = float(np.trace(sample_cov)) / dim
    frob_sq = float(np.sum(sample_cov**2))
    delta_sq = frob_sq - 2.0 * mu * float(np.trace(sample_cov)) + mu**2 * dim  # ||S - mu I||_F²
    beta_sq = min(delta_sq, (fourth - n * frob_sq) / n**2)
    shrinkage = 0.0 if delta_sq <= 0.0 else max(0.0, beta_sq / delta_sq)
    covariance = (1.0 - shrinkage) * sample_cov
    covariance[np.diag_indices(dim)] += shrinkage * mu
    return LedoitWolf(mean=mean, covariance=covariance, shrinkage=shrinkage)


@dataclass(frozen=True)
class GaussianBaseline:
    """A fitted Gaussian: rows are mean + z @ factor^T with z ~ N(0, I), factor (dim, dim) or a (dim,) std."""

    name: str
    mean: np.ndarray
    factor: np.ndarray
    shrinkage: float | None = None  # Ledoit–Wolf intensity of gaussian-full

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n rows (n, dim) float32, from ``np.random.default_rng(seed)``."""
        z = np.random.default_rng(seed).standard_normal((n, self.mean.shape[0]))
        spread = z * self.factor if self.factor.ndim == 1 else z @ self.factor.T
        return (self.mean + spread).astype(np.float32)


def fit_baseline(name: str, train) -> GaussianBaseline:
    """Fit ``gaussian-full`` or ``gaussian-diag`` to train (n, dim) (may be memory-mapped)."""
    if name == "gaussian-full":
        fit = ledoit_wolf(train)
        eigval, eigvec = np.linalg.eigh(fit.covariance)
        factor = eigvec * np.sqrt(np.clip(eigval, 0.0, None))  # factor factor^T = covariance
        return GaussianBaseline(name, fit.mean, factor, fit.shrinkage)
    if name == "gaussian-diag":
        mean, std, _ = streaming_mean_std(train)
        return GaussianBaseline(name, mean, std)
    raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")
