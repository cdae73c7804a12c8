"""Study statistics against textbook formulas written out here (t quantiles from scipy.stats.t only)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from flow_pipeline.core.study_stats import (
    BETTER,
    NEVER_BETTER,
    NO_DIFFERENCE,
    NOT_TESTABLE,
    RANKS_CONSTANT,
    RANKS_NONFINITE,
    SIGN_CONSTANT,
    SIGN_NONFINITE,
    WORSE,
    compare,
    compare_rows,
    decode_value,
    encode_value,
    holm,
    replicate_interval,
    t_interval,
    verdict,
)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_t_interval_is_mean_plus_minus_t_quantile_times_standard_error(n):
    x = np.random.default_rng(n).normal(3.0, 0.5, n)
    half = student_t.ppf(0.975, n - 1) * math.sqrt(sum((v - sum(x) / n) ** 2 for v in x) / (n - 1)) / math.sqrt(n)
    interval = t_interval(x)
    assert interval.mean == pytest.approx(sum(x) / n)
    assert (interval.low, interval.high) == pytest.approx((sum(x) / n - half, sum(x) / n + half))
    assert interval.n == n


def test_one_replicate_has_no_interval_and_is_not_testable():
    interval = t_interval([1.5])
    assert interval.mean == 1.5 and math.isnan(interval.low) and math.isnan(interval.high)
    comparison = compare({0: 1.0}, {0: 2.0})
    assert math.isnan(comparison.p_value) and comparison.difference == -1.0
    result = compare_rows({"base": {0: 2.0}, "row": {0: 1.0}}, "base", lower_is_better=True)
    assert result["row"][2] == NOT_TESTABLE


def test_paired_t_test_on_shared_seeds_matches_the_formula():
    rng = np.random.default_rng(1)
    seeds = [0, 1, 2, 3, 4]
    base = {s: float(v) for s, v in zip(seeds, rng.normal(1.0, 1.0, 5))}
    row = {s: base[s] + float(e) for s, e in zip(seeds, rng.normal(0.3, 0.2, 5))}
    d = np.array([row[s] - base[s] for s in seeds])
    se = d.std(ddof=1) / math.sqrt(5)
    t_stat = d.mean() / se
    comparison = compare(row, base)
    assert comparison.test == "paired t"
    assert comparison.p_value == pytest.approx(2 * student_t.sf(abs(t_stat), 4))
    assert (comparison.low, comparison.high) == pytest.approx(
        (d.mean() - student_t.ppf(0.975, 4) * se, d.mean() + student_t.ppf(0.975, 4) * se))


def test_welch_t_test_on_different_seeds_matches_the_formula():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.0, 1.0, 4), rng.normal(0.5, 2.0, 6)
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 6
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 5)  # Welch-Satterthwaite
    t_stat = (a.mean() - b.mean()) / math.sqrt(va + vb)
    comparison = compare(dict(enumerate(a)), dict(enumerate(b, start=10)))
    assert comparison.test == "Welch t"
    assert comparison.difference == pytest.approx(a.mean() - b.mean())
    assert comparison.p_value == pytest.approx(2 * student_t.sf(abs(t_stat), df))
    half = student_t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (comparison.low, comparison.high) == pytest.approx((a.mean() - b.mean() - half, a.mean() - b.mean() + half))


def test_holm_matches_a_worked_example_and_brute_force():
    # m = 4: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> raised to 0.06 (monotone).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    p = list(np.random.default_rng(3).uniform(0, 0.2, 9))
    order = sorted(range(9), key=lambda i: p[i])
    rank = {i: r for r, i in enumerate(order)}  # 0-based rank
    expected = [min(1.0, max((9 - rank[j]) * p[j] for j in range(9) if rank[j] <= rank[i])) for i in range(9)]
    assert holm(p) == pytest.approx(expected)
    assert math.isnan(holm([0.01, math.nan])[1]) and holm([0.01, math.nan])[0] == 0.01


def test_verdicts_say_better_worse_or_no_difference_with_the_metric_direction():
    rng = np.random.default_rng(4)
    seeds = range(5)
    base = {s: 1.0 + 0.01 * float(e) for s, e in zip(seeds, rng.normal(size=5))}
    rows = {"base": base,
            "lower": {s: v - 0.5 + 0.01 * float(e) for (s, v), e in zip(base.items(), rng.normal(size=5))},
            "higher": {s: v + 0.5 + 0.01 * float(e) for (s, v), e in zip(base.items(), rng.normal(size=5))},
            "same": {s + 100: float(v) for s, v in zip(seeds, rng.normal(1.0, 0.01, 5))}}
    lower_better = compare_rows(rows, "base", lower_is_better=True)
    assert [lower_better[name][2] for name in ("lower", "higher", "same")] == [BETTER, WORSE, NO_DIFFERENCE]
    higher_better = compare_rows(rows, "base", lower_is_better=False)
    assert [higher_better[name][2] for name in ("lower", "higher")] == [WORSE, BETTER]
    with pytest.raises(ValueError, match="baseline row 'nope'"):
        compare_rows(rows, "nope", lower_is_better=True)


# ------------------------------------------------------------------ replicates that are non-finite, constant spreads


def two_sided_sign_p(higher: int, lower: int) -> float:
    """Exact two-sided sign test: twice the binomial tail of the minority count, capped at 1."""
    n = higher + lower
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(higher, lower) + 1)) / 2**n)


def test_a_copying_replicate_stays_in_its_row_and_the_row_is_not_called_better():
    """The issue's example: KIDs {0.002, 0.0021, +inf} against {0.010, 0.011, 0.012} on the same seeds."""
    rows = {"base": {0: 0.010, 1: 0.011, 2: 0.012}, "copying": {0: 0.002, 1: 0.0021, 2: math.inf}}
    interval = replicate_interval(list(rows["copying"].values()), lower_is_better=True)
    assert interval.mean == math.inf and interval.n == 3 and interval.n_nonfinite == 1
    comparison, p_holm, said = compare_rows(rows, "base", lower_is_better=True)["copying"]
    assert comparison.test == SIGN_NONFINITE and comparison.n == 3 and comparison.n_nonfinite == 1
    assert comparison.p_value == pytest.approx(two_sided_sign_p(higher=1, lower=2)) == p_holm
    assert comparison.difference == math.inf and said == NO_DIFFERENCE


