"""Statistics of a replicated ablation study: confidence intervals over seeds, comparisons against a baseline row
with Holm's correction across comparisons, and the plain-word verdict the report prints.

Pure (NumPy/SciPy). Every sample is one number per replicate (seed) of one run identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
CONFIDENCE = 0.95
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"
NOT_TESTABLE = "needs ≥ 2 replicates per row: no significance can be claimed"
METHOD = ("mean ± half-width of the 95% Student-t interval over replicates (seeds); against the baseline: difference "
          "of means with its 95% CI, paired t-test when both rows have the same seeds, Welch's t-test otherwise, "
          "p-values Holm-corrected across the rows compared, α = 0.05")


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided t-interval [low, high]; NaN bounds when n < 2."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` (1-d, finite) with the Student-t interval mean ± t_{(1+c)/2, n-1} · s / √n."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"t_interval: needs a non-empty 1-d array of finite values, got {values!r}")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, 1)
    low, high = stats.t.interval(confidence, df=x.size - 1, loc=mean, scale=stats.sem(x))
    if not math.isfinite(low):  # zero spread: the interval collapses to the mean
        low = high = mean
    return Interval(mean, float(low), float(high), int(x.size))


@dataclass(frozen=True)
class Comparison:
    """``row - baseline`` of one metric: difference of means, its CI, the test used and its (raw) p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    test: str  # "paired t" | "Welch t" | "" (not testable)


def compare(row: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE) -> Comparison:
    """Compare a row's replicates with the baseline's, each ``{seed: value}``. Same seed sets (≥ 2): paired t-test
    on the per-seed differences (the seed fixes init, batches and noise, so the pairing removes their share of the
    variance); otherwise Welch's t-test. Fewer than two values on a side: not testable (NaN p-value)."""
    a, b = np.array(list(row.values()), float), np.array(list(baseline.values()), float)
    difference = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Comparison(difference, math.nan, math.nan, math.nan, "")
    if set(row) == set(baseline):
        seeds = sorted(row)
        d = np.array([row[s] - baseline[s] for s in seeds])
        if np.all(d == d[0]):  # no spread in the differences: the t statistic is undefined
            p = 1.0 if d[0] == 0 else 0.0
            return Comparison(difference, difference, difference, p, "paired t")
        result = stats.ttest_rel([row[s] for s in seeds], [baseline[s] for s in seeds])
        test = "paired t"
    else:
        result = stats.ttest_ind(a, b, equal_var=False)
        test = "Welch t"
    ci = result.confidence_interval(confidence)
    return Comparison(difference, float(ci.low), float(ci.high), float(result.pvalue), test)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and is not counted): the k-th
    smallest of m is multiplied by (m - k + 1), made monotone non-decreasing, capped at 1."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def verdict(comparison: Comparison, adjusted_p: float, lower_is_better: bool, alpha: float = ALPHA) -> str:
    """"better" / "worse" than the baseline when the Holm-adjusted p-value is below ``alpha``, else
    "no detectable difference"; :data:`NOT_TESTABLE` without replicates."""
    if math.isnan(adjusted_p):
        return NOT_TESTABLE
    if adjusted_p >= alpha or comparison.difference == 0:
        return NO_DIFFERENCE
    return BETTER if (comparison.difference < 0) == lower_is_better else WORSE


def compare_rows(rows: dict[str, dict[int, float]], baseline: str, lower_is_better: bool,
                 alpha: float = ALPHA) -> dict[str, tuple[Comparison, float, str]]:
    """Every row but the baseline against it: ``name -> (comparison, Holm-adjusted p, verdict)``; the Holm family
    is the set of rows compared here."""
    if baseline not in rows:
        raise ValueError(f"baseline row {baseline!r} is not among the rows: {', '.join(sorted(rows))}")
    names = [name for name in rows if name != baseline]
    comparisons = [compare(rows[name], rows[baseline]) for name in names]
    adjusted = holm([c.p_value for c in comparisons])
    return {name: (c, p, verdict(c, p, lower_is_better, alpha)) for name, c, p in zip(names, comparisons, adjusted)}
