"""The ``gaussian-mixture`` reference of one evaluation's data (:mod:`flow_pipeline.core.mixture_baseline`), fitted
once per inputs.

Its EM fit takes minutes on the built-in data and does not depend on the model, so it is kept in the reference cache
as ``<key>.gaussian-mixture.npz`` beside the reference rows' ``<key>.json``, under the same key
(:func:`~flow_pipeline.evaluation.references.references_key`: the rows and the source of the code, the mixture's
included), and every later evaluation on the same inputs reads it back for its sample row and its likelihood. Without
val rows (nothing to choose K on) or with too few training rows it is skipped, and the note says why.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flow_pipeline.core.atomic import write_atomic_with
from flow_pipeline.core.mixture_baseline import MIXTURE, MixtureBaseline, MixtureDataError, fit_mixture_baseline


@dataclass(frozen=True)
class MixtureReference:
    """The fitted mixture, or None when it was skipped; note: what was chosen on val, or why it was skipped."""

    baseline: MixtureBaseline | None
    note: str


def _path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"{key}.{MIXTURE}.npz"


def _read(path: Path) -> MixtureBaseline | None:
    """The mixture kept at ``path``, or None when it is missing or damaged (every array is read here)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return MixtureBaseline.from_arrays({name: stored[name] for name in stored.files})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def mixture_reference(train_rows, val, cache_dir=None, key: str | None = None) -> MixtureReference:
    """The mixture fitted to the run's ``train_rows`` (n, dim), K and r chosen on ``val`` (m, dim) or None. With a
    ``cache_dir`` and the inputs' ``key``: read from there when an earlier evaluation fitted it, else fitted and
    written there (atomically). Skipped, with the reason as the note, without val rows or with too few rows."""
    path = None if cache_dir is None or key is None else _path(cache_dir, key)
    stored = None if path is None else _read(path)
    if stored is not None:
        return MixtureReference(stored, stored.note())
    try:
        baseline = fit_mixture_baseline(train_rows, val)
    except MixtureDataError as exc:
        return MixtureReference(None, f"skipped: {exc}")
    if path is not None:
        write_atomic_with(path, lambda handle: np.savez(handle, **baseline.arrays()))
    return MixtureReference(baseline, baseline.note())
