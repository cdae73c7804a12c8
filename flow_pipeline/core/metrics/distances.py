"""Distances between a generated and a real sample that carry their own uncertainty, in train-normalised space.

* :func:`kid`: the kernel inception distance (Bińkowski et al. 2018), the unbiased MMD² with the cubic polynomial
  kernel k(x, y) = (xᵀy / d + 1)³, with a jackknife standard error and a bootstrap 95% interval. Its expectation is
  exactly 0 when both samples come from the same distribution, whatever n, so held-out real data scores 0 ± noise
  and every systematic deviation (shrunk, inflated, collapsed, shifted) scores above it.
* :func:`fd_infinity`: FD∞ (Chong & Forsyth 2020), the Fréchet distance at several n extrapolated linearly in 1/n
  to 1/n -> 0, which removes FD's 1/n bias (large when n ~ dim).
* :class:`TrainSpace`: both are computed on embeddings z-scored with the statistics of the training rows. The
  cubic kernel assumes features of order 1: on raw SONAR vectors (norm ~0.2, xᵀy/d ~ 4e-5) it degenerates to a
  difference of means (DESIGN.md section 8).

All kernel sums run over row chunks in torch, so memory is O(chunk x n), never n x n.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flow_pipeline.core.data.normalization import floor_std
from flow_pipeline.core.data.stats import streaming_mean_std

# Rows of the kernel matrix per chunk: 5 float64 blocks of (512, n) are ~100 MB at n = 5,120.
KID_CHUNK = 512
KID_BOOTSTRAP = 200
FD_INF_SIZES = 4


def _as_float64(x: np.ndarray) -> np.ndarray:
    """Validate a (n, dim) array and return it as float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"expected a non-empty (n, dim) array, got shape {x.shape}")
    return x


