"""``gaussian-mixture``: a reference stronger than the Gaussians, a Gaussian mixture fitted by EM on the training rows.

It is ``gaussian-full`` (:mod:`flow_pipeline.core.baselines`, shrinkage chosen on val) whose leading principal
coordinates follow a mixture instead of one Gaussian. With gaussian-full's mean m and covariance
V diag(e) V^T (eigenvalues decreasing), the whitened coordinates are z = V^T (x - m) / sqrt(e) and

    log p(x) = log sum_k w_k N(z_1..r; mu_k, diag s_k^2) + log N(z_r+1..dim; 0, I) - sum_i log sqrt(e_i)

(the last sum is the whitening's Jacobian, so the density is in raw space). EM is scikit-learn's
``GaussianMixture`` with diagonal covariances on z_1..r, started from k-means++ groups (:func:`_initial_mixture`).

- Whitened, not raw: raw SONAR dimensions differ in variance by orders of magnitude (two are near-constant), so EM's
  fixed variance floor (``reg_covar``) would swamp some and vanish beside others; in z every direction has training
  variance ~1 and the floor is the same small fraction of each.
- Diagonal: a full covariance per component costs K (n, dim, dim) products and K Cholesky factorisations of a
  (dim, dim) matrix per EM step, far beyond minutes on 2 cores at dim 1,024 and K in the tens; ``tied`` (one shared
  covariance, components differ in their means) gained under 1 nat per val row over gaussian-full on the built-in data
  (K = 2, 4) at 100-160 s per fit, while ``diag`` gains tens of nats.
- Leading r coordinates only: with fewer training rows than dims the rows have no spread in dim - n + 1 directions,
  where a component's variance collapses to the floor (500 real SONAR rows: ~2e8 nats worse per val row at every K);
  and where the data's directions share one isotropic noise (the built-in data's trailing ones), per-component
  variances only add estimation noise (r = 512 beat r = 1,024 by 15 nats per val row at K = 128).

The choice, on the mean log-likelihood of the val rows (raw space): K over ``COMPONENT_GRID`` (at most one
component per ``MIN_ROWS_PER_COMPONENT`` training rows) on the most coordinates the rows support, stopping at the
first K that does not improve it; then, at that K, r halved while it improves. Every candidate is kept in
``MixtureBaseline.candidates``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.special
from sklearn.cluster import kmeans_plusplus
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from flow_pipeline.core.baselines import fit_baseline

MIXTURE = "gaussian-mixture"
# Powers of two: each step doubles the EM cost, and 128 keeps the whole choice near 2 minutes on the built-in data
# (15,360 x 1,024) on 2 cores; the val likelihood there still rises at 128 (see docs/evaluation.md).
COMPONENT_GRID = (1, 2, 4, 8, 16, 32, 64, 128)
MIN_ROWS_PER_COMPONENT = 50
# EM stops when the mean per-row lower bound changes by less than this many nats per coordinate it covers: on the
# built-in data the candidates differ by several nats per val row, and at K = 16, r = 1,024 a tolerance of 0.1 nats
# per row gave the val likelihood of scikit-learn's default 1e-3 (within 0.8 nats) in 11 instead of 70 steps.
EM_TOLERANCE_PER_DIM = 1e-4
VARIANCE_FLOOR = 1e-6  # added to every component variance, in whitened units (training variance ~1)
EM_SEED = 0
_LOG_2PI = math.log(2 * math.pi)


class MixtureDataError(ValueError):
    """Rows a mixture cannot be fitted or chosen on: no val rows, too few training rows, mismatched shapes."""


@dataclass(frozen=True)
class MixtureCandidate:
    """One (components, dims) pair tried, with the mean log-likelihood of the val rows (raw space, nats per row)."""

    components: int
    dims: int
    val_log_likelihood: float


@dataclass(frozen=True)
class MixtureBaseline:
    """A fitted ``gaussian-mixture`` (module docstring).

    mean (dim,); basis (dim, dim) orthonormal columns, gaussian-full's principal directions by decreasing variance;
    scales (dim,) the standard deviations along them; weights (K,); means (K, r) and variances (K, r): the mixture
    on the leading r whitened coordinates. candidates: every pair tried on val, in order; seconds: the whole fit."""

    mean: np.ndarray
    basis: np.ndarray
    scales: np.ndarray
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    candidates: tuple[MixtureCandidate, ...] = ()
    seconds: float = 0.0
    name: str = MIXTURE

    @property
    def components(self) -> int:
        return int(self.weights.size)

    @property
    def dims(self) -> int:
        return int(self.means.shape[1])

    def whiten(self, x) -> np.ndarray:
        """z (n, dim) float64 of rows x (n, dim): coordinates along ``basis`` in units of ``scales``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"{self.name}: x must be (n, {self.mean.shape[0]}), got shape {x.shape}")
        return ((x - self.mean) @ self.basis) / self.scales

    def log_prob(self, x) -> np.ndarray:
        """Exact log-density (n,) float64 in nats of raw rows x (n, dim), the whitening's Jacobian included."""
        z = self.whiten(x)
        lead, rest = z[:, : self.dims], z[:, self.dims:]
        precision = 1.0 / self.variances
        quadratic = ((lead * lead) @ precision.T - 2.0 * lead @ (self.means * precision).T
                     + (self.means**2 * precision).sum(1))  # (n, K): sum_i (z_i - mu_ki)^2 / s_ki^2
        log_norm = np.log(self.weights) - 0.5 * (np.log(self.variances).sum(1) + self.dims * _LOG_2PI)
        mixture = scipy.special.logsumexp(log_norm - 0.5 * quadratic, axis=1)
        gaussian = -0.5 * ((rest * rest).sum(1) + rest.shape[1] * _LOG_2PI)
        return mixture + gaussian - float(np.log(self.scales).sum())

    def sample(self, n: int, seed: int) -> np.ndarray:
        """n rows (n, dim) float32 in raw space, from ``np.random.default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        labels = rng.choice(self.components, size=n, p=self.weights)
        z = rng.standard_normal((n, self.mean.shape[0]))
        z[:, : self.dims] = z[:, : self.dims] * np.sqrt(self.variances[labels]) + self.means[labels]
        return (self.mean + (z * self.scales) @ self.basis.T).astype(np.float32)

    def note(self) -> str:
        """What was chosen, and the val log-likelihood of every candidate, for its reference row."""
        tried = "; ".join(f"K={c.components} r={c.dims}: {c.val_log_likelihood:.1f}" for c in self.candidates)
        return (f"K = {self.components} diagonal components on the leading r = {self.dims} of "
                f"{self.mean.shape[0]} gaussian-full-whitened coordinates, chosen on the val rows' mean "
                f"log-likelihood (nats/row: {tried}); EM fit {self.seconds:.0f} s")

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field as arrays, for ``np.savez``; :meth:`from_arrays` inverts it."""
        tried = np.array([(c.components, c.dims, c.val_log_likelihood) for c in self.candidates],
                         dtype=np.float64).reshape(-1, 3)
        return {"mean": self.mean, "basis": self.basis, "scales": self.scales, "weights": self.weights,
                "means": self.means, "variances": self.variances, "candidates": tried,
                "seconds": np.array(self.seconds)}

    @classmethod
    def from_arrays(cls, arrays) -> MixtureBaseline:
        """The mixture :meth:`arrays` wrote (a mapping of name -> array, e.g. an ``np.load`` result)."""
        tried = tuple(MixtureCandidate(int(k), int(r), float(ll)) for k, r, ll in arrays["candidates"])
        return cls(*(np.asarray(arrays[name], dtype=np.float64)
                     for name in ("mean", "basis", "scales", "weights", "means", "variances")),
                   candidates=tried, seconds=float(arrays["seconds"]))


