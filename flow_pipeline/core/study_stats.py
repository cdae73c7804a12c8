"""Statistics of a replicated ablation study: confidence intervals over seeds, comparisons against a baseline row
with Holm's correction across comparisons, and the plain-word verdict the report prints.

Pure (NumPy/SciPy). Every sample is one number per replicate (seed) of one run identity. A replicate whose value is
non-finite (the ranking KID is +inf for a copying model; NaN for a failed evaluation) is kept: it counts in n, makes
its row's mean the worst value, and moves the comparison to a rank test in which it ranks worst.
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
NEVER_BETTER = "not better: {k} of {n} replicates non-finite"
PAIRED_T, WELCH_T = "paired t", "Welch t"
SIGN_CONSTANT = "sign test (constant difference across replicates)"
SIGN_NONFINITE, RANKS_NONFINITE = "sign test (non-finite ranked worst)", "Mann–Whitney U (non-finite ranked worst)"
RANKS_CONSTANT = "Mann–Whitney U (no spread within rows)"
# Values whose spread is below this fraction of their magnitude are constant up to float round-off: a t statistic
# over them is round-off divided by round-off (p ≈ 1e-16 for a difference that has no spread at all).
CONSTANT_TOLERANCE = 1e-9
METHOD = ("mean ± half-width of the 95% Student-t interval over replicates (seeds); against the baseline: difference "
          "of means with its 95% CI, paired t-test when both rows have the same seeds, Welch's t-test otherwise, "
          "p-values Holm-corrected across the rows compared, α = 0.05. A replicate with a non-finite value (+inf "
          "ranking KID of a copying model, a failed evaluation) stays in its row: the row's mean is the worst value, "
          "the test becomes a rank test with that replicate ranked worst (sign test on shared seeds, Mann–Whitney U "
          "otherwise), and the row is never called better. A paired difference that is the same on every seed gets "
          "the exact sign test (a t-test has no spread to work with); rows without spread on different seeds get "
          "Mann–Whitney U")


# Strict JSON has no inf or NaN: non-finite metric values travel as these strings.
NONFINITE_CODES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode_value(value: float) -> float | str:
    """A metric value for strict JSON: a finite value as a float, a non-finite one as "inf", "-inf" or "nan"."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def decode_value(value) -> float:
    """The float that :func:`encode_value` encoded; None (what older metadata stored for a non-finite value) reads
    as NaN, so that the replicate still counts."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        if value not in NONFINITE_CODES:
            raise ValueError(f"metric value {value!r} is neither a number nor one of {', '.join(NONFINITE_CODES)}")
        return NONFINITE_CODES[value]
    return float(value)


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided t-interval [low, high]; NaN bounds when n < 2 or when ``n_nonfinite``
    of the values are non-finite (then the mean is the worst value, see :func:`replicate_interval`)."""

    mean: float
    low: float
    high: float
    n: int
    n_nonfinite: int = 0

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
    if np.all(x == x[0]):  # zero spread: the interval collapses to the mean
        return Interval(mean, mean, mean, int(x.size))
    low, high = stats.t.interval(confidence, df=x.size - 1, loc=mean, scale=stats.sem(x))
    return Interval(mean, float(low), float(high), int(x.size))


def worst_value(lower_is_better: bool) -> float:
    """The value that ranks below every other: +inf when lower is better, -inf otherwise."""
    return math.inf if lower_is_better else -math.inf


def replicate_interval(values, lower_is_better: bool, confidence: float = CONFIDENCE) -> Interval:
    """:func:`t_interval` of ``values`` (1-d); when any is non-finite (inf or NaN), the worst value as the mean, no
    interval, and the count of non-finite values, so that the row ranks last and says why."""
    x = np.asarray(values, dtype=np.float64)
    n_nonfinite = int(np.sum(~np.isfinite(x)))
    if n_nonfinite == 0:
        return t_interval(x, confidence)
    return Interval(worst_value(lower_is_better), math.nan, math.nan, int(x.size), n_nonfinite)


@dataclass(frozen=True)
class Comparison:
    """``row - baseline`` of one metric: difference of means (non-finite values replaced by the worst value, NaN when
    both sides have them), its CI (NaN where the test gives none), the test used, its (raw) p-value, the direction the
    test found (-1: row lower, +1: row higher, 0: neither), and the row's replicate count and non-finite count."""

    difference: float
    low: float
    high: float
    p_value: float
    test: str  # one of the test names above, or "" (not testable)
    direction: int = 0
    n: int = 0
    n_nonfinite: int = 0


def _constant(values: np.ndarray, scale: float) -> bool:
    return bool(np.ptp(values) <= CONSTANT_TOLERANCE * scale)


def _sign(value: float) -> int:
    return 0 if math.isnan(value) or value == 0 else (1 if value > 0 else -1)