def subsample(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Return n rows of x (m, dim) drawn without replacement, or x itself when m <= n."""
    if x.shape[0] <= n:
        return x
    return x[np.sort(rng.choice(x.shape[0], size=n, replace=False))]



# --------------------------------------------------------------------------------------------- Fréchet distance


def _sum_sqrt_eigenvalues(sym: np.ndarray) -> float:
    """Sum of the square roots of the eigenvalues of a symmetric PSD matrix (m, m).

    Eigenvalues below the round-off level m * eps * max eigenvalue (negative ones included) count as 0: for a
    singular matrix they are pure noise, and their square roots would otherwise add up to a visible bias.
    """
    eigval = np.linalg.eigvalsh(0.5 * (sym + sym.T))  # symmetrise away round-off first
    tol = eigval.shape[0] * np.finfo(np.float64).eps * max(eigval.max(), 0.0)
    return float(np.sqrt(eigval[eigval > tol]).sum())


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr sqrt(S_a S_b) for S_a = a^T a (dim, dim), S_b = b^T b, with a (n_a, dim), b (n_b, dim).

    Neither route forms a non-symmetric matrix square root (as scipy.linalg.sqrtm would), so no imaginary parts
    arise to be discarded, and both stay exact when the covariances are singular (n < dim). Both reduce to the
    eigenvalues of a symmetric PSD matrix (LAPACK's symmetric eigensolver is far faster than its SVD):

    * Gram route, when n_a n_b min(n_a, n_b) <= dim^3: the non-zero eigenvalues of S_a S_b = a^T (a b^T b) equal
      those of (a b^T b) a^T = C C^T with C = a b^T (n_a, n_b); use the smaller of C C^T and C^T C.
    * Covariance route otherwise: with R = S_a^{1/2} (symmetric PSD, from eigh, negative round-off clipped),
      S_a S_b = R (R S_b) has the eigenvalues of (R S_b) R = R S_b R, which is symmetric PSD (also when S_a is
      singular).
    """
    n_a, dim = a.shape
    n_b = b.shape[0]
    if n_a * n_b * min(n_a, n_b) <= dim**3:
        c = a @ b.T
        return _sum_sqrt_eigenvalues(c @ c.T if n_a <= n_b else c.T @ c)
    s_a, s_b = a.T @ a, b.T @ b
    eigval, eigvec = np.linalg.eigh(s_a)
    root_a = (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T
    return _sum_sqrt_eigenvalues(root_a @ s_b @ root_a)


def _scaled_centred(x: np.ndarray) -> np.ndarray:
    """(n, dim) -> (x - mean) / sqrt(n - 1), so that its Gram a^T a is the unbiased covariance (dim, dim)."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("Fréchet distance needs at least 2 samples per set")
    return (x - x.mean(axis=0)) / np.sqrt(n - 1)


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to x (n_x, dim) and y (n_y, dim).

    FD = ||mu_x - mu_y||^2 + tr(S_x) + tr(S_y) - 2 tr sqrt(S_x S_y), with unbiased (ddof=1) covariances. Exact and
    stable for singular covariances (n < dim); see :func:`_trace_sqrt_product`. Clipped at 0 against round-off.
    Note: FD is biased upwards at small n (two finite real samples give FD > 0); compare against a floor at the
    same n, as :func:`evaluate_samples` does.
    """
    x, y = _as_float64(x), _as_float64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    a, b = _scaled_centred(x), _scaled_centred(y)
    mean_term = float(np.sum((x.mean(axis=0) - y.mean(axis=0)) ** 2))
    trace_term = float(np.sum(a * a) + np.sum(b * b)) - 2.0 * _trace_sqrt_product(a, b)
    return max(mean_term + trace_term, 0.0)


@dataclass(frozen=True)
class TrainSpace:
    """Per-dimension z-scoring with the training rows' mean and (floored) std: the space the distances use."""

    mean: np.ndarray  # (dim,) float64
    std: np.ndarray  # (dim,) float64, floored as the training normaliser floors it

    @classmethod
    def fit(cls, train) -> "TrainSpace":
        """Statistics of train (n_train, dim), streamed in chunks (it may be a memory-mapped split)."""
        mean, std, _ = streaming_mean_std(train)
        return cls(mean=mean, std=floor_std(std))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, dim) raw rows -> (n, dim) float64 z-scores."""
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std


def _cubic_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(a_i, b_j) = (a_i . b_j / d + 1)^3 for a (c, d), b (m, d): (c, m) float64.

    The inner products are a float32 matrix product (half the time of float64 on these CPUs), the rest float64. On
    z-scored rows a product's error is ~1e-7 of |a||b| / d ~ 1e-7 of a kernel value, with no preferred sign: over
    the m² terms of KID it averages to ~1e-10 absolute, against KIDs of 1e-4 and more."""
    return ((a.float() @ b.float().T).double() / a.shape[1] + 1.0) ** 3


def kid(x: np.ndarray, y: np.ndarray, n_bootstrap: int = KID_BOOTSTRAP, seed: int = 0,
        chunk: int = KID_CHUNK, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _cubic_kernel,
        ) -> dict[str, float]:
    """Unbiased MMD² between x (n_x, d) and y (n_y, d) with the cubic kernel, its standard error and a 95% CI.

    ``kernel(a (c, d), b (m, d)) -> (c, m) float64`` replaces the cubic kernel (e.g. the Gaussian RBF kernel of
    :func:`flow_pipeline.core.metrics.rbf_kid.rbf_kid`); everything else stays as described here.

    The two sets are paired row by row (the first m = min(n_x, n_y) rows of each; pass random subsamples), and
    with h(i, j) = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i) the estimate is the U-statistic
    KID = sum_{i != j} h(i, j) / (m (m - 1)), unbiased for MMD².

    * ``kid_se``: jackknife standard error over the m pairs; leave-one-out estimates come from the row sums of h
      (U_{-i} = (S - 2 R_i) / ((m - 1)(m - 2))), so it costs nothing beyond the estimate. The jackknife variance of a
      U-statistic is conservative (Efron–Stein), also near 0 where the statistic is degenerate.
    * ``kid_ci_low``/``kid_ci_high``: percentile interval of ``n_bootstrap`` bootstrap replicates, each the
      multinomially weighted U-statistic over distinct original pairs, w^T H w / ((sum w)^2 - sum w^2), so that a
      row drawn twice is never paired with itself.

    Cost: 4 m² d multiply-adds for the kernel blocks plus n_bootstrap m² for the replicates, O(chunk m) memory.
    """
    m = min(x.shape[0], y.shape[0])
    if m < 4:
        raise ValueError(f"KID needs at least 4 rows in each set, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    tx = torch.from_numpy(np.ascontiguousarray(x[:m], dtype=np.float64))
    ty = torch.from_numpy(np.ascontiguousarray(y[:m], dtype=np.float64))
    weights = torch.from_numpy(np.random.default_rng(seed).multinomial(m, np.full(m, 1.0 / m), size=n_bootstrap)
                               .astype(np.float64))  # (B, m)
    row_sums, quadratic = torch.empty(m, dtype=torch.float64), torch.zeros(n_bootstrap, dtype=torch.float64)
    for start in range(0, m, chunk):
        rows = slice(start, min(start + chunk, m))
        h = kernel(tx[rows], tx) + kernel(ty[rows], ty) - kernel(tx[rows], ty) - kernel(ty[rows], tx)  # (c, m)
        local = torch.arange(h.shape[0])
        h[local, local + start] = 0.0  # i == j is not a pair of the U-statistic
        row_sums[rows] = h.sum(dim=1)
        quadratic += ((weights[:, rows] @ h) * weights).sum(dim=1)
    total = float(row_sums.sum())
    estimate = total / (m * (m - 1))
    leave_one_out = (total - 2.0 * row_sums.numpy()) / ((m - 1) * (m - 2))
    se = float(np.sqrt((m - 1) / m * np.sum((leave_one_out - leave_one_out.mean()) ** 2)))
    pair_weight = weights.sum(dim=1) ** 2 - (weights**2).sum(dim=1)
    replicates = (quadratic / pair_weight).numpy()
    low, high = np.quantile(replicates, [0.025, 0.975])
    return {"kid": estimate, "kid_se": se, "kid_ci_low": float(low), "kid_ci_high": float(high)}


def fd_infinity(x: np.ndarray, y: np.ndarray, n_sizes: int = FD_INF_SIZES, seed: int = 0) -> dict[str, float]:
    """FD∞ of x (n_x, d) against y (n_y, d): FD at ``n_sizes`` sample sizes evenly spaced in [m/2, m]
    (m = min(n_x, n_y), each a seeded subsample of both sets), a least-squares line FD(n) = FD∞ + slope / n, and its
    value at 1/n -> 0 (Chong & Forsyth 2020). Returns fd_inf and fd_inf_slope (the 1/n bias coefficient).

    FD∞ is an extrapolation, not a bounded quantity: with noise it can fall slightly below 0 for two samples of the
    same distribution; it is reported as fitted.
    """
    m = min(x.shape[0], y.shape[0])
    if m < 8 or n_sizes < 2:
        raise ValueError(f"FD∞ needs at least 8 rows per set and 2 sizes, got m={m}, n_sizes={n_sizes}")
    sizes = np.unique(np.linspace(m // 2, m, n_sizes).astype(int))
    rng = np.random.default_rng(seed)
    values = [frechet_distance(subsample(x, int(n), rng), subsample(y, int(n), rng)) for n in sizes]
    slope, intercept = np.polyfit(1.0 / sizes, values, deg=1)
    return {"fd_inf": float(intercept), "fd_inf_slope": float(slope)}


def dispersion(generated: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """How spread out generated (n, d) is relative to real (m, d), both directions: variance_ratio =
    tr S_gen / tr S_real (1: same total variance; < 1 shrunk or collapsed, > 1 inflated) and norm_ratio = mean row
    norm of generated / of real."""
    generated, real = np.asarray(generated, dtype=np.float64), np.asarray(real, dtype=np.float64)
    total_variance = lambda a: float(np.sum(a.var(axis=0, ddof=1)))  # noqa: E731
    mean_norm = lambda a: float(np.linalg.norm(a, axis=1).mean())  # noqa: E731
    return {"variance_ratio": total_variance(generated) / total_variance(real),
            "norm_ratio": mean_norm(generated) / mean_norm(real)}