def _checked_rows(train, val) -> tuple[np.ndarray, np.ndarray]:
    """train (n, dim) and val (m, dim) as float64; MixtureDataError naming what is missing or too small."""
    if val is None or len(val) == 0:
        raise MixtureDataError(f"{MIXTURE}: no val rows to choose its components on")
    train, val = np.asarray(train, dtype=np.float64), np.asarray(val, dtype=np.float64)
    if train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]:
        raise MixtureDataError(f"{MIXTURE}: train and val must be (n, dim) with the same dim, got {train.shape} "
                               f"and {val.shape}")
    if train.shape[0] < 2 * MIN_ROWS_PER_COMPONENT:
        raise MixtureDataError(f"{MIXTURE}: needs at least {2 * MIN_ROWS_PER_COMPONENT} training rows "
                               f"({MIN_ROWS_PER_COMPONENT} per component for 2), got {train.shape[0]}")
    return train, val


def _principal_frame(train: np.ndarray, val: np.ndarray) -> MixtureBaseline:
    """gaussian-full fitted like its reference row (shrinkage chosen on val), as the frame of the mixture: a
    mixture on 0 coordinates, whose density is gaussian-full's."""
    full = fit_baseline("gaussian-full", train, val)
    eigval, eigvec = np.linalg.eigh(full.factor @ full.factor.T)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    if not eigval[-1] > 0:
        raise MixtureDataError(f"{MIXTURE}: gaussian-full's covariance is singular, so the rows cannot be whitened")
    empty = np.zeros((1, 0))
    return MixtureBaseline(full.mean, eigvec, np.sqrt(eigval), np.ones(1), empty, empty)


