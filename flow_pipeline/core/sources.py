"""Embedding sources, train/val/test splits and their on-disk format.

Everything here is pure NumPy/PyTorch. Arrays are ``(rows, dim)``; row indices are ``int64``. Every problem with the
input data raises :class:`DataError` whose message starts with the offending file's absolute path (or the caller's
name for an in-memory array) and then says what is wrong.

Sources:

- :func:`synthetic_sonar_like`: a seeded generator whose statistics match real SONAR text embeddings;
- :func:`load_embeddings`: one ``.npy`` (memory-mapped) or ``.pt`` file;
- :mod:`flow_pipeline.core.split_files`: the research plan's Phase-1 split files (one size directory or a root).

Splits are saved by :func:`save_splits` as ``.npy`` files (plus, when the source has text, one JSON-lines file of
sentences per split, row-aligned) and a ``splits.json`` manifest, and read back, memory-mapped, by
:func:`load_saved_splits`; :mod:`flow_pipeline.core.split_store` keeps one such set per subset size.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from flow_pipeline.core.atomic import TEMP_PREFIX, fsync_directory, remove_stale_temp_files, write_bytes_atomic

SPLIT_NAMES = ("train", "val", "test")
MANIFEST_NAME = "splits.json"
MANIFEST_VERSION = 1
DEFAULT_CHUNK_ROWS = 65536
_TMP_PREFIX = TEMP_PREFIX

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


class DataError(ValueError):
    """Bad input data: a missing, corrupt or malformed file, or an array with the wrong shape or values."""


@dataclass(frozen=True)
class Splits:
    """Train/val/test embeddings with the row indices they came from.

    train, val, test: (n_split, dim) float arrays (possibly memory-mapped).
    train_indices, val_indices, test_indices: (n_split,) int64 row indices into the source.
    source: human-readable description of where the rows came from.
    seed, fractions: how the split was drawn, when it was drawn here (``None`` for splits given as files).
    sentences: split name -> the sentence of each row (row-aligned), or ``None`` for sources without text.
    size: the subset label of split files given per size (1k, 5k, 10k, full), else ``None``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_indices: np.ndarray
    val_indices: np.ndarray
    test_indices: np.ndarray
    source: str
    seed: int | None = None
    fractions: tuple[float, float, float] | None = None
    sentences: dict[str, list[str]] | None = None
    size: str | None = None

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """Split name -> embeddings, in ``SPLIT_NAMES`` order."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def indices(self) -> dict[str, np.ndarray]:
        """Split name -> row indices, in ``SPLIT_NAMES`` order."""
        return {"train": self.train_indices, "val": self.val_indices, "test": self.test_indices}


# ---------------------------------------------------------------------------------------------------------------
# Synthetic SONAR-like generator
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Loading files
# ---------------------------------------------------------------------------------------------------------------


def load_embeddings(path: str | os.PathLike) -> np.ndarray:
    """Load one embeddings file as a (rows, dim) float array.

    ``.npy``: opened memory-mapped (read-only), so files larger than RAM work; the stored float dtype is kept
    (float32 for everything this package writes) because casting would read the whole file.
    ``.pt``: a tensor, or a dict with key ``embeddings`` holding one; loaded with ``weights_only=True`` and returned
    as a float32 NumPy array.

    Raises DataError (message starts with the absolute path) for a missing file, an unknown extension, a truncated or
    corrupt file, a ``.pt`` without a tensor / ``embeddings`` key, an array that is not 2-D or not floating point.
    """
    path = _absolute(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = _open_npy(path)
    elif suffix == ".pt":
        array = _tensor_to_numpy(path, _embeddings_tensor(path, _torch_load(path)))
    else:
        raise DataError(f"{path}: unknown extension {path.suffix!r}; expected .npy or .pt")
    _check_float_matrix(array, str(path))
    return array


def _absolute(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().absolute()


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read .npy file (truncated or corrupt): {exc}") from exc


def _torch_load(path: Path) -> object:
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


def _check_float_matrix(array: np.ndarray, name: str) -> None:
    if array.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array (rows, dim), got shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{name}: embeddings must be floating point, got dtype {array.dtype}")


def _check_same_dim(arrays: dict[str, np.ndarray], name: str) -> None:
    dims = {split: int(a.shape[1]) for split, a in arrays.items()}
    if len(set(dims.values())) > 1:
        raise DataError(f"{name}: splits have different dims {dims}")


# ---------------------------------------------------------------------------------------------------------------
# Splitting and validation
# ---------------------------------------------------------------------------------------------------------------


def make_splits(
    n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded partition of ``range(n)`` into (train_idx, val_idx, test_idx), each sorted int64.

    Sizes: ``n_val = round(n * f_val)``, ``n_test = round(n * f_test)``, train gets the rest. The rows are drawn by one
    permutation from ``np.random.default_rng(seed)``; each split is then sorted so reads from a memory map are
    sequential. Fractions must be three finite non-negative numbers summing to 1 (ValueError otherwise); an ``n`` too
    small to give every split at least one row raises DataError.
    """
    f_train, f_val, f_test = _check_fractions(fractions)
    n_val, n_test = round(n * f_val), round(n * f_test)
    n_train = n - n_val - n_test
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if min(sizes.values()) < 1:
        raise DataError(f"{n} rows cannot be split by fractions {(f_train, f_val, f_test)}: sizes would be {sizes}")
    perm = np.random.default_rng(seed).permutation(n)
    train, val, test = np.split(perm, [n_train, n_train + n_val])
    return np.sort(train), np.sort(val), np.sort(test)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3:
        raise ValueError(f"fractions must be (train, val, test), got {len(values)} values: {values}")
    if not all(math.isfinite(f) and f >= 0 for f in values):
        raise ValueError(f"fractions must be finite and >= 0, got {values}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {values} (sum {sum(values)})")
    return values  # type: ignore[return-value]


