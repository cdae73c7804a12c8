"""The research plan's Phase-1 split files, read as they are and validated key by key.

Layout: ``splits/{1k,5k,10k,full}/{train,val,test}.pt``. Each file is a ``torch.save``d dict:

    embeddings    float tensor (N, dim)   SONAR text embeddings, unnormalised
    instructions  list of N str           the sentence each row encodes
    indices       list of N int           row ids in the full pool: unique, the same id is the same sentence
    split         str                     train, val or test: the file's own name
    size          str                     the subset label (1k, 5k, 10k, full): a label, not a row count

A source is either one size directory (used as given: the whole data) or the ``splits/`` root holding several.
A copy may be partial (a size directory with only ``val.pt`` and ``test.pt``): from a root the complete sizes are
kept and the others reported with what they lack. Every problem raises :class:`DataError` whose message starts
with the file (or directory) and names the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.files import absolute, torch_load
from flow_pipeline.core.data.splits import DATASET_SIZES, SPLIT_NAMES, Splits, check_same_dim, scan_nonfinite_rows

SPLIT_FILE_KEYS = ("embeddings", "instructions", "indices", "split", "size")
SIZE_LABELS = tuple(DATASET_SIZES)


@dataclass(frozen=True)
class SplitsRoot:
    """Every complete size of a ``splits/`` root. sizes: label -> Splits (with sentences), in SIZE_LABELS order;
    incomplete: label -> what its directory lacks; source: the root's absolute path."""

    sizes: dict[str, Splits]
    source: str
    incomplete: dict[str, str] = field(default_factory=dict)


def split_files_present(directory: Path) -> list[str]:
    """The ``{train,val,test}.pt`` file names ``directory`` holds, in SPLIT_NAMES order."""
    return [f"{name}.pt" for name in SPLIT_NAMES if (directory / f"{name}.pt").is_file()]


def is_splits_root(directory: Path) -> bool:
    """A directory with size subdirectories (1k, 5k, 10k, full) and no split files of its own."""
    return not split_files_present(directory) and any((directory / label).is_dir() for label in SIZE_LABELS)