def _dims_candidates(dim: int, n_train: int) -> list[int]:
    """Coordinates the mixture may cover, most first: dim, dim / 2, dim / 4, ... (at least 1), only those the
    training rows support well (at most n_train / 2: near the end of the rows' span their variances shrink to 0)."""
    return [dim >> j for j in range(dim.bit_length()) if (dim >> j) <= n_train // 2]


def _initial_mixture(z_lead: np.ndarray, scales: np.ndarray, components: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EM's start on whitened rows z_lead (n, r): k-means++ centres picked by raw-space distances (z * scales, the
    whitening undone), every row in its nearest centre's group, and each group's (weight (K,), mean (K, r),
    precision (K, r)) in whitened units.

    Raw distances, because whitening divides every direction by its total variance, of which the groups' separation
    is part: the directions that tell groups apart shrink to the scale of the noise in all the others, and whitened
    k-means++ often seeds two centres in one group (3 separated groups in 5 dims: the right K in 5 of 10 draws,
    against 8 of 10 with raw distances; on the built-in data at K = 128 its fit scored 5 nats per val row lower)."""
    y = z_lead * scales
    centres, indices = kmeans_plusplus(y, components, random_state=seed)
    distances = (y * y).sum(1)[:, None] - 2.0 * y @ centres.T + (centres * centres).sum(1)[None, :]
    labels = distances.argmin(1)
    labels[indices] = np.arange(components)  # each centre's own row stays in its group: none is empty
    members = np.eye(components)[labels]  # (n, K) one-hot
    counts = members.sum(0)
    means = members.T @ z_lead / counts[:, None]
    variances = np.maximum(members.T @ (z_lead * z_lead) / counts[:, None] - means**2, 0.0) + VARIANCE_FLOOR
    return counts / counts.sum(), means, 1.0 / variances


def _em_fit(frame: MixtureBaseline, z_train: np.ndarray, components: int, dims: int,
            seed: int) -> MixtureBaseline:
    """EM on the leading ``dims`` whitened training coordinates, as a mixture in ``frame``."""
    z_lead = np.ascontiguousarray(z_train[:, :dims])
    weights, means, precisions = _initial_mixture(z_lead, frame.scales[:dims], components, seed)
    em = GaussianMixture(components, covariance_type="diag", tol=EM_TOLERANCE_PER_DIM * dims,
                         reg_covar=VARIANCE_FLOOR, weights_init=weights, means_init=means,
                         precisions_init=precisions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 100 steps and still moving: the val score judges it
        em.fit(z_lead)
    return MixtureBaseline(frame.mean, frame.basis, frame.scales, em.weights_, em.means_, em.covariances_)


def _climb(best: MixtureCandidate, steps: list[tuple[int, int]], score, tried: list) -> MixtureCandidate:
    """Score each (K, r) of ``steps`` in order, appending it to ``tried``; the last that improved on ``best``'s val
    log-likelihood (a tie does not), stopping at the first that does not."""
    for components, dims in steps:
        candidate = score(components, dims)
        tried.append(candidate)
        if candidate.val_log_likelihood <= best.val_log_likelihood:
            break
        best = candidate
    return best


def fit_mixture_baseline(train, val, components=COMPONENT_GRID, seed: int = EM_SEED) -> MixtureBaseline:
    """Fit ``gaussian-mixture`` to train (n, dim) and choose K among ``components`` and r on val (m, dim) by their
    mean log-likelihood (module docstring). Deterministic for a seed. Raises MixtureDataError without val rows, with
    fewer than 2 x MIN_ROWS_PER_COMPONENT training rows or mismatched shapes."""
    start = time.perf_counter()
    train, val = _checked_rows(train, val)
    frame = _principal_frame(train, val)
    z_train = frame.whiten(train)
    grid = sorted({k for k in components if 1 <= k <= train.shape[0] // MIN_ROWS_PER_COMPONENT})
    dims = _dims_candidates(train.shape[1], train.shape[0])
    if not grid:
        raise MixtureDataError(f"{MIXTURE}: no candidate K in {tuple(components)} fits {train.shape[0]} training "
                               f"rows at {MIN_ROWS_PER_COMPONENT} per component")
    fits: dict[tuple[int, int], MixtureBaseline] = {}

    def score(k: int, r: int) -> MixtureCandidate:
        fits[k, r] = _em_fit(frame, z_train, k, r, seed)
        return MixtureCandidate(k, r, float(fits[k, r].log_prob(val).mean()))

    best = score(grid[0], dims[0])
    tried = [best]
    best = _climb(best, [(k, dims[0]) for k in grid[1:]], score, tried)  # K on the most coordinates
    best = _climb(best, [(best.components, r) for r in dims[1:]], score, tried)  # then fewer, at that K
    fitted = fits[best.components, best.dims]
    return MixtureBaseline(fitted.mean, fitted.basis, fitted.scales, fitted.weights, fitted.means,
                           fitted.variances, tuple(tried), time.perf_counter() - start)
