"""Sets whose relation is known by construction, for the two-sample tests: a bimodal mixture and the Gaussian with its
mean and covariance (equal first, second and third moments; different distributions)."""

from __future__ import annotations

import numpy as np

DIM = 4
SEPARATION = 4.0  # the mixture's components sit at ±4 along one axis, unit spread around them


def mixture(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, DIM): two Gaussians at ±SEPARATION e_0, identity covariance each; mean 0, covariance
    diag(1 + SEPARATION², 1, ...), third moment 0 (symmetric)."""
    signs = rng.choice([-1.0, 1.0], size=(n, 1))
    return signs * np.eye(DIM)[0] * SEPARATION + rng.standard_normal((n, DIM))


def matched_gaussian(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, DIM) rows of the Gaussian with the mixture's mean and covariance."""
    x = rng.standard_normal((n, DIM))
    x[:, 0] *= np.sqrt(1.0 + SEPARATION**2)
    return x
