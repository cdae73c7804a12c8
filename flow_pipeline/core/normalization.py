"""Normalisation of embeddings before training, and its inverse at sampling.

Two methods, fitted on the training rows a run uses (:meth:`Normalizer.fit`):

- ``zscore``: per dimension, ``z = (x - mean) / std``. The flow must then learn every correlation between dimensions.
- ``whiten``: PCA whitening with the full covariance, ``z = ((x - mean) @ U) / s`` where the columns of ``U`` are
  the covariance's eigenvectors and ``s`` the square roots of its eigenvalues, so ``z`` has identity covariance.

  With fewer rows than dimensions (800 real SONAR rows of 1024-d) the sample covariance is singular, and with
  somewhat more rows its small eigenvalues are still far too small (Marchenko-Pastur), so inverting it amplifies
  noise. The eigenvalues are therefore shrunk towards their mean with Ledoit & Wolf's data-driven weight ``a``
  (:func:`flow_pipeline.core.stats.ledoit_wolf_shrinkage`): ``lambda' = (1 - a) lambda + a mean(lambda)``, the
  eigenvalues of the Ledoit-Wolf covariance estimate. It makes every eigenvalue at least ``a mean(lambda)`` > 0, is
  large when rows are few and vanishes as rows grow, and needs no tuning. The same std floor as z-scoring
  (:func:`flow_pipeline.core.stats.floor_std`) is applied on top, to the per-direction scales ``s``.

Losses measured in the two spaces are different quantities: a run's normalisation is part of its identity.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flow_pipeline.core.stats import floor_std, ledoit_wolf_shrinkage, streaming_mean_std, streaming_scatter

NORMALIZATIONS = ("zscore", "whiten")


class Normalizer:
    """An invertible affine map between raw embeddings and the space a flow is trained in.

    mean: (dim,) float32. std: (dim,) float32 > 0, the scale of each output coordinate (a dimension's std for
    ``zscore``; a principal direction's, after shrinkage and floor, for ``whiten``). components: ``None`` for
    ``zscore``; for ``whiten`` the (dim, dim) float32 orthonormal eigenvectors as columns, by decreasing variance.
    ``std`` is used as given: flooring happens once, in :meth:`fit`.
    """

    def __init__(self, mean: Tensor, std: Tensor, components: Tensor | None = None):
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError(f"mean and std must be 1-D of the same length, got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool(torch.isfinite(std).all()) or not bool((std > 0).all()):
            raise ValueError("std must be finite and > 0 in every coordinate (Normalizer.fit floors it)")
        dim = mean.shape[0]
        if components is not None and tuple(components.shape) != (dim, dim):
            raise ValueError(f"components must be ({dim}, {dim}), got {tuple(components.shape)}")
        self.mean = mean.detach().float()
        self.std = std.detach().float()
        self.components = None if components is None else components.detach().float()
        self.details: dict = {}  # how fit() got here (rows, shrinkage, floored coordinates); not part of the state

    @property
    def method(self) -> str:
        return "zscore" if self.components is None else "whiten"

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @classmethod
    def fit(cls, rows, method: str = "zscore") -> "Normalizer":
        """Fit on (n, dim) training rows (NumPy array, memory map or CPU tensor; n >= 2, finite), streamed in chunks.

        Raises ValueError for an unknown method and DataError (from the stats) for fewer than 2 rows or NaN/inf.
        """
        if method not in NORMALIZATIONS:
            raise ValueError(f"normalization: unknown value {method!r}; valid: {', '.join(NORMALIZATIONS)}")
        mean, std, n = streaming_mean_std(rows)
        components, details = None, {"rows": n}
        if method == "whiten":
            eigenvalues, eigenvectors, shrinkage = whitening_spectrum(rows, mean)
            std, components = np.sqrt(eigenvalues), torch.from_numpy(eigenvectors).float()
            details["shrinkage"] = shrinkage
        floored = floor_std(std)
        details.update(min_std=float(std.min()), median_std=float(np.median(std)),
                       n_floored=int((floored > std).sum()))
        normalizer = cls(torch.from_numpy(mean).float(), torch.from_numpy(floored).float(), components)
        normalizer.details = details
        return normalizer

    def normalize(self, x: Tensor) -> Tensor:
        """(batch, dim) raw embeddings -> normalised coordinates."""
        centred = x - self.mean.to(x.device)
        if self.components is not None:
            centred = centred @ self.components.to(x.device)
        return centred / self.std.to(x.device)

    def denormalize(self, z: Tensor) -> Tensor:
        """(batch, dim) normalised coordinates -> raw embedding space (the exact inverse of :meth:`normalize`)."""
        scaled = z * self.std.to(z.device)
        if self.components is not None:
            scaled = scaled @ self.components.to(z.device).T
        return scaled + self.mean.to(z.device)

    def state_dict(self) -> dict:
        """``method`` (str), ``mean``, ``std`` and, when whitening, ``components``: loadable with weights_only."""
        state = {"method": self.method, "mean": self.mean.cpu(), "std": self.std.cpu()}
        if self.components is not None:
            state["components"] = self.components.cpu()
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        """Inverse of :meth:`state_dict`; a state without ``method`` (older checkpoints) is z-scoring."""
        method = state.get("method", "zscore")
        if method not in NORMALIZATIONS:
            raise ValueError(f"normalization state has unknown method {method!r}; valid: {', '.join(NORMALIZATIONS)}")
        components = torch.as_tensor(state["components"]) if method == "whiten" else None
        return cls(torch.as_tensor(state["mean"]), torch.as_tensor(state["std"]), components)


def whitening_spectrum(rows, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Shrunk covariance spectrum of (n, dim) rows around ``mean``: (eigenvalues (dim,) float64 descending,
    eigenvectors (dim, dim) float64 as columns, the Ledoit-Wolf weight used). The covariance is the unbiased one
    (``scatter / (n - 1)``); see the module docstring for the shrinkage."""
    scatter, fourth, n = streaming_scatter(rows, mean)
    shrinkage = ledoit_wolf_shrinkage(scatter, fourth, n)
    eigenvalues, eigenvectors = np.linalg.eigh(scatter / (n - 1))
    eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)  # rounding can leave tiny negatives on a singular matrix
    eigenvalues = (1.0 - shrinkage) * eigenvalues + shrinkage * eigenvalues.mean()
    return eigenvalues, np.ascontiguousarray(eigenvectors[:, ::-1]), shrinkage