def test_a_row_with_a_non_finite_replicate_is_never_better_but_can_be_worse():
    rng = np.random.default_rng(6)
    base = {s: float(v) for s, v in enumerate(rng.normal(1.0, 0.1, 10))}
    mostly_lower = {s: v - 0.5 for s, v in base.items()} | {9: math.nan}  # 9 lower, 1 failed (ranked worst)
    comparison = compare(mostly_lower, base)
    assert comparison.p_value == pytest.approx(two_sided_sign_p(higher=1, lower=9)) and comparison.p_value < 0.05
    assert comparison.direction == -1
    assert verdict(comparison, comparison.p_value, lower_is_better=True) == NEVER_BETTER.format(k=1, n=10)
    all_infinite = {s: math.inf for s in base}
    assert compare_rows({"base": base, "inf": all_infinite}, "base", lower_is_better=True)["inf"][2] == WORSE
    # Higher is better: a NaN ranks below every value, so an all-NaN row is worse, not better.
    all_nan = {s: math.nan for s in base}
    result = compare_rows({"base": base, "nan": all_nan}, "base", lower_is_better=False)["nan"]
    assert result[0].direction == -1 and result[2] == WORSE
    assert replicate_interval([0.5, math.nan], lower_is_better=False).mean == -math.inf


def test_non_finite_replicates_on_different_seeds_get_mann_whitney_with_them_ranked_worst():
    row, base = {0: 0.1, 1: math.inf, 2: 0.3}, {10: 0.2, 11: 0.25, 12: 0.4, 13: 0.5}
    comparison = compare(row, base)
    assert comparison.test == RANKS_NONFINITE
    # Exact null distribution of U over every way to pick the row's 3 ranks among 7 (no ties).
    pooled = sorted([0.1, math.inf, 0.3] + [0.2, 0.25, 0.4, 0.5])
    u = lambda picked: sum(a > b for a in picked for b in pooled if b not in picked)  # noqa: E731
    observed = u([0.1, math.inf, 0.3])
    null = [u(list(c)) for c in itertools.combinations(pooled, 3)]
    centre = 3 * 4 / 2
    expected = sum(abs(v - centre) >= abs(observed - centre) for v in null) / len(null)
    assert comparison.p_value == pytest.approx(expected)


def test_a_constant_paired_difference_gets_the_exact_sign_test_never_p_near_zero():
    rng = np.random.default_rng(7)
    for n in (2, 3, 6):
        base = {s: float(v) for s, v in enumerate(rng.uniform(0.1, 1.0, n))}
        shifted = {s: v - 0.05 for s, v in base.items()}  # the same difference up to float round-off
        comparison = compare(shifted, base)
        assert comparison.test == SIGN_CONSTANT
        assert comparison.p_value == pytest.approx(two_sided_sign_p(higher=0, lower=n))
        assert math.isnan(comparison.low) and comparison.direction == -1
    assert compare(dict(base), dict(base)).p_value == 1.0  # no difference at all: every pair a tie
    # Six seeds lower by the same amount: the sign test's 2/64 is a real test result.
    assert compare_rows({"base": base, "row": shifted}, "base", lower_is_better=True)["row"][2] == BETTER


def test_rows_without_spread_on_different_seeds_get_mann_whitney_not_welch():
    comparison = compare({0: 1.0, 1: 1.0}, {5: 2.0, 6: 2.0})
    assert comparison.test == RANKS_CONSTANT
    assert comparison.p_value == pytest.approx(2 / math.comb(4, 2))  # the most extreme of 6 equally likely splits


def test_non_finite_values_survive_strict_json():
    values = [0.25, math.inf, -math.inf, math.nan, -1.5e-7]
    text = json.dumps([encode_value(v) for v in values], allow_nan=False)
    decoded = [decode_value(v) for v in json.loads(text)]
    assert decoded[:3] == values[:3] and math.isnan(decoded[3]) and decoded[4] == values[4]
    assert math.isnan(decode_value(None))  # what older metadata stored for a non-finite value
    with pytest.raises(ValueError, match="'Infinity' is neither a number"):
        decode_value("Infinity")
