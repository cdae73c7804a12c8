"""The saved split sets under one directory, and the rows a training run with a given ``dataset`` uses.

Two layouts, told apart by which manifest is present:

- one split set (``splits.json`` in the directory): from the synthetic generator, an embeddings file or one size
  directory. A run with ``dataset`` 1k / 5k / 10k trains on the first N train rows; val and test are the set's.
- one set per size (``sizes.json`` in the directory, a set in each ``<size>/``): from a ``splits/`` root. A run
  with ``dataset`` = a size uses that size's own train, val and test splits, as given.

:func:`store_splits` writes either layout and removes the other one's manifest, so the two never mix.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from flow_pipeline.core.atomic import write_bytes_atomic
from flow_pipeline.core.data import DataError, DatasetChoiceError
from flow_pipeline.core.data.files import absolute
from flow_pipeline.core.data.split_files import SplitsRoot
from flow_pipeline.core.data.split_set import MANIFEST_NAME, load_saved_splits, load_sentences, save_splits
from flow_pipeline.core.data.splits import DATASET_SIZES, Splits

SIZES_MANIFEST = "sizes.json"


@dataclass(frozen=True)
class RunSplits:
    """The data of a run with one ``dataset``: ``splits.train`` / ``train_indices`` hold only the training rows it
    uses. set_dir: the saved set they come from; subset: one line saying which rows (for metadata and identity)."""

    splits: Splits
    set_dir: Path
    dataset: str
    subset: str


def store_splits(data: Splits | SplitsRoot, directory: str | os.PathLike) -> Path:
    """Save one split set, or every size of a root (one set per ``<size>/`` plus ``sizes.json``), into
    ``directory``; returns the manifest written last. Each set is written atomically by :func:`~flow_pipeline.core.data.split_set.save_splits`."""
    directory = absolute(directory)
    # The new manifest switches readers over (sizes.json wins over splits.json); the old layout goes after that.
    if isinstance(data, Splits):
        manifest = save_splits(data, directory)
        (directory / SIZES_MANIFEST).unlink(missing_ok=True)
        _remove_size_dirs(directory, keep=())
        return manifest
    directory.mkdir(parents=True, exist_ok=True)
    for label, splits in data.sizes.items():
        save_splits(splits, directory / label)
    index = {"format_version": 1, "source": data.source, "sizes": list(data.sizes), "incomplete": data.incomplete}
    write_bytes_atomic(directory / SIZES_MANIFEST, json.dumps(index, indent=2).encode())
    (directory / MANIFEST_NAME).unlink(missing_ok=True)  # the single set this replaces
    for stale in directory.glob("*.npy"):
        stale.unlink()
    for stale in directory.glob("*.jsonl"):
        stale.unlink()
    _remove_size_dirs(directory, keep=tuple(data.sizes))
    return directory / SIZES_MANIFEST


def stored_sizes(directory: str | os.PathLike) -> dict | None:
    """The ``sizes.json`` index of a per-size store (sizes, incomplete, source), or ``None`` for one split set."""
    path = absolute(directory) / SIZES_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: malformed sizes manifest: {exc}") from exc


def load_run_splits(directory: str | os.PathLike, dataset: str) -> RunSplits:
    """The splits a run with ``dataset`` (1k, 5k, 10k, full) trains, validates and is evaluated on.

    Per-size store: that size's own set (an error lists the sizes the store has, and what incomplete ones lack).
    One split set: its val and test, and the first N train rows (an error when the train split has fewer); all of
    them for ``full``, and for the set's own size label when it came from one size directory (a ``1k`` directory
    holds 800 train rows: ``dataset: 1k`` is that whole set).
    Embeddings stay memory-mapped.
    """
    if dataset not in DATASET_SIZES:
        raise DatasetChoiceError(f"dataset: unknown value {dataset!r}; valid: {', '.join(DATASET_SIZES)}")
    directory = absolute(directory)
    index = stored_sizes(directory)
    if index is not None:
        if dataset not in index["sizes"]:
            lacking = "".join(f"; {label}: {why}" for label, why in index.get("incomplete", {}).items())
            raise DatasetChoiceError(f"dataset: {dataset!r} is not in the splits root {index['source']}: it has "
                            f"{', '.join(index['sizes'])}{lacking}")
        set_dir = directory / dataset
        splits = load_saved_splits(set_dir)
        subset = f"size {dataset} of {index['source']}: its own {splits.train.shape[0]} train rows"
        return RunSplits(splits, set_dir, dataset, subset)
    splits = load_saved_splits(directory)
    n_train, n = splits.train.shape[0], DATASET_SIZES[dataset]
    if n is None or dataset == splits.size:
        return RunSplits(splits, directory, dataset, f"all {n_train} train rows of {splits.source}")
    if n_train < n:
        raise DatasetChoiceError(f"dataset: {dataset!r} needs {n} training rows, the train split of {splits.source} has "
                        f"{n_train}")
    subset = replace(splits, train=splits.train[:n], train_indices=splits.train_indices[:n])
    return RunSplits(subset, directory, dataset, f"first {n} of {n_train} train rows of {splits.source}")


def training_rows(directory: str | os.PathLike, dataset: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """The training rows a run with ``dataset`` used: ((n, dim) embeddings, memory-mapped; (n,) int64 row ids;
    their n sentences, or ``None`` when the source had no text). For memorisation checks and showing text."""
    run = load_run_splits(directory, dataset)
    n = run.splits.train.shape[0]
    sentences = load_sentences(run.set_dir, "train")
    return run.splits.train, run.splits.train_indices, None if sentences is None else sentences[:n]


def _remove_size_dirs(directory: Path, keep: tuple[str, ...]) -> None:
    """Delete size subdirectories of an earlier per-size store that the new contents do not have."""
    for label in DATASET_SIZES:
        if label not in keep and (directory / label / MANIFEST_NAME).exists():
            shutil.rmtree(directory / label)


def first_training_rows(train, dataset: str):
    """The first N rows of a train split (array or tensor) for ``dataset`` (``1k``, ``5k``, ``10k``; ``full`` keeps
    all): the subset rule for sources that are one split set. Raises ValueError naming the dataset when the split
    has fewer than N rows."""
    if dataset not in DATASET_SIZES:
        raise ValueError(f"dataset: unknown value {dataset!r}; valid: {', '.join(DATASET_SIZES)}")
    n = DATASET_SIZES[dataset]
    if n is None:
        return train
    if train.shape[0] < n:
        raise ValueError(f"dataset={dataset!r} needs {n} training rows, the train split has {train.shape[0]}")
    return train[:n]
