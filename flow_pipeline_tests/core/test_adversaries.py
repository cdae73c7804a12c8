"""The ranking metric against sample sets built to fool a distance: held-out real rows must rank above each.

Data with real structure: the built-in SONAR-like generator (a low-rank Gaussian mixture with near-constant
dimensions and a per-row gain) at dim 64, not isotropic noise. The adversaries are the issue's: real rows shrunk
(c = 0.8) or inflated (c = 1.25) about the mean, mean collapse (the mean plus 5% noise), and exact copies of the rows
trained on. The report-level test in flow_pipeline_tests/test_report.py sorts these same sets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from flow_pipeline.core.data.sonar_like import synthetic_sonar_like
from flow_pipeline.core.metrics.copies import COPY_FRACTION_LIMIT
from flow_pipeline.core.metrics.ranking import RANKING_METRIC
from flow_pipeline.core.metrics.real_side import evaluate_samples

DIM, N = 64, 500


def adversary_sets(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """({name: samples (N, DIM)}, train (4N, DIM), test (N, DIM)) from one draw of the built-in generator."""
    x = synthetic_sonar_like(6 * N, dim=DIM, seed=seed).astype(np.float64)
    train, held_out, test = x[: 4 * N], x[4 * N : 5 * N], x[5 * N :]
    mean = train.mean(axis=0)
    noise = np.random.default_rng(seed).standard_normal(held_out.shape) * 0.05 * train.std(axis=0)
    return {
        "held-out real": held_out,
        "shrunk c=0.8": mean + 0.8 * (held_out - mean),
        "inflated c=1.25": mean + 1.25 * (held_out - mean),
        "mean collapse": mean + noise,
        "train copies": train[:N].copy(),
    }, train, test


def score_adversaries() -> dict[str, dict[str, float]]:
    sets, train, test = adversary_sets()
    return {name: evaluate_samples(samples, train, test, seed=0) for name, samples in sets.items()}


@pytest.fixture
def scored(adversary_scores) -> dict[str, dict[str, float]]:
    return adversary_scores  # session-scoped in conftest: the report test sorts the same numbers


@pytest.mark.parametrize("adversary", ["shrunk c=0.8", "inflated c=1.25", "mean collapse", "train copies"])
def test_held_out_real_ranks_above_each_adversary(scored, adversary):
    real, bad = scored["held-out real"], scored[adversary]
    assert real[RANKING_METRIC] < bad[RANKING_METRIC]  # lower is better


def test_held_out_real_scores_zero_within_its_interval(scored):
    real = scored["held-out real"]
    assert real["kid_ci_low"] <= 0.0 <= real["kid_ci_high"]
    assert abs(real["kid"]) < 3 * real["kid_se"]
    assert 0.9 < real["variance_ratio"] < 1.1 and 0.95 < real["norm_ratio"] < 1.05
    assert real["train_copy_fraction"] <= 0.02 and real["memorising"] == 0.0


@pytest.mark.parametrize("adversary", ["shrunk c=0.8", "inflated c=1.25", "mean collapse"])
def test_distribution_adversaries_are_separated_by_the_interval_not_by_the_copy_rule(scored, adversary):
    real, bad = scored["held-out real"], scored[adversary]
    assert bad["memorising"] == 0.0 and math.isfinite(bad[RANKING_METRIC])  # not mistaken for copying
    assert bad["kid_ci_low"] > real["kid"]  # the whole interval lies above held-out real's estimate


def test_dispersion_reads_both_directions(scored):
    assert scored["shrunk c=0.8"]["variance_ratio"] == pytest.approx(0.64, rel=0.1)
    assert scored["inflated c=1.25"]["variance_ratio"] == pytest.approx(1.5625, rel=0.1)
    assert scored["mean collapse"]["variance_ratio"] < 0.01


def test_train_copies_fool_the_distance_but_not_the_copy_rule(scored):
    copies = scored["train copies"]
    assert abs(copies["kid"]) < 3 * copies["kid_se"]  # a pure distance sees real data...
    assert copies["train_copy_fraction"] > COPY_FRACTION_LIMIT and copies["memorising"] == 1.0
    assert copies[RANKING_METRIC] == math.inf  # ...the rule ranks it below every non-copying set
