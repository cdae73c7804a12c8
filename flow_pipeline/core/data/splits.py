"""A train/val/test split set in memory, drawing one from an array, and validating its rows.

Arrays are ``(rows, dim)``; row indices are ``int64``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.files import check_float_matrix

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_CHUNK_ROWS = 65536
DATASET_SIZES: dict[str, int | None] = {"1k": 1_000, "5k": 5_000, "10k": 10_000, "full": None}


@dataclass(frozen=True)
class Splits:
    """Train/val/test embeddings with the row indices they came from.

    train, val, test: (n_split, dim) float arrays (possibly memory-mapped).
    train_indices, val_indices, test_indices: (n_split,) int64 row indices into the source.
    source: human-readable description of where the rows came from.
    seed, fractions: how the split was drawn, when it was drawn here (``None`` for splits given as files).
    sentences: split name -> the sentence of each row (row-aligned), or ``None`` for sources without text.
    size: the subset label of split files given per size (1k, 5k, 10k, full), else ``None``.
    truth: for rows drawn from a known distribution (the built-in generator), what rebuilds it:
        ``{"generator": "sonar_mixture", "dim": ..., "seed": ...}`` (:func:`flow_pipeline.core.data.truth.truth_of`);
        ``None`` for real data, whose density nobody knows.
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
    truth: dict | None = None

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """Split name -> embeddings, in ``SPLIT_NAMES`` order."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def indices(self) -> dict[str, np.ndarray]:
        """Split name -> row indices, in ``SPLIT_NAMES`` order."""
        return {"train": self.train_indices, "val": self.val_indices, "test": self.test_indices}


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
    check_float_matrix(array, name)
    rows, dim = (int(s) for s in array.shape)
    if dim != expected_dim:
        raise DataError(f"{name}: wrong embedding dim: expected {expected_dim}, got {dim}")
    needed = max(1, min_rows)
    if rows < needed:
        raise DataError(f"{name}: too few rows: has {rows}, needs at least {needed}")
    bad_count, first_bad = scan_nonfinite_rows(array, chunk_rows)
    if bad_count:
        shown = ", ".join(map(str, first_bad))
        raise DataError(f"{name}: {bad_count} of {rows} rows contain NaN or inf (first row indices: {shown})")


def validate_splits(splits: Splits, expected_dim: int, min_rows: int = 2, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> None:
    """:func:`validate_embeddings` on each split, named "<source> [<split> split]"; every split needs ``min_rows``."""
    for name, array in splits.arrays().items():
        validate_embeddings(array, expected_dim, f"{splits.source} [{name} split]", min_rows, chunk_rows)


def scan_nonfinite_rows(array: np.ndarray, chunk_rows: int, keep: int = 5) -> tuple[int, list[int]]:
    """(number of rows with a non-finite value, the first ``keep`` such row indices), one chunk in memory at a time."""
    count, first = 0, []
    for start in range(0, array.shape[0], chunk_rows):
        chunk = np.asarray(array[start : start + chunk_rows])
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        count += bad.size
        first.extend(int(start + i) for i in bad[: keep - len(first)])
    return count, first


def check_same_dim(arrays: dict[str, np.ndarray], name: str) -> None:
    dims = {split: int(a.shape[1]) for split, a in arrays.items()}
    if len(set(dims.values())) > 1:
        raise DataError(f"{name}: splits have different dims {dims}")
