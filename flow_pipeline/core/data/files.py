"""Loading one embeddings file: ``.npy`` (memory-mapped) or ``.pt`` (a tensor or a dict with ``embeddings``)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from flow_pipeline.core.data import DataError, MissingDataError


def load_embeddings(path: str | os.PathLike) -> np.ndarray:
    """Load one embeddings file as a (rows, dim) float array.

    ``.npy``: opened memory-mapped (read-only), so files larger than RAM work; the stored float dtype is kept
    (float32 for everything this package writes) because casting would read the whole file.
    ``.pt``: a tensor, or a dict with key ``embeddings`` holding one; loaded with ``weights_only=True`` and returned
    as a float32 NumPy array.

    Raises DataError (message starts with the absolute path) for a missing file, an unknown extension, a truncated or
    corrupt file, a ``.pt`` without a tensor / ``embeddings`` key, an array that is not 2-D or not floating point.
    """
    path = absolute(path)
    require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = open_npy(path)
    elif suffix == ".pt":
        array = _tensor_to_numpy(path, _embeddings_tensor(path, torch_load(path)))
    else:
        raise DataError(f"{path}: unknown extension {path.suffix!r}; expected .npy or .pt")
    check_float_matrix(array, str(path))
    return array


def absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute()


def require_file(path: Path) -> None:
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found")


def open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read .npy file (truncated or corrupt): {exc}") from exc


def torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path}: cannot load with weights_only=True (corrupt, or holds objects other than tensors and plain "
            f"containers): {_first_line(exc)}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read .pt file (truncated or corrupt): {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _embeddings_tensor(path: Path, obj: object) -> torch.Tensor:
    """A loaded ``.pt`` object -> the embeddings tensor it holds."""
    if isinstance(obj, dict):
        if "embeddings" not in obj:
            raise DataError(f"{path}: dict has no 'embeddings' key (keys: {sorted(map(str, obj))})")
        obj = obj["embeddings"]
        if not isinstance(obj, torch.Tensor):
            raise DataError(f"{path}: 'embeddings' is a {type(obj).__name__}, expected a tensor")
        return obj
    if not isinstance(obj, torch.Tensor):
        raise DataError(f"{path}: holds a {type(obj).__name__}, expected a tensor or a dict with 'embeddings'")
    return obj


def _tensor_to_numpy(path: Path, tensor: torch.Tensor) -> np.ndarray:
    """A float tensor -> float32 NumPy array (dtype is checked first so ints are reported, not cast)."""
    if not tensor.is_floating_point():
        raise DataError(f"{path}: embeddings must be floating point, got dtype {tensor.dtype}")
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


def check_float_matrix(array: np.ndarray, name: str) -> None:
    if array.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array (rows, dim), got shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{name}: embeddings must be floating point, got dtype {array.dtype}")
