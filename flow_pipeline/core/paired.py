"""Paired per-row comparisons of log-densities on the same test rows: model against a baseline, and against the
known truth (KL).

Every test row is scored by both sides, so the per-row differences carry the comparison and their mean's Student-t
interval says whether it is detectable; the rows are independent draws, so no assumption on the models is needed.
Pure NumPy/SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

from flow_pipeline.core.study_stats import BETTER, CONFIDENCE, NO_DIFFERENCE, WORSE, t_interval

NOT_TESTABLE = "not testable"
DIFFERS_FROM_TRUTH = "differs from the truth"


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-row differences a - b over ``n`` rows, its 95% Student-t interval [low, high] and verdict:
    "better" (low > 0: a scores higher), "worse" (high < 0), "no detectable difference", or "not testable" (n < 2).
    Infinite differences (a log-density of -inf on some row) give an infinite mean and a collapsed interval."""

    mean: float
    low: float
    high: float
    n: int
    verdict: str

    def as_dict(self, prefix: str) -> dict[str, float | str | int]:
        """``{prefix: mean, prefix_ci_low, prefix_ci_high, prefix_verdict, prefix_rows}``, for metadata."""
        return {prefix: self.mean, f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high,
                f"{prefix}_verdict": self.verdict, f"{prefix}_rows": self.n}


def _rows(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array of per-row values, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} has NaN values in {int(np.isnan(array).sum())} rows")
    return array


def paired_difference(a, b, confidence: float = CONFIDENCE) -> PairedDifference:
    """Per-row a - b for a, b (n,) scored on the same rows (e.g. log p_model and log p_gaussian): mean, interval
    and verdict. Raises ValueError for arrays of different lengths or with NaN."""
    a, b = _rows(a, "a"), _rows(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired rows differ in number: a has {a.size}, b has {b.size}")
    with np.errstate(invalid="ignore"):
        difference = a - b
    if np.isnan(difference).any():  # inf - inf: both sides give the row zero (or infinite) density
        raise ValueError("a - b is undefined (inf - inf) on some rows")
    if not np.isfinite(difference).all():  # +inf and -inf rows together make the mean NaN: not testable
        mean = float(difference.mean())
        return PairedDifference(mean, mean, mean, a.size, NOT_TESTABLE if math.isnan(mean) else _verdict(mean, mean))
    if a.size >= 2 and np.all(difference == difference[0]):  # no spread: the same shift on every row
        mean = float(difference[0])
        return PairedDifference(mean, mean, mean, a.size, _verdict(mean, mean))
    interval = t_interval(difference, confidence)
    if interval.n < 2:
        return PairedDifference(interval.mean, math.nan, math.nan, 1, NOT_TESTABLE)
    return PairedDifference(interval.mean, interval.low, interval.high, interval.n,
                            _verdict(interval.low, interval.high))


def _verdict(low: float, high: float) -> str:
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NO_DIFFERENCE


def kl_to_truth(log_p_true, log_p_model, confidence: float = CONFIDENCE) -> PairedDifference:
    """KL(truth || model) estimated on rows drawn from the truth: mean(log p_true - log p_model) (n,) with its
    interval (0 for the truth itself). Verdict: "differs from the truth" when the interval lies above 0, "no
    detectable difference" otherwise (a KL below 0 is only noise), "not testable" for n < 2."""
    kl = paired_difference(log_p_true, log_p_model, confidence)
    if kl.verdict in (NOT_TESTABLE, NO_DIFFERENCE):
        return kl
    return replace(kl, verdict=DIFFERS_FROM_TRUTH if kl.verdict == BETTER else NO_DIFFERENCE)


@dataclass(frozen=True)
class ClosedFraction:
    """1 - KL(model) / KL(reference) on the same rows, with a 95% delta-method interval [low, high]."""

    value: float
    low: float
    high: float
    n: int


def kl_closed_fraction(log_p_true, log_p_model, log_p_reference, confidence: float = CONFIDENCE) -> ClosedFraction:
    """The share of the reference's (``gaussian-full``'s) distance to the truth that the model closes:
    1 - mean(d_m) / mean(d_r) with d = log p_true - log p (n,) on the same truth-drawn rows. The interval is the
    delta method's for a ratio of paired means: se = std(d_m - r d_r) / (sqrt(n) |mean d_r|), r the ratio."""
    d_model = _rows(log_p_true, "log_p_true") - _rows(log_p_model, "log_p_model")
    d_reference = _rows(log_p_true, "log_p_true") - _rows(log_p_reference, "log_p_reference")
    if d_model.shape != d_reference.shape:
        raise ValueError(f"paired rows differ in number: {d_model.size} and {d_reference.size}")
    if not (np.isfinite(d_model).all() and np.isfinite(d_reference).all()) or d_reference.mean() <= 0:
        raise ValueError("kl_closed_fraction needs finite log-densities and a reference with KL > 0")
    ratio = d_model.mean() / d_reference.mean()
    n = d_model.size
    if n < 2:
        return ClosedFraction(float(1 - ratio), math.nan, math.nan, n)
    se = np.std(d_model - ratio * d_reference, ddof=1) / (math.sqrt(n) * d_reference.mean())
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * se)
    return ClosedFraction(float(1 - ratio), float(1 - ratio - half), float(1 - ratio + half), n)