def load_split_dir(directory: str | os.PathLike, dim: int | None = None) -> Splits:
    """One size directory's ``train.pt`` / ``val.pt`` / ``test.pt``, as given, with their sentences.

    Returns float32 embeddings, int64 indices and ``sentences`` (split -> list of str); ``source`` is the absolute
    directory. ``dim``: the required embedding width (``None``: whatever the files agree on).
    """
    directory = absolute(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: split directory not found")
    present = split_files_present(directory)
    missing = [f"{name}.pt" for name in SPLIT_NAMES if f"{name}.pt" not in present]
    if missing:
        raise DataError(f"{directory}: missing {', '.join(missing)} (the directory has: "
                        f"{', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'})")
    loaded = {name: load_split_file(directory / f"{name}.pt", name, dim) for name in SPLIT_NAMES}
    arrays = {name: item[0] for name, item in loaded.items()}
    check_same_dim(arrays, str(directory))
    labels = {name: item[3] for name, item in loaded.items()}
    if len(set(labels.values())) > 1:
        raise DataError(f"{directory}: key 'size' differs between the split files: {labels}")
    return Splits(
        train=arrays["train"], val=arrays["val"], test=arrays["test"],
        train_indices=loaded["train"][1], val_indices=loaded["val"][1], test_indices=loaded["test"][1],
        source=str(directory), sentences={name: item[2] for name, item in loaded.items()}, size=labels["train"],
    )


def load_splits_root(root: str | os.PathLike, dim: int | None = None) -> SplitsRoot:
    """Every complete size directory under a ``splits/`` root; sizes missing split files are listed in
    ``incomplete``. Raises DataError when no size is complete (naming what each one lacks) or any file is bad."""
    root = absolute(root)
    sizes, incomplete = {}, {}
    for label in SIZE_LABELS:
        directory = root / label
        if not directory.is_dir():
            continue
        present = split_files_present(directory)
        if len(present) < len(SPLIT_NAMES):
            lacking = [f"{name}.pt" for name in SPLIT_NAMES if f"{name}.pt" not in present]
            incomplete[label] = f"missing {', '.join(lacking)} (has {', '.join(present) or 'no split files'})"
            continue
        sizes[label] = replace(load_split_dir(directory, dim), size=label)  # the directory decides
    if not sizes:
        details = "; ".join(f"{label}: {why}" for label, why in incomplete.items())
        raise DataError(f"{root}: no complete size directory ({details or 'no 1k, 5k, 10k or full directory'})")
    return SplitsRoot(sizes=sizes, source=str(root), incomplete=incomplete)


def load_split_file(path: Path, name: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """One split file -> ((N, dim) float32 embeddings, (N,) int64 indices, N sentences, size label), every key
    validated."""
    obj = torch_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict with keys {', '.join(SPLIT_FILE_KEYS)}, got {type(obj).__name__}")
    absent = [key for key in SPLIT_FILE_KEYS if key not in obj]
    if absent:
        raise DataError(f"{path}: missing key {', '.join(repr(k) for k in absent)} (keys: {sorted(map(str, obj))})")
    embeddings = _embeddings(path, obj["embeddings"], dim)
    rows = embeddings.shape[0]
    sentences = _sentences(path, obj["instructions"], rows)
    indices = _indices(path, obj["indices"], rows)
    if not isinstance(obj["split"], str) or obj["split"] != name:
        raise DataError(f"{path}: key 'split' is {obj['split']!r} but the file is the {name!r} split")
    if not isinstance(obj["size"], str) or obj["size"] not in SIZE_LABELS:
        raise DataError(f"{path}: key 'size' is {obj['size']!r}, not a known label ({', '.join(SIZE_LABELS)})")
    return embeddings, indices, sentences, obj["size"]


def _embeddings(path: Path, value: object, dim: int | None) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{path}: key 'embeddings' is a {type(value).__name__}, expected a float tensor (N, dim)")
    if not value.is_floating_point():
        raise DataError(f"{path}: key 'embeddings' must be floating point, got dtype {value.dtype}")
    if value.ndim != 2 or value.shape[0] < 1:
        raise DataError(f"{path}: key 'embeddings' must be (N, dim) with N >= 1, got shape {tuple(value.shape)}")
    if dim is not None and value.shape[1] != dim:
        raise DataError(f"{path}: key 'embeddings' has wrong dim: expected {dim}, got {value.shape[1]}")
    array = value.detach().to(device="cpu", dtype=torch.float32).numpy()
    bad, first = scan_nonfinite_rows(array, chunk_rows=65536)
    if bad:
        raise DataError(f"{path}: key 'embeddings': {bad} of {array.shape[0]} rows contain NaN or inf "
                        f"(first row indices: {', '.join(map(str, first))})")
    return array


def _sentences(path: Path, value: object, rows: int) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{path}: key 'instructions' is a {type(value).__name__}, expected a list of {rows} str")
    wrong = next((i for i, item in enumerate(value) if not isinstance(item, str)), None)
    if wrong is not None:
        raise DataError(f"{path}: key 'instructions' must hold str, item {wrong} is a {type(value[wrong]).__name__}")
    if len(value) != rows:
        raise DataError(f"{path}: key 'instructions' has {len(value)} items but 'embeddings' has {rows} rows")
    return list(value)


def _indices(path: Path, value: object, rows: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        integral = not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        if not integral or value.ndim != 1:
            raise DataError(f"{path}: key 'indices' must be a 1-D list of int, got a tensor {value.dtype} "
                            f"{tuple(value.shape)}")
        array = value.numpy().astype(np.int64)
    elif isinstance(value, (list, tuple)):
        wrong = next((i for i, item in enumerate(value) if not isinstance(item, int) or isinstance(item, bool)), None)
        if wrong is not None:
            raise DataError(f"{path}: key 'indices' must hold int, item {wrong} is a {type(value[wrong]).__name__}")
        array = np.asarray(value, dtype=np.int64).reshape(-1)
    else:
        raise DataError(f"{path}: key 'indices' is a {type(value).__name__}, expected a list of {rows} int")
    if array.shape[0] != rows:
        raise DataError(f"{path}: key 'indices' has {array.shape[0]} items but 'embeddings' has {rows} rows")
    values, counts = np.unique(array, return_counts=True)
    if (counts > 1).any():
        repeated = values[counts > 1]
        raise DataError(f"{path}: key 'indices' has duplicates: {repeated.size} ids appear more than once "
                        f"(first: {', '.join(map(str, repeated[:5]))})")
    if array.size and array.min() < 0:
        raise DataError(f"{path}: key 'indices' must be >= 0, got {int(array.min())}")
    return array
