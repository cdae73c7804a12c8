"""The PRDC sample-size gate at its boundary, and the "beats" test against the normal-theory formulas written out
here and against its false-positive rate on simulated estimates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from flow_pipeline.core.study_stats import BETTER, NO_DIFFERENCE, WORSE
from flow_pipeline.core.metrics.verdicts import TOO_SMALL_TO_JUDGE, beats, prdc_judgeable, prdc_note


@pytest.mark.parametrize("dim", [1024, 64, 3])
def test_prdc_is_judged_from_five_rows_per_dimension_on(dim):
    assert prdc_judgeable(5 * dim, dim) and prdc_note(5 * dim, dim) == ""
    assert not prdc_judgeable(5 * dim - 1, dim)
    note = prdc_note(5 * dim - 1, dim)
    assert note.startswith(TOO_SMALL_TO_JUDGE) and f"{5 * dim:,}" in note and f"{5 * dim - 1:,}" in note


def test_the_issue_s_n_of_1000_at_dim_1024_is_too_small_and_bad_sizes_are_refused():
    assert prdc_note(1000, 1024).startswith(TOO_SMALL_TO_JUDGE)
    with pytest.raises(ValueError, match="n and dim must be >= 1"):
        prdc_judgeable(0, 1024)


def test_beats_is_a_z_test_on_the_difference():
    rng = np.random.default_rng(8)
    for _ in range(5):
        model, baseline = rng.uniform(0.001, 0.01, 2)
        model_se, baseline_se = rng.uniform(1e-4, 2e-3, 2)
        result = beats(model, model_se, baseline, baseline_se)
        se = math.sqrt(model_se**2 + baseline_se**2)
        z = (model - baseline) / se
        assert result.se == pytest.approx(se) and result.difference == pytest.approx(model - baseline)
        assert (result.ci_low, result.ci_high) == pytest.approx((model - baseline - 1.959964 * se,
                                                                 model - baseline + 1.959964 * se))
        assert result.p_value == pytest.approx(2 * norm.sf(abs(z)))
        expected = NO_DIFFERENCE if abs(z) <= 1.959964 else (BETTER if z < 0 else WORSE)
        assert result.verdict == expected and result.beats == (expected == BETTER)


def test_a_point_value_below_the_baseline_within_the_noise_does_not_beat_it():
    """The old check said "beats" for 0.0015 < 0.0020 whatever the se; with se 0.0004 each it is no difference."""
    result = beats(0.0015, 0.0004, 0.0020, 0.0004)
    assert result.verdict == NO_DIFFERENCE and not result.beats
    assert beats(0.0005, 0.0001, 0.0020, 0.0001).beats
    assert beats(0.9, 0.01, 0.5, 0.01, lower_is_better=False).beats  # e.g. coverage


def test_false_positive_rate_is_about_five_percent_on_estimates_of_equal_means():
    rng = np.random.default_rng(9)
    model_se, baseline_se = 0.002, 0.001
    calls = [beats(0.01 + model_se * a, model_se, 0.01 + baseline_se * b, baseline_se)
             for a, b in rng.standard_normal((4000, 2))]
    rate = sum(call.verdict != NO_DIFFERENCE for call in calls) / len(calls)
    assert 0.04 < rate < 0.06


def test_non_finite_values_are_not_compared():
    copying = beats(math.inf, 0.001, 0.002, 0.0003)
    assert not copying.beats and copying.verdict.startswith("not comparable: model is inf")
    assert beats(0.001, math.nan, 0.002, 0.0003).verdict == "not comparable: model_se is nan"
    assert beats(0.001, 0.0, 0.002, 0.0).verdict == "not comparable: both standard errors are 0"
    metadata = copying.as_metadata("vs_gaussian_full")
    assert metadata["vs_gaussian_full_se"] == "nan" and metadata["vs_gaussian_full_difference"] == "inf"
    assert metadata["vs_gaussian_full_verdict"] == copying.verdict
