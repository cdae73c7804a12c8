"""Reference rows scored beside every model: held-out real rows (the level to reach) and the closed-form Gaussian
baselines fitted to the run's training rows (the level to beat), with the same metrics, n and seed as the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from flow_pipeline.core.baselines import BASELINES, fit_baseline
from flow_pipeline.core.distances import TrainSpace, subsample
from flow_pipeline.core.metrics import evaluate_samples

HELD_OUT_REAL = "held-out real (val)"
REFERENCES = (HELD_OUT_REAL, *BASELINES)


@dataclass
class ReferenceEvaluation:
    """Metrics of one reference sample set (see :func:`flow_pipeline.core.metrics.evaluate_samples`)."""

    name: str
    n: int
    seconds: float
    metrics: dict[str, float]
    note: str = ""


def reference_samples(name: str, train_rows, val: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, str]:
    """(samples (<= n, dim), note) of one reference: ``n`` val rows drawn with ``seed`` (all of them, with a note,
    when val has fewer), or ``n`` draws of a baseline fitted to the run's training rows."""
    if name == HELD_OUT_REAL:
        rows = subsample(val, n, np.random.default_rng(seed))
        note = "" if rows.shape[0] == n else f"val has {rows.shape[0]} rows < n = {n}: scored at that size"
        return np.asarray(rows, dtype=np.float64), note
    baseline = fit_baseline(name, train_rows)
    note = f"Ledoit–Wolf shrinkage {baseline.shrinkage:.3f}" if baseline.shrinkage is not None else ""
    return baseline.sample(n, seed), note


def score_references(train_rows, test: np.ndarray, val: np.ndarray, n: int, seed: int, k: int,
                     threshold: float, space: TrainSpace) -> list[ReferenceEvaluation]:
    """Every reference of :data:`REFERENCES`, scored against test exactly like the model's samples (same n, seed,
    k, copy threshold and train-normalised space)."""
    results = []
    for name in REFERENCES:
        start = time.perf_counter()
        samples, note = reference_samples(name, train_rows, val, n, seed)
        metrics = evaluate_samples(samples, train_rows, test, k=k, seed=seed, train_copy_threshold=threshold,
                                   train_space=space)
        results.append(ReferenceEvaluation(name, samples.shape[0], time.perf_counter() - start, metrics, note))
    return results
