"""Closed-form baselines every model must beat: Gaussians fitted to the training rows a run used.

* ``gaussian-full``: mean and shrunk covariance (shrinkage towards a multiple of the identity, so the covariance is
  well conditioned also when rows < dim), with the intensity of Ledoit & Wolf 2004, or, when held-out val rows are
  given, the intensity their likelihood prefers (the access to val a model's guidance fit has).
* ``gaussian-diag``: mean and per-dimension variances only.

Both are fitted in raw embedding space with two streamed passes over the rows (a memory-mapped split is never
loaded whole) and sampled with a seed, so they are scored exactly like a model's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flow_pipeline.core.data.stats import (DEFAULT_CHUNK_ROWS, SHRINKAGE_GRID, ledoit_wolf_shrinkage,
                                           streaming_mean_std, streaming_scatter, val_chosen_shrinkage)

BASELINES = ("gaussian-full", "gaussian-diag")


@dataclass(frozen=True)
class LedoitWolf:
    """mean (dim,), the shrunk covariance (dim, dim) = (1 - shrinkage) S + shrinkage (tr S / dim) I, with S the
    maximum-likelihood (1/n) covariance, and the shrinkage intensity in [0, 1]."""

    mean: np.ndarray
    covariance: np.ndarray
    shrinkage: float


def ledoit_wolf(x, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> LedoitWolf:
    """Ledoit–Wolf shrinkage of the covariance of x (n, dim), streamed over row chunks (two passes: mean, then
    scatter and fourth moment), with the intensity of :func:`flow_pipeline.core.data.stats.ledoit_wolf_shrinkage`
    (Ledoit & Wolf 2004, Lemmas 3.2–3.4) — the same estimate the whitening normaliser uses for its eigenvalues."""
    mean, _, _ = streaming_mean_std(x, chunk_rows)
    scatter, fourth, n = streaming_scatter(x, mean, chunk_rows)
    sample_cov = scatter / n
    shrinkage = ledoit_wolf_shrinkage(scatter, fourth, n)
    covariance = (1.0 - shrinkage) * sample_cov
    covariance[np.diag_indices(mean.shape[0])] += shrinkage * float(np.trace(sample_cov)) / mean.shape[0]
    return LedoitWolf(mean=mean, covariance=covariance, shrinkage=shrinkage)


@dataclass(frozen=True)
class GaussianBaseline:
    """A fitted Gaussian: rows are mean + z @ factor^T with z ~ N(0, I), factor (dim, dim) or a (dim,) std."""

    name: str
    mean: np.ndarray
    factor: np.ndarray
    shrinkage: float | None = None  # gaussian-full's shrinkage intensity (Ledoit–Wolf's, or chosen on val)
    chosen_on_val: bool = False  # the shrinkage was chosen by the val rows' likelihood

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n rows (n, dim) float32, from ``np.random.default_rng(seed)``."""
        z = np.random.default_rng(seed).standard_normal((n, self.mean.shape[0]))
        spread = z * self.factor if self.factor.ndim == 1 else z @ self.factor.T
        return (self.mean + spread).astype(np.float32)

    def log_prob(self, x) -> np.ndarray:
        """Exact log-density (n,) float64 in nats of rows x (n, dim): with z = factor^-1 (x - mean),
        log N(x) = -(|z|^2 + dim log 2 pi) / 2 - log |det factor| (covariance = factor factor^T). Raises ValueError
        for rows of another dim or a singular factor (a zero variance: the density is not defined)."""
        x = np.asarray(x, dtype=np.float64)
        dim = self.mean.shape[0]
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"{self.name}.log_prob: x must be (n, {dim}), got shape {x.shape}")
        singular = ValueError(f"{self.name}.log_prob: the covariance is singular, so the density is not defined")
        if self.factor.ndim == 1:
            if not np.all(self.factor > 0):
                raise singular
            z, log_det = (x - self.mean) / self.factor, float(np.log(self.factor).sum())
        else:
            sign, log_det = np.linalg.slogdet(self.factor)
            if sign == 0 or not np.isfinite(log_det):
                raise singular
            z = np.linalg.solve(self.factor, (x - self.mean).T).T
        return -0.5 * (np.einsum("ij,ij->i", z, z) + dim * np.log(2 * np.pi)) - log_det


def val_shrinkage(train_fit: LedoitWolf, val, grid=SHRINKAGE_GRID) -> float:
    """The shrinkage intensity whose Gaussian gives the val rows (m, dim) the highest mean log-likelihood, among
    ``grid`` and Ledoit–Wolf's own (:func:`~flow_pipeline.core.data.stats.val_chosen_shrinkage` on the spectrum of
    the sample covariance S under the fit)."""
    a = train_fit.shrinkage
    dim = train_fit.mean.shape[0]
    # Undo Ledoit–Wolf's shrinkage to get S's spectrum: its covariance is (1 - a) S + a mu I.
    lw_eigval, eigvec = np.linalg.eigh(train_fit.covariance)
    mu = float(np.trace(train_fit.covariance)) / dim  # the shrinkage keeps the trace
    sample_eigval = np.clip((lw_eigval - a * mu) / max(1.0 - a, 1e-12), 0.0, None)
    return val_chosen_shrinkage(sample_eigval, eigvec, train_fit.mean, val, np.unique(np.append(grid, a)))


def fit_baseline(name: str, train, val=None) -> GaussianBaseline:
    """Fit ``gaussian-full`` or ``gaussian-diag`` to train (n, dim) (may be memory-mapped). With held-out ``val``
    rows (m, dim), gaussian-full's shrinkage intensity is chosen by their likelihood (:func:`val_shrinkage`), the
    same access to val a model has when its guidance is fitted there; without, it is Ledoit–Wolf's."""
    if name == "gaussian-full":
        fit = ledoit_wolf(train)
        # Ledoit–Wolf at intensity 1 keeps only the trace: nothing left to choose from.
        chosen_on_val = val is not None and len(val) > 0 and fit.shrinkage < 1.0 - 1e-9
        if chosen_on_val:
            fit = _reshrunk(fit, val_shrinkage(fit, val))
        eigval, eigvec = np.linalg.eigh(fit.covariance)
        factor = eigvec * np.sqrt(np.clip(eigval, 0.0, None))  # factor factor^T = covariance
        return GaussianBaseline(name, fit.mean, factor, fit.shrinkage, chosen_on_val)
    if name == "gaussian-diag":
        mean, std, _ = streaming_mean_std(train)
        return GaussianBaseline(name, mean, std)
    raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")


def _reshrunk(fit: LedoitWolf, shrinkage: float) -> LedoitWolf:
    """The same sample covariance shrunk with another intensity."""
    dim = fit.mean.shape[0]
    mu = float(np.trace(fit.covariance)) / dim
    sample = (fit.covariance - fit.shrinkage * mu * np.eye(dim)) / max(1.0 - fit.shrinkage, 1e-12)
    covariance = (1.0 - shrinkage) * sample
    covariance[np.diag_indices(dim)] += shrinkage * mu
    return LedoitWolf(mean=fit.mean, covariance=covariance, shrinkage=shrinkage)