def _sign_test(differences: np.ndarray) -> tuple[float, int]:
    """Exact two-sided sign test of paired differences (NaN or 0: ties, dropped): (p, direction of the majority)."""
    higher, lower = int(np.sum(differences > 0)), int(np.sum(differences < 0))
    if higher + lower == 0:
        return 1.0, 0
    return float(stats.binomtest(higher, higher + lower, 0.5).pvalue), _sign(higher - lower)


def _rank_test(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Two-sided Mann–Whitney U of a against b (inf values rank at their ends): (p, direction of a). The p-value is
    the permutation one (exact over every split up to 9,999 of them, else seeded resampling): the normal
    approximation scipy falls back to with ties is far off at a few replicates per row."""
    method = stats.PermutationMethod(n_resamples=9999, rng=np.random.default_rng(0))
    result = stats.mannwhitneyu(a, b, alternative="two-sided", method=method)
    return float(result.pvalue), _sign(float(result.statistic) - a.size * b.size / 2)


def compare(row: dict[int, float], baseline: dict[int, float], confidence: float = CONFIDENCE,
            lower_is_better: bool = True) -> Comparison:
    """Compare a row's replicates with the baseline's, each ``{seed: value}``. Same seed sets (≥ 2): paired t-test
    on the per-seed differences (the seed fixes init, batches and noise, so the pairing removes their share of the
    variance); otherwise Welch's t-test. Fewer than two values on a side: not testable (NaN p-value).

    Non-finite values are replaced by :func:`worst_value` and the test is a rank test (exact sign test on shared
    seeds, Mann–Whitney U otherwise). Differences constant across seeds (up to round-off) get the exact sign test;
    two rows each without spread on different seeds get Mann–Whitney U: neither leaves a t statistic to compute."""
    paired = set(row) == set(baseline)
    a_raw = np.array([row[s] for s in sorted(row)] if paired else list(row.values()), float)
    b_raw = np.array([baseline[s] for s in sorted(row)] if paired else list(baseline.values()), float)
    a, b = (np.where(np.isfinite(x), x, worst_value(lower_is_better)) for x in (a_raw, b_raw))
    with np.errstate(invalid="ignore"):  # inf - inf: both sides have a worst value, the difference is undefined
        difference, d = float(a.mean() - b.mean()), (a - b if paired else None)
    counts = dict(n=int(a.size), n_nonfinite=int(np.sum(~np.isfinite(a_raw))))
    if a.size < 2 or b.size < 2:
        return Comparison(difference, math.nan, math.nan, math.nan, "", _sign(difference), **counts)
    nonfinite = not np.all(np.isfinite(np.concatenate([a_raw, b_raw])))
    scale = 0.0 if nonfinite else float(np.max(np.abs(np.concatenate([a, b]))))
    if paired and (nonfinite or _constant(d, scale)):
        (p, direction), test = _sign_test(d), SIGN_NONFINITE if nonfinite else SIGN_CONSTANT
        return Comparison(difference, math.nan, math.nan, p, test, direction, **counts)
    if not paired and (nonfinite or (_constant(a, scale) and _constant(b, scale))):
        (p, direction), test = _rank_test(a, b), RANKS_NONFINITE if nonfinite else RANKS_CONSTANT
        return Comparison(difference, math.nan, math.nan, p, test, direction, **counts)
    result = stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Comparison(difference, float(ci.low), float(ci.high), float(result.pvalue), PAIRED_T if paired else WELCH_T,
                      _sign(difference), **counts)


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
    """"better" / "worse" than the baseline when the Holm-adjusted p-value is below ``alpha`` (in the direction the
    test found), else "no detectable difference"; :data:`NOT_TESTABLE` without replicates. A row with a non-finite
    replicate is never "better" (:data:`NEVER_BETTER` where its test alone would say so)."""
    if math.isnan(adjusted_p):
        return NOT_TESTABLE
    if adjusted_p >= alpha or comparison.direction == 0:
        return NO_DIFFERENCE
    if (comparison.direction < 0) != lower_is_better:
        return WORSE
    if comparison.n_nonfinite:
        return NEVER_BETTER.format(k=comparison.n_nonfinite, n=comparison.n)
    return BETTER


def compare_rows(rows: dict[str, dict[int, float]], baseline: str, lower_is_better: bool,
                 alpha: float = ALPHA) -> dict[str, tuple[Comparison, float, str]]:
    """Every row but the baseline against it: ``name -> (comparison, Holm-adjusted p, verdict)``; the Holm family
    is the set of rows compared here."""
    if baseline not in rows:
        raise ValueError(f"baseline row {baseline!r} is not among the rows: {', '.join(sorted(rows))}")
    names = [name for name in rows if name != baseline]
    comparisons = [compare(rows[name], rows[baseline], lower_is_better=lower_is_better) for name in names]
    adjusted = holm([c.p_value for c in comparisons])
    return {name: (c, p, verdict(c, p, lower_is_better, alpha)) for name, c, p in zip(names, comparisons, adjusted)}
