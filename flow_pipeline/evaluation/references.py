"""Reference rows scored beside every model: held-out real rows (the level to reach), the closed-form Gaussian
baselines fitted to the run's training rows (the level to beat) and the Gaussian mixture fitted to them by EM (the
stronger level to beat, :mod:`flow_pipeline.evaluation.mixture_reference`), with the same metrics, n and seed as the
model.

They do not depend on the model, so :func:`cached_references` scores them once per inputs and keeps them as a JSON
file named by the sha256 of everything they are computed from: the training, test and val rows, n, seed, k and
the source of the code that computes them. Every partition evaluated on the same data reuses that file; changed
rows or changed metric code give another name, so a stale file is never read. Beside it, under the same key,
``<key>.real-side.npz`` keeps the costly half of :meth:`RealSide.prepare` (FD's covariance roots, K_yy's reductions,
the real k-NN radii), so a warm evaluation pays only for its own samples.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flow_pipeline import artifacts
from flow_pipeline.core import baselines, metrics, mixture_baseline
from flow_pipeline.core.data import stats
from flow_pipeline.core.atomic import write_atomic_with
from flow_pipeline.core.baselines import BASELINES, fit_baseline
from flow_pipeline.core.metrics.distances import subsample
from flow_pipeline.core.metrics.real_side import RealSide
from flow_pipeline.core.metrics.two_sample import two_sample_scores
from flow_pipeline.core.mixture_baseline import MIXTURE
from flow_pipeline.evaluation.mixture_reference import MixtureReference, mixture_reference

HELD_OUT_REAL = "held-out real (val)"
REFERENCES = (HELD_OUT_REAL, *BASELINES, MIXTURE)


@dataclass
class ReferenceEvaluation:
    """Metrics of one reference sample set (see :func:`flow_pipeline.core.metrics.real_side.evaluate_samples`)."""

    name: str
    n: int
    seconds: float
    metrics: dict[str, float]
    note: str = ""
    cached: bool = False  # read from the reference cache (seconds: the time it took when it was computed)


def reference_samples(name: str, train_rows, val: np.ndarray, n: int, seed: int,
                      mixture: MixtureReference) -> tuple[np.ndarray, str]:
    """(samples (<= n, dim), note) of one reference: ``n`` val rows drawn with ``seed`` (all of them, with a note,
    when val has fewer), or ``n`` draws of a baseline fitted to the run's training rows (``mixture``: the fitted
    gaussian-mixture; none, (0, dim), with its note when it was skipped)."""
    if name == HELD_OUT_REAL:
        rows = subsample(val, n, np.random.default_rng(seed))
        note = "" if rows.shape[0] == n else f"val has {rows.shape[0]} rows < n = {n}: scored at that size"
        return np.asarray(rows, dtype=np.float64), note
    if name == MIXTURE:
        if mixture.baseline is None:
            return np.empty((0, val.shape[1])), mixture.note
        return mixture.baseline.sample(n, seed), mixture.note
    baseline = fit_baseline(name, train_rows, val)
    note = baseline_note(baseline)
    return baseline.sample(n, seed), note


def baseline_note(baseline) -> str:
    """How a fitted baseline's free choice was made, for its reference row."""
    if baseline.shrinkage is None:
        return ""
    how = "chosen on the val rows' likelihood" if baseline.chosen_on_val else "Ledoit–Wolf"
    return f"shrinkage {baseline.shrinkage:.3f} ({how})"


def score_references(side: RealSide, val: np.ndarray, mixture: MixtureReference | None = None,
                     ) -> list[ReferenceEvaluation]:
    """Every reference of :data:`REFERENCES`, scored against test exactly like the model's samples: with the same
    prepared real side (n, seed, k, copy threshold, train-normalised space; its training rows fit the baselines).
    A held-out set with fewer than n rows is scored at its own size, with the same threshold and space; a skipped
    mixture is a row with no metrics and its note. ``mixture``: fitted here when not given."""
    mixture = mixture or mixture_reference(side.train, val)
    results = []
    for name in REFERENCES:
        start = time.perf_counter()
        samples, note = reference_samples(name, side.train, val, side.n, side.seed, mixture)
        if samples.shape[0] == 0:
            results.append(ReferenceEvaluation(name, 0, 0.0, {}, note))
            continue
        if samples.shape[0] == side.n:
            scores = side.score(samples)
        else:
            scores = metrics.evaluate_samples(samples, side.train, side.test, k=side.k, seed=side.seed,
                                       train_copy_threshold=side.threshold, train_space=side.space)
        scores.update(two_sample_scores(samples, side.test_n, side.space, side.seed))
        results.append(ReferenceEvaluation(name, samples.shape[0], time.perf_counter() - start, scores, note))
    return results


