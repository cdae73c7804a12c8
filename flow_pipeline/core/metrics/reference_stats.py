"""The real-set halves of FD and KID, computed once per held-out set and reused for every sample set scored
against it (the model's samples under each sampler, the held-out real rows, the Gaussian baselines).

* :class:`FrechetReference`: the real set's mean, covariance trace and covariance square root R (one ``eigh``;
  a set of at most dim rows keeps its centred rows instead, for the Gram route when the sample set is small too).
  FD against a sample set then needs only that set's covariance S and the eigenvalues of the symmetric PSD matrix
  R S R (``eigvalsh``): tr sqrt(S_real S) = sum sqrt(eig(R S R)), because S_real S = R (R S) has the eigenvalues
  of (R S) R.
* :class:`KidReference`: the real set's kernel block K_yy reduced to what the KID estimate, its jackknife and its
  bootstrap need (row sums and one quadratic form per replicate). Since K_yx = K_xyᵀ, a sample set then costs two
  kernel blocks (K_xx, K_xy) instead of four.

Both give the same numbers as :func:`flow_pipeline.core.metrics.distances.frechet_distance` and
:func:`flow_pipeline.core.metrics.distances.kid` up to floating-point round-off (the tests hold them to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flow_pipeline.core.metrics.distances import (
    KID_BOOTSTRAP,
    KID_CHUNK,
    _as_float64,
    _cubic_kernel,
    _scaled_centred,
    _sum_sqrt_eigenvalues,
    _trace_sqrt_product,
)


@dataclass
class FrechetReference:
    """Gaussian statistics of a real set of m rows: mean (dim,), trace of its unbiased covariance, and either the
    centred rows (m, dim) when m <= dim (FD then takes the Gram route, whose eigenproblem is at most m x m) or,
    computed on first use, the covariance's symmetric PSD square root (dim, dim), negative round-off clipped."""

    mean: np.ndarray
    trace: float
    centred: np.ndarray | None
    _root: np.ndarray | None = None

    @classmethod
    def fit(cls, real: np.ndarray) -> "FrechetReference":
        """Statistics of real (m, dim), m >= 2."""
        real = _as_float64(real)
        centred = _scaled_centred(real)
        reference = cls(mean=real.mean(axis=0), trace=float(np.sum(centred * centred)), centred=centred)
        if centred.shape[0] > centred.shape[1]:
            reference._root = _covariance_root(centred)
            reference.centred = None  # (m, dim) rows no longer needed: memory stays (dim, dim)
        return reference

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The statistics as named arrays (``prefix.mean``, ``prefix.trace``, ``prefix.centred`` or ``prefix.root``),
        for :meth:`from_arrays`."""
        arrays = {f"{prefix}.mean": self.mean, f"{prefix}.trace": np.array(self.trace)}
        if self.centred is not None:
            arrays[f"{prefix}.centred"] = self.centred
        if self._root is not None:
            arrays[f"{prefix}.root"] = self._root
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> "FrechetReference":
        """The reference :meth:`to_arrays` gave ``arrays`` under ``prefix``."""
        return cls(mean=arrays[f"{prefix}.mean"], trace=float(arrays[f"{prefix}.trace"]),
                   centred=arrays.get(f"{prefix}.centred"), _root=arrays.get(f"{prefix}.root"))

    @property
    def root(self) -> np.ndarray:
        """The covariance's square root (dim, dim)."""
        if self._root is None:
            self._root = _covariance_root(self.centred)
        return self._root

    def distance(self, x: np.ndarray) -> float:
        """FD between Gaussians fitted to x (n, dim) and to the real set (see
        :func:`~flow_pipeline.core.metrics.distances.frechet_distance`), clipped at 0 against round-off."""
        x = _as_float64(x)
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"dimension mismatch: {x.shape[1]} vs {self.mean.shape[0]}")
        centred = _scaled_centred(x)
        if self.centred is not None and centred.shape[0] <= centred.shape[1]:
            cross = _trace_sqrt_product(centred, self.centred)  # both sets small: the Gram route
        else:
            cross = _sum_sqrt_eigenvalues(self.root @ (centred.T @ centred) @ self.root)
        mean_term = float(np.sum((x.mean(axis=0) - self.mean) ** 2))
        return max(mean_term + float(np.sum(centred * centred)) + self.trace - 2.0 * cross, 0.0)


