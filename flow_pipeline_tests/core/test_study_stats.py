"""Study statistics against textbook formulas written out here (t quantiles from scipy.stats.t only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import t as student_t

from flow_pipeline.core.study_stats import (
    BETTER,
    NO_DIFFERENCE,
    NOT_TESTABLE,
    WORSE,
    compare,
    compare_rows,
    holm,
    t_interval,
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