def split_array(
    embeddings: np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, source: str = ""
) -> Splits:
    """Split a (rows, dim) array with :func:`make_splits`; the split rows are gathered into float32 copies."""
    train_idx, val_idx, test_idx = make_splits(embeddings.shape[0], fractions, seed)
    # Sorted indices make the gathers sequential reads when `embeddings` is memory-mapped.
    train, val, test = (np.asarray(embeddings[idx], dtype=np.float32) for idx in (train_idx, val_idx, test_idx))
    return Splits(
        train=train,
        val=val,
        test=test,
        train_indices=train_idx,
        val_indices=val_idx,
        test_indices=test_idx,
        source=source,
        seed=seed,
        fractions=_check_fractions(fractions),
    )


def validate_embeddings(
    array: np.ndarray, expected_dim: int, name: str, min_rows: int = 1, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> None:
    """Check a (rows, dim) float array; raise DataError whose message starts with ``name`` if it is unusable.

    Checks, in order: 2-D and floating point; ``dim == expected_dim``; ``rows >= min_rows`` (never fewer than 1, so an
    empty array is always an error; a split used for validation needs ``min_rows=2``); every value finite. The
    finiteness scan reads ``chunk_rows`` rows at a time, so memory stays constant for memory-mapped arrays larger
    than RAM. The error for non-finite values gives how many rows are bad and the first few row indices.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    _check_float_matrix(array, name)
    rows, dim = (int(s) for s in array.shape)
    if dim != expected_dim:
        raise DataError(f"{name}: wrong embedding dim: expected {expected_dim}, got {dim}")
    needed = max(1, min_rows)
    if rows < needed:
        raise DataError(f"{name}: too few rows: has {rows}, needs at least {needed}")
    bad_count, first_bad = _scan_nonfinite_rows(array, chunk_rows)
    if bad_count:
        shown = ", ".join(map(str, first_bad))
        raise DataError(f"{name}: {bad_count} of {rows} rows contain NaN or inf (first row indices: {shown})")


def validate_splits(splits: Splits, expected_dim: int, min_rows: int = 2, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
    """:func:`validate_embeddings` on each split, named "<source> [<split> split]"; every split needs ``min_rows``."""
    for name, array in splits.arrays().items():
        validate_embeddings(array, expected_dim, f"{splits.source} [{name} split]", min_rows, chunk_rows)


def _scan_nonfinite_rows(array: np.ndarray, chunk_rows: int, keep: int = 5) -> tuple[int, list[int]]:
    """(number of rows with a non-finite value, the first ``keep`` such row indices), one chunk in memory at a time."""
    count, first = 0, []
    for start in range(0, array.shape[0], chunk_rows):
        chunk = np.asarray(array[start : start + chunk_rows])
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        count += bad.size
        first.extend(int(start + i) for i in bad[: keep - len(first)])
    return count, first


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading split sets
# ---------------------------------------------------------------------------------------------------------------


def save_splits(splits: Splits, directory: str | os.PathLike, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Path:
    """Write a split set into ``directory``; returns the manifest path.

    Files: ``{train,val,test}.npy`` (float32), ``{train,val,test}_indices.npy`` (int64), when the splits carry
    sentences ``{train,val,test}.jsonl`` (one ``{"index": id, "text": sentence}`` per line, row-aligned with the
    ``.npy``), and ``splits.json`` (format version, counts, dim, source, seed, fractions, size, file sizes). Arrays are copied ``chunk_rows`` rows at a time,
    so memory-mapped inputs larger than RAM work.

    Atomicity: every file is first written to a temp name in the same directory and fsynced; on any error the temps
    are removed and an existing set is untouched. Then the old manifest is removed, the data files are moved into
    place with ``os.replace``, and the new manifest is written last (also atomically). A crash in that short window
    leaves no manifest, so :func:`load_saved_splits` reports an incomplete set instead of reading a mixed one.
    """
    directory = _absolute(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(directory)
    _check_same_dim(splits.arrays(), splits.source or "splits")
    staged: dict[str, Path] = {}
    try:
        for name, array in splits.arrays().items():
            staged[f"{name}.npy"] = _write_npy_temp(directory, array, np.float32, chunk_rows)
        for name, idx in splits.indices().items():
            staged[f"{name}_indices.npy"] = _write_npy_temp(directory, np.asarray(idx), np.int64, chunk_rows)
        for name, sentences in (splits.sentences or {}).items():
            staged[f"{name}.jsonl"] = _write_sentences_temp(directory, sentences, splits.indices()[name])
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    manifest = _manifest(splits, {final: tmp.stat().st_size for final, tmp in staged.items()})
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    fsync_directory(directory)
    try:
        for final, tmp in staged.items():
            os.replace(tmp, directory / final)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)  # only temps that were not moved into place remain
    for name in SPLIT_NAMES:
        if f"{name}.jsonl" not in staged:
            (directory / f"{name}.jsonl").unlink(missing_ok=True)  # sentences of an earlier set
    write_bytes_atomic(directory / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    return directory / MANIFEST_NAME


def load_saved_splits(directory: str | os.PathLike) -> Splits:
    """Read a split set written by :func:`save_splits`; embeddings come back memory-mapped, indices in memory.

    Raises DataError naming the file for a missing manifest (absent or incompletely written set), a missing or
    corrupt ``.npy``, or a file whose size/shape disagrees with the manifest.
    """
    directory = _absolute(directory)
    manifest = _read_manifest(directory / MANIFEST_NAME)
    arrays, indices = {}, {}
    for name in SPLIT_NAMES:
        arrays[name] = _load_checked(directory / f"{name}.npy", manifest, (manifest["counts"][name], manifest["dim"]))
        indices[name] = np.asarray(
            _load_checked(directory / f"{name}_indices.npy", manifest, (manifest["counts"][name],)), dtype=np.int64
        )
    fractions = manifest.get("fractions")
    return Splits(
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        train_indices=indices["train"],
        val_indices=indices["val"],
        test_indices=indices["test"],
        source=str(manifest["source"]),
        seed=manifest.get("seed"),
        fractions=tuple(fractions) if fractions is not None else None,
        size=manifest.get("size"),
    )


def load_sentences(directory: str | os.PathLike, split: str) -> list[str] | None:
    """The sentences of one saved split, row-aligned with its ``.npy``; ``None`` when the source had no text.
    Raises DataError naming the file when it is missing, malformed or has another row count than the manifest."""
    directory = _absolute(directory)
    manifest = _read_manifest(directory / MANIFEST_NAME)
    if not manifest.get("sentences"):
        return None
    path = directory / f"{split}.jsonl"
    _require_file(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 may occur in a sentence
        sentences = [json.loads(line)["text"] for line in lines if line]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed sentences file: {exc!r}") from exc
    if len(sentences) != manifest["counts"][split]:
        raise DataError(f"{path}: {len(sentences)} sentences but the manifest says {manifest['counts'][split]} rows")
    return sentences


def _manifest(splits: Splits, file_bytes: dict[str, int]) -> dict:
    return {
        "format_version": MANIFEST_VERSION,
        "counts": {name: int(a.shape[0]) for name, a in splits.arrays().items()},
        "dim": splits.dim,
        "dtype": "float32",
        "source": splits.source,
        "seed": splits.seed,
        "fractions": list(splits.fractions) if splits.fractions is not None else None,
        "size": splits.size,
        "sentences": splits.sentences is not None,
        "file_bytes": file_bytes,
    }


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found (no split set here, or its last save did not finish)")
    try:
        manifest = json.loads(path.read_text())
        manifest["counts"] = {name: int(manifest["counts"][name]) for name in SPLIT_NAMES}
        manifest["dim"] = int(manifest["dim"])
        missing = [key for key in ("source", "file_bytes") if key not in manifest]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed split manifest: {exc!r}") from exc
    if missing:
        raise DataError(f"{path}: malformed split manifest: missing keys {missing}")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    return manifest


def _load_checked(path: Path, manifest: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Memory-map one ``.npy`` of the set and check it against the manifest's byte size and expected shape."""
    _require_file(path)
    expected_bytes = manifest["file_bytes"].get(path.name)
    if expected_bytes is not None and path.stat().st_size != expected_bytes:
        raise DataError(
            f"{path}: size {path.stat().st_size} bytes does not match the manifest's {expected_bytes} "
            f"(the split set is inconsistent)"
        )
    array = _open_npy(path)
    if tuple(array.shape) != tuple(shape):
        raise DataError(f"{path}: shape {tuple(array.shape)} does not match the manifest's {tuple(shape)}")
    return array


def _write_npy_temp(directory: Path, array: np.ndarray, dtype: type, chunk_rows: int) -> Path:
    """Copy ``array`` into a fsynced temp ``.npy`` in ``directory``, chunk by chunk; returns the temp path."""
    fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".npy", dir=directory)
    os.close(fd)
    tmp = Path(name)
    try:
        if array.shape[0] == 0 or array.size == 0:
            np.save(tmp, np.empty(array.shape, dtype=dtype))  # open_memmap cannot map zero bytes
        else:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(array.shape))
            for start in range(0, array.shape[0], chunk_rows):
                out[start : start + chunk_rows] = np.asarray(array[start : start + chunk_rows], dtype=dtype)
            out.flush()
            del out
        _fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_sentences_temp(directory: Path, sentences: list[str], indices: np.ndarray) -> Path:
    """One ``{"index": id, "text": sentence}`` JSON line per row into a fsynced temp file; returns its path."""
    if len(sentences) != len(indices):
        raise DataError(f"{directory}: {len(sentences)} sentences for {len(indices)} rows")
    fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".jsonl", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for index, text in zip(indices.tolist(), sentences):
                handle.write(json.dumps({"index": index, "text": text}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