def _covariance_root(centred: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root of centredᵀ centred (dim, dim), from eigh, negative round-off clipped to 0."""
    eigval, eigvec = np.linalg.eigh(centred.T @ centred)
    return (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T


def _row_blocks(m: int, chunk: int):
    for start in range(0, m, chunk):
        rows = slice(start, min(start + chunk, m))
        yield rows, torch.arange(rows.stop - start), torch.arange(start, rows.stop)


@dataclass(frozen=True)
class KidReference:
    """The real set's side of :func:`~flow_pipeline.core.metrics.distances.kid` for m paired rows.

    real (m, d) float64; weights (B, m): the bootstrap's multinomial counts (seeded, the same as ``kid`` draws);
    row_sums (m,): row sums of K_yy without its diagonal; quadratic (B,): wᵀ K_yy w without the diagonal, per
    replicate. Memory: the real rows and (B, m) weights; the kernel block is never held whole.
    """

    real: torch.Tensor
    weights: torch.Tensor
    row_sums: torch.Tensor
    quadratic: torch.Tensor
    chunk: int

    @classmethod
    def fit(cls, real: np.ndarray, n_bootstrap: int = KID_BOOTSTRAP, seed: int = 0,
            chunk: int = KID_CHUNK) -> "KidReference":
        """Reduce K_yy of real (m, d), m >= 4, in ``chunk``-row blocks."""
        real = _as_float64(real)
        m = real.shape[0]
        if m < 4:
            raise ValueError(f"KID needs at least 4 rows in each set, got {m}")
        y = torch.from_numpy(np.ascontiguousarray(real))
        weights = _bootstrap_weights(m, n_bootstrap, seed)
        row_sums, quadratic = torch.empty(m, dtype=torch.float64), torch.zeros(n_bootstrap, dtype=torch.float64)
        for rows, local, diagonal in _row_blocks(m, chunk):
            block = _cubic_kernel(y[rows], y)
            block[local, diagonal] = 0.0  # i == j is not a pair of the U-statistic
            row_sums[rows] = block.sum(dim=1)
            quadratic += ((weights[:, rows] @ block) * weights).sum(dim=1)
        return cls(real=y, weights=weights, row_sums=row_sums, quadratic=quadratic, chunk=chunk)

    @classmethod
    def from_reduced(cls, real: np.ndarray, row_sums: np.ndarray, quadratic: np.ndarray, seed: int = 0,
                     chunk: int = KID_CHUNK) -> "KidReference":
        """The reference :meth:`fit` gives for real (m, d) and ``seed``, from the ``row_sums`` (m,) and ``quadratic``
        (B,) an earlier fit computed (K_yy is the costly part; the weights are redrawn from the seed)."""
        real = _as_float64(real)
        if row_sums.shape != (real.shape[0],):
            raise ValueError(f"row_sums has shape {row_sums.shape}; {real.shape[0]} real rows need ({real.shape[0]},)")
        return cls(real=torch.from_numpy(np.ascontiguousarray(real)),
                   weights=_bootstrap_weights(real.shape[0], quadratic.shape[0], seed),
                   row_sums=torch.as_tensor(row_sums, dtype=torch.float64),
                   quadratic=torch.as_tensor(quadratic, dtype=torch.float64), chunk=chunk)

    def kid(self, x: np.ndarray) -> dict[str, float]:
        """``kid(x, real)`` for x (n, d) with n >= m rows (its first m rows are paired with the real ones):
        kid, kid_se, kid_ci_low, kid_ci_high as :func:`~flow_pipeline.core.metrics.distances.kid` defines them.

        With the diagonal left out, h = K_xx + K_yy - K_xy - K_xyᵀ has row sums rowsum(K_xx) + rowsum(K_yy) -
        rowsum(K_xy) - colsum(K_xy), and wᵀ h w = wᵀ (K_xx - 2 K_xy) w + wᵀ K_yy w.
        """
        m, d = self.real.shape
        if x.shape[0] < m or x.shape[1] != d:
            raise ValueError(f"KID reference of {m} rows of dim {d} needs at least that many rows of that dim, "
                             f"got shape {x.shape}")
        tx = torch.from_numpy(np.ascontiguousarray(x[:m], dtype=np.float64))
        row_sums, column_sums = self.row_sums.clone(), torch.zeros(m, dtype=torch.float64)
        quadratic = self.quadratic.clone()
        for rows, local, diagonal in _row_blocks(m, self.chunk):
            k_xx, k_xy = _cubic_kernel(tx[rows], tx), _cubic_kernel(tx[rows], self.real)
            k_xx[local, diagonal] = 0.0
            k_xy[local, diagonal] = 0.0
            column_sums += k_xy.sum(dim=0)
            block = k_xx.sub_(k_xy, alpha=2.0)  # K_xx - 2 K_xy: row sums get K_xy back below
            row_sums[rows] += block.sum(dim=1) + k_xy.sum(dim=1)
            quadratic += ((self.weights[:, rows] @ block) * self.weights).sum(dim=1)
        row_sums -= column_sums
        return _kid_summary(row_sums, quadratic, self.weights)


def _bootstrap_weights(m: int, n_bootstrap: int, seed: int) -> torch.Tensor:
    """The bootstrap's multinomial counts (n_bootstrap, m) float64, as ``kid`` draws them for ``seed``."""
    counts = np.random.default_rng(seed).multinomial(m, np.full(m, 1.0 / m), size=n_bootstrap)
    return torch.from_numpy(counts.astype(np.float64))


def _kid_summary(row_sums: torch.Tensor, quadratic: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """Estimate, jackknife se and bootstrap percentile interval from the row sums (m,) of h and the replicates'
    quadratic forms (B,) (see :func:`~flow_pipeline.core.metrics.distances.kid`)."""
    m = row_sums.shape[0]
    total = float(row_sums.sum())
    estimate = total / (m * (m - 1))
    leave_one_out = (total - 2.0 * row_sums.numpy()) / ((m - 1) * (m - 2))
    se = float(np.sqrt((m - 1) / m * np.sum((leave_one_out - leave_one_out.mean()) ** 2)))
    pair_weight = weights.sum(dim=1) ** 2 - (weights**2).sum(dim=1)
    low, high = np.quantile((quadratic / pair_weight).numpy(), [0.025, 0.975])
    return {"kid": estimate, "kid_se": se, "kid_ci_low": float(low), "kid_ci_high": float(high)}