# The code the reference rows are computed by: its source is part of the cache key (every metrics module).
_SCORING_SOURCES = (baselines.__file__, mixture_baseline.__file__, stats.__file__,
                    *sorted(str(path) for path in Path(metrics.__file__).parent.glob("*.py")))
CACHE_ROWS_PER_CHUNK = 8192


def references_key(train, test, val, n: int, seed: int, k: int) -> str:
    """sha256 of the reference rows' inputs: the run's training rows, test, val, n, seed, k, the reference names and
    the source of the scoring code. Rows are hashed in chunks (a memory-mapped split is never loaded whole), each
    split with its shape and dtype."""
    digest = hashlib.sha256()
    for source in (*_SCORING_SOURCES, __file__):
        digest.update(Path(source).read_bytes())
    digest.update(json.dumps({"n": n, "seed": seed, "k": k, "references": REFERENCES}).encode())
    for name, rows in (("train", train), ("test", test), ("val", val)):
        digest.update(f"{name} {tuple(rows.shape)} {np.dtype(rows.dtype).str}".encode())
        for chunk in stats.row_chunks(rows, CACHE_ROWS_PER_CHUNK):
            digest.update(np.ascontiguousarray(chunk).tobytes())
    return digest.hexdigest()


@dataclass
class CachedReferences:
    """A cache file's content: the scored reference rows and the copy threshold of the same inputs (so that an
    evaluation that finds them skips the threshold's scan of the training rows too)."""

    rows: list[ReferenceEvaluation]
    copy_threshold: float


def read_cached(cache_dir: Path, key: str) -> CachedReferences | None:
    """``cache_dir/<key>.json``, or None when it is missing, unreadable or not a complete reference set."""
    try:
        content = json.loads((Path(cache_dir) / f"{key}.json").read_text())
        rows = [ReferenceEvaluation(**{**entry, "cached": True}) for entry in content["references"]]
        threshold = float(content["copy_threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return CachedReferences(rows, threshold) if [row.name for row in rows] == list(REFERENCES) else None


def _statistics_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.real-side.npz"


def read_side_statistics(cache_dir: Path, key: str) -> dict[str, np.ndarray] | None:
    """The :meth:`RealSide.statistics` an earlier evaluation on the same inputs kept in ``cache_dir``
    (:func:`write_side_statistics`), or None when missing or damaged (every array is read, so a torn file fails its
    zip checksum here, not later)."""
    try:
        with np.load(_statistics_path(cache_dir, key), allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def write_side_statistics(cache_dir: Path, key: str, side: RealSide) -> None:
    """Keep ``side.statistics()`` under ``key`` in ``cache_dir`` (atomically), for the next evaluation on the same
    inputs to skip the costly half of :meth:`RealSide.prepare`."""
    write_atomic_with(_statistics_path(cache_dir, key), lambda handle: np.savez(handle, **side.statistics()))


def cached_references(side: RealSide, val, cache_dir: Path | None, key: str | None = None,
                      mixture: MixtureReference | None = None) -> list[ReferenceEvaluation]:
    """:func:`score_references`, read from ``cache_dir/<key>.json`` when an earlier evaluation on the same inputs
    wrote it, else scored and written there (atomically). ``key``: :func:`references_key` of the side's rows and
    val, when the caller has it already. ``mixture``: the fitted gaussian-mixture when the caller has it, else read
    from or fitted into the same cache (:func:`~flow_pipeline.evaluation.mixture_reference.mixture_reference`).
    ``cache_dir`` None: always scored, nothing written."""
    if cache_dir is None:
        return score_references(side, val, mixture)
    key = key or references_key(side.train, side.test, val, side.n, side.seed, side.k)
    cached = read_cached(cache_dir, key)
    if cached is not None:
        return cached.rows
    results = score_references(side, val, mixture or mixture_reference(side.train, val, cache_dir, key))
    artifacts.write_json(Path(cache_dir) / f"{key}.json", {
        "key": key, "n": side.n, "seed": side.seed, "k": side.k, "copy_threshold": side.threshold,
        "references": [{**asdict(row), "cached": False} for row in results]})
    return results
