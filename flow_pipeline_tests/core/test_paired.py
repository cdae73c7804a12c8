"""Paired per-row statistics: the interval against scipy's paired t-test, verdicts, infinite rows, KL and the
closed fraction's delta-method interval against a bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from flow_pipeline.core.paired import kl_closed_fraction, kl_to_truth, paired_difference


def test_paired_difference_is_the_paired_t_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1.0, 400), rng.normal(0.0, 1.0, 400)
    result = paired_difference(a, b)
    d = a - b
    half = scipy.stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    assert result.mean == pytest.approx(d.mean()) and result.n == 400
    assert (result.low, result.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert scipy.stats.ttest_rel(a, b).pvalue < 0.05 and result.verdict == "better"
    assert paired_difference(b, a).verdict == "worse"
    assert paired_difference(a, a + rng.normal(0, 1, 400) * 1e-3).verdict == "no detectable difference"
    keys = result.as_dict("loglik_vs_gaussian_full")
    assert keys["loglik_vs_gaussian_full_ci_low"] == result.low and keys["loglik_vs_gaussian_full"] == result.mean


def test_infinite_and_undefined_rows():
    a = np.array([1.0, -np.inf, 2.0])
    worse = paired_difference(a, np.zeros(3))
    assert worse.mean == -np.inf and worse.high == -np.inf and worse.verdict == "worse"
    with pytest.raises(ValueError, match="NaN"):
        paired_difference(np.array([1.0, np.nan]), np.zeros(2))
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference(np.zeros(3), np.zeros(2))
    assert paired_difference([1.0], [0.0]).verdict == "not testable"


def test_kl_of_the_truth_is_zero_and_of_a_worse_model_is_detected():
    rng = np.random.default_rng(1)
    log_true = rng.normal(-10, 3, 500)
    zero = kl_to_truth(log_true, log_true)
    assert zero.mean == 0 and zero.low <= 0 <= zero.high and zero.verdict == "no detectable difference"
    assert kl_to_truth(log_true, log_true - rng.exponential(1.0, 500)).verdict == "differs from the truth"


def test_closed_fraction_and_its_interval_against_a_bootstrap():
    rng = np.random.default_rng(2)
    n = 2000
    log_true = rng.normal(0, 5, n)
    d_ref = rng.gamma(4.0, 2.0, n)  # KL(reference) ~ 8
    d_model = 0.6 * d_ref + rng.normal(0, 1.5, n)  # closes ~40%
    result = kl_closed_fraction(log_true, log_true - d_model, log_true - d_ref)
    assert result.value == pytest.approx(1 - d_model.mean() / d_ref.mean())
    idx = rng.integers(0, n, (2000, n))
    boot = 1 - d_model[idx].mean(1) / d_ref[idx].mean(1)
    assert (result.high - result.low) / 2 == pytest.approx(1.96 * boot.std(), rel=0.15)
    with pytest.raises(ValueError, match="KL > 0"):
        kl_closed_fraction(log_true, log_true - d_model, log_true)
