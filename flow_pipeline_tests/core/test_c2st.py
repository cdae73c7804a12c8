"""The classifier two-sample test on sets whose relation is known by construction: the same distribution scores 0.5
within its interval, shifted, rescaled and mixture-vs-matched-Gaussian sets score well above it, copies of real rows
score 0.5 (copying is the copy rule's business); the interval and p-value against the binomial formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom

from flow_pipeline.core.metrics.c2st import c2st
from flow_pipeline_tests.core.two_sample_data import DIM, matched_gaussian, mixture

N = 1000


def contains_half(result) -> bool:
    return result.ci_low <= 0.5 <= result.ci_high


def test_the_same_distribution_scores_one_half_within_its_interval(one_torch_thread):
    rng = np.random.default_rng(11)
    result = c2st(mixture(rng, N), mixture(rng, N), seed=3)
    assert contains_half(result) and abs(result.accuracy - 0.5) < 0.05
    assert result.p_value > 0.05


@pytest.mark.parametrize("case", ["shifted mean", "wider covariance", "mixture vs matched Gaussian"])
def test_different_distributions_score_well_above_one_half(case, one_torch_thread):
    rng = np.random.default_rng(12)
    real = mixture(rng, N) if case.startswith("mixture") else rng.standard_normal((N, DIM))
    generated = {"shifted mean": lambda: rng.standard_normal((N, DIM)) + 0.6,  # Bayes accuracy 0.73
                 "wider covariance": lambda: 1.5 * rng.standard_normal((N, DIM)),
                 "mixture vs matched Gaussian": lambda: matched_gaussian(rng, N)}[case]()
    result = c2st(real, generated, seed=4)
    assert result.ci_low > 0.6, result
    assert result.p_value < 1e-6


def test_copies_of_real_rows_are_not_caught(one_torch_thread):
    """A generator that returns its (distinct) training rows: against fresh rows of the same distribution it scores
    0.5. C2ST judges the distribution, not copying (the ranking metric's copy rule does). A copy drawn twice can land
    on both sides of the split and be memorised, so copies with repeats may score a little above 0.5."""
    rng = np.random.default_rng(13)
    training_rows, test_rows = mixture(rng, N), mixture(rng, N)
    copies = training_rows[rng.permutation(N)]
    assert contains_half(c2st(test_rows, copies, seed=5))


def test_unequal_sizes_are_balanced_so_that_chance_stays_one_half(one_torch_thread):
    """300 real rows against 1,000 generated ones of the same distribution: a classifier that always says
    "generated" would score 0.77 on unbalanced held-out rows; cut to 300 each it scores 0.5."""
    rng = np.random.default_rng(14)
    result = c2st(mixture(rng, 300), mixture(rng, 1000), seed=6)
    assert result.n_per_class == 300 and result.n_held_out == 300 and result.n_train == 300
    assert contains_half(result)


def test_interval_and_p_value_are_the_exact_binomial_ones(one_torch_thread):
    rng = np.random.default_rng(15)
    result = c2st(rng.standard_normal((N, DIM)), rng.standard_normal((N, DIM)) + 0.15, seed=7, steps=100)
    n = result.n_held_out
    correct = round(result.accuracy * n)
    assert correct == pytest.approx(result.accuracy * n, abs=1e-9)
    # Clopper–Pearson: beta quantiles; one-sided p: P(Binomial(n, 1/2) >= correct).
    assert result.ci_low == pytest.approx(beta.ppf(0.025, correct, n - correct + 1))
    assert result.ci_high == pytest.approx(beta.ppf(0.975, correct + 1, n - correct))
    assert result.p_value == pytest.approx(binom.sf(correct - 1, n, 0.5))
    assert result.as_metrics()["c2st_accuracy"] == result.accuracy


def test_z_scoring_makes_the_result_independent_of_the_rows_scale_and_offset(one_torch_thread):
    rng = np.random.default_rng(16)
    real, generated = rng.standard_normal((N, DIM)), 1.3 * rng.standard_normal((N, DIM))
    plain = c2st(real, generated, seed=8, steps=200)
    rescaled = c2st(0.005 * real + 3.0, 0.005 * generated + 3.0, seed=8, steps=200)
    assert rescaled.accuracy == pytest.approx(plain.accuracy, abs=0.01)
    assert plain.accuracy > 0.6


def test_deterministic_given_the_seed_and_leaves_the_global_rng_alone(one_torch_thread):
    rng = np.random.default_rng(17)
    real, generated = rng.standard_normal((400, DIM)), rng.standard_normal((400, DIM)) + 0.2
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = c2st(real, generated, seed=9, steps=50)
    assert torch.equal(torch.rand(3), expected_next)
    assert c2st(real, generated, seed=9, steps=50) == first
    assert torch.get_num_threads() == 1


def test_bad_input_is_named():
    rng = np.random.default_rng(18)
    with pytest.raises(ValueError, match="dimension mismatch"):
        c2st(rng.standard_normal((10, 3)), rng.standard_normal((10, 4)), seed=0)
    with pytest.raises(ValueError, match="generated has non-finite"):
        c2st(rng.standard_normal((10, 3)), np.full((10, 3), np.nan), seed=0)
    with pytest.raises(ValueError, match="real must be an"):
        c2st(rng.standard_normal(10), rng.standard_normal((10, 3)), seed=0)
    with pytest.raises(ValueError, match="held_out_fraction"):
        c2st(rng.standard_normal((10, 3)), rng.standard_normal((10, 3)), seed=0, held_out_fraction=0.99)
