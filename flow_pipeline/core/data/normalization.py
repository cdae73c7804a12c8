"""Normalisation of embeddings before training, and its inverse at sampling.

Two methods, fitted on the training rows a run uses (:meth:`Normalizer.fit`):

- ``zscore``: per dimension, ``z = (x - mean) / std``. The flow must then learn every correlation between dimensions.
- ``whiten``: PCA whitening with the full covariance, ``z = ((x - mean) @ U) / s`` where the columns of ``U`` are
  the covariance's eigenvectors and ``s`` the square roots of its eigenvalues, so ``z`` has identity covariance.

  With fewer rows than dimensions (800 real SONAR rows of 1024-d) the sample covariance is singular, and with
  somewhat more rows its small eigenvalues are still far too small (Marchenko-Pastur), so inverting it amplifies
  noise. The eigenvalues are therefore shrunk towards their mean with Ledoit & Wolf's data-driven weight ``a``
  (:func:`flow_pipeline.core.data.stats.ledoit_wolf_shrinkage`): ``lambda' = (1 - a) lambda + a mean(lambda)``, the
  eigenvalues of the Ledoit-Wolf covariance estimate. It makes every eigenvalue at least ``a mean(lambda)`` > 0, is
  large when rows are few and vanishes as rows grow, and needs no tuning. Given held-out val rows, the weight is
  instead the one their likelihood prefers (:func:`~flow_pipeline.core.data.stats.val_chosen_shrinkage`, among a
  grid and Ledoit-Wolf's), as ``gaussian-full``'s is: the Gaussian the whitening describes, which a
  ``principal_dims`` model keeps outside its network's coordinates, is then the best one on held-out rows. The same
  std floor as z-scoring (:func:`floor_std`) is applied on top, to the per-direction scales ``s``.

Losses measured in the two spaces are different quantities: a run's normalisation is part of its identity.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flow_pipeline.core.atomic import write_bytes_atomic
from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.stats import (SHRINKAGE_GRID, ledoit_wolf_shrinkage, streaming_mean_std, streaming_scatter,
                                           val_chosen_shrinkage)

NORMALIZATIONS = ("zscore", "whiten")

# A dimension's std is floored at max(ABS, REL * median std). 0.1 * median (~5e-4 on SONAR) lifts the two
# near-constant SONAR dimensions (std ~2e-5 and ~2e-4) so a tiny shift in them cannot become a z-score of 10-100,
# while leaving every ordinary dimension (all within ~0.6-1.6x the median) untouched. The absolute floor only
# matters when most dimensions are constant.
DEFAULT_REL_STD_FLOOR = 0.1
DEFAULT_ABS_STD_FLOOR = 1e-8


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
    def fit(cls, rows, method: str = "zscore", val=None) -> "Normalizer":
        """Fit on (n, dim) training rows (NumPy array, memory map or CPU tensor; n >= 2, finite), streamed in chunks.
        ``val`` (m, dim) held-out rows, used by ``whiten`` only: its shrinkage is the one their likelihood prefers.

        Raises ValueError for an unknown method and DataError (from the stats) for fewer than 2 rows or NaN/inf.
        """
        if method not in NORMALIZATIONS:
            raise ValueError(f"normalization: unknown value {method!r}; valid: {', '.join(NORMALIZATIONS)}")
        mean, std, n = streaming_mean_std(rows)
        components, details = None, {"rows": n}
        if method == "whiten":
            eigenvalues, eigenvectors, shrinkage = whitening_spectrum(rows, mean, val)
            std, components = np.sqrt(eigenvalues), torch.from_numpy(eigenvectors).float()
            details.update(shrinkage=shrinkage, shrinkage_from="val rows' likelihood" if val is not None and len(val)
                           else "Ledoit-Wolf")
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

    def log_abs_det_jacobian(self) -> float:
        """log |det d normalize / dx| (a constant: the map is affine), so that a density of normalised rows becomes
        one of raw rows: log p_raw(x) = log p_norm(normalize(x)) + this. ``zscore``: -sum log std; ``whiten``: the
        same plus log |det components| (0 up to rounding: the components are orthonormal)."""
        value = -float(self.std.double().log().sum())
        if self.components is not None:
            value += float(torch.linalg.slogdet(self.components.double()).logabsdet)
        return value

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


def whitening_spectrum(rows, mean: np.ndarray, val=None) -> tuple[np.ndarray, np.ndarray, float]:
    """Shrunk covariance spectrum of (n, dim) rows around ``mean``: (eigenvalues (dim,) float64 descending,
    eigenvectors (dim, dim) float64 as columns, the weight used: Ledoit-Wolf's, or with ``val`` rows (m, dim) the one
    their likelihood prefers). The covariance is the unbiased one (``scatter / (n - 1)``); see the module docstring
    for the shrinkage."""
    scatter, fourth, n = streaming_scatter(rows, mean)
    shrinkage = ledoit_wolf_shrinkage(scatter, fourth, n)
    eigenvalues, eigenvectors = np.linalg.eigh(scatter / (n - 1))
    eigenvalues = np.clip(eigenvalues[::-1], 0.0, None)  # rounding can leave tiny negatives on a singular matrix
    eigenvectors = eigenvectors[:, ::-1]
    if val is not None and len(val):
        val = np.asarray(val, dtype=np.float64)
        if val.ndim != 2 or val.shape[1] != mean.shape[0] or not np.isfinite(val).all():
            raise DataError(f"val rows: need finite rows of {mean.shape[0]} columns (the training rows'), got shape "
                            f"{val.shape}{'' if val.ndim != 2 or np.isfinite(val).all() else ' with NaN or inf'}")
        shrinkage = val_chosen_shrinkage(eigenvalues, eigenvectors, mean, val, np.unique(np.append(SHRINKAGE_GRID,
                                                                                                   shrinkage)))
    eigenvalues = (1.0 - shrinkage) * eigenvalues + shrinkage * eigenvalues.mean()
    return eigenvalues, np.ascontiguousarray(eigenvectors), shrinkage


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


# --- the .npz file of a Normalizer -------------------------------------------------------------------------------


def save_normalizer(path: Path, normalizer: Normalizer, extra: dict | None = None) -> None:
    """Write a Normalizer's state (method, mean, std, components when whitening) as one ``.npz``, atomically;
    ``extra`` (JSON-serialisable: where the rows came from, how many) is kept beside it under ``info``."""
    arrays = {key: value.numpy() for key, value in normalizer.state_dict().items() if key != "method"}
    info = {**normalizer.details, **(extra or {})}
    buffer = io.BytesIO()
    np.savez(buffer, method=np.array(normalizer.method), info=np.array(json.dumps(info, sort_keys=True)), **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def load_normalizer(path: Path) -> Normalizer:
    """The Normalizer saved by :func:`save_normalizer` at ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"normalization stats not found: {path} (materialize normalization_stats first)")
    with np.load(path, allow_pickle=False) as stats:
        state = {key: torch.from_numpy(stats[key]) for key in stats.files if key not in ("method", "info")}
        state["method"] = str(stats["method"]) if "method" in stats.files else "zscore"
    return Normalizer.from_state_dict(state)


def normalizer_sha256(normalizer: Normalizer) -> str:
    """sha256 of a Normalizer's content (method and arrays), unlike the file's: the same statistics written again
    hash the same."""
    digest = hashlib.sha256(normalizer.method.encode())
    for key, value in sorted(normalizer.state_dict().items()):
        if key != "method":
            digest.update(key.encode() + value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_normalizer_info(path: Path) -> dict:
    """The ``info`` saved with a Normalizer (rows it was fitted on, subset, shrinkage...)."""
    with np.load(path, allow_pickle=False) as stats:
        return json.loads(str(stats["info"])) if "info" in stats.files else {}
