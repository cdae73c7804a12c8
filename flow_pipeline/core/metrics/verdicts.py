"""When a number may carry a verdict: the sample size below which precision/recall/density/coverage are not judged,
and the "beats the baseline" decision for two estimates that each carry a standard error.

* PRDC (Naeem et al. 2020) on k-nearest-neighbour balls is lenient when n is small against dim: rows of the true
  mixture kept only in their top 64 whitened coordinates (Gaussian elsewhere) score precision/coverage 0.886/0.821
  at n = 1,000 but 0.359/0.263 at n = 5,120 (dim 1,024). Below :data:`PRDC_SAMPLES_PER_DIM` x dim the four numbers
  are shown but marked :data:`TOO_SMALL_TO_JUDGE`.
* :func:`beats` replaces a strict ``<`` on two point values (e.g. the model's ranking KID against
  ``gaussian-full``'s) with a test on their difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from flow_pipeline.core.study_stats import BETTER, CONFIDENCE, NO_DIFFERENCE, WORSE, encode_value

PRDC_SAMPLES_PER_DIM = 5
PRDC_METRICS = ("precision", "recall", "density", "coverage")
TOO_SMALL_TO_JUDGE = "too small to judge"
NOT_COMPARABLE = "not comparable: {what}"


def prdc_judgeable(n: int, dim: int) -> bool:
    """Whether precision/recall/density/coverage of n generated against n real rows of width dim may be judged:
    n >= PRDC_SAMPLES_PER_DIM x dim."""
    if n < 1 or dim < 1:
        raise ValueError(f"prdc_judgeable: n and dim must be >= 1, got n={n}, dim={dim}")
    return n >= PRDC_SAMPLES_PER_DIM * dim


def prdc_note(n: int, dim: int) -> str:
    """"" when PRDC may be judged at this n; otherwise a note for the report that starts with
    :data:`TOO_SMALL_TO_JUDGE` and says the n it would take."""
    if prdc_judgeable(n, dim):
        return ""
    return (f"{TOO_SMALL_TO_JUDGE}: n = {n:,} < {PRDC_SAMPLES_PER_DIM} × dim = {PRDC_SAMPLES_PER_DIM * dim:,}, where "
            "precision and coverage are too lenient to tell a model from the data")


@dataclass(frozen=True)
class BeatsVerdict:
    """``model - baseline`` of one metric with its standard error, its interval, the two-sided p-value of "no
    difference", and the verdict: :data:`~flow_pipeline.core.study_stats.BETTER` / ``WORSE`` / ``NO_DIFFERENCE``,
    or :data:`NOT_COMPARABLE` (a value or a standard error is not finite; no test possible)."""

    difference: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str

    @property
    def beats(self) -> bool:
        """The model is better than the baseline by the test (not merely by its point value)."""
        return self.verdict == BETTER

    def as_metadata(self, prefix: str) -> dict[str, float | str]:
        """Flat metadata, e.g. prefix "vs_gaussian_full": ``vs_gaussian_full_difference``, ``_se``, ``_ci_low``,
        ``_ci_high``, ``_p_value`` and ``_verdict`` (non-finite numbers as :func:`encode_value` strings, for strict
        JSON)."""
        numbers = {"difference": self.difference, "se": self.se, "ci_low": self.ci_low, "ci_high": self.ci_high,
                   "p_value": self.p_value}
        return {**{f"{prefix}_{name}": encode_value(value) for name, value in numbers.items()},
                f"{prefix}_verdict": self.verdict}


def beats(model: float, model_se: float, baseline: float, baseline_se: float, *, lower_is_better: bool = True,
          confidence: float = CONFIDENCE) -> BeatsVerdict:
    """Whether ``model`` (an estimate with standard error ``model_se``) is better than ``baseline`` (with
    ``baseline_se``): a two-sided z-test on the difference, se = sqrt(model_se² + baseline_se²), interval
    difference ± z_{(1+confidence)/2} se; "better"/"worse" when the interval excludes 0, else "no detectable
    difference".

    Treating the two errors as independent is conservative for the evaluation's distances: both are measured
    against the same real rows, which makes their errors positively correlated, so the true se of the difference is
    smaller than this one and a verdict it gives holds.

    Use, for the evaluation's "beats gaussian-full" check (instead of ``model[metric] < baseline[metric]``)::

        verdict = beats(model["ranking_kid"], model["kid_se"], gaussian_full["ranking_kid"], gaussian_full["kid_se"])
        passed = verdict.beats            # metadata: verdict.as_metadata("vs_gaussian_full")

    A non-finite value (the ranking KID is +inf for a copying model), a non-finite or negative se, or two zero ses
    give :data:`NOT_COMPARABLE` and ``beats`` False: the copy rule ranks such a model, not this test.
    """
    values = {"model": model, "model_se": model_se, "baseline": baseline, "baseline_se": baseline_se}
    bad = [f"{name} is {value}" for name, value in values.items() if not math.isfinite(float(value))]
    bad += [f"{name} is negative" for name in ("model_se", "baseline_se") if values[name] < 0]
    bad += ["both standard errors are 0"] if not bad and model_se == baseline_se == 0 else []
    difference = float(model) - float(baseline)
    if bad:
        return BeatsVerdict(difference, math.nan, math.nan, math.nan, math.nan,
                            NOT_COMPARABLE.format(what=", ".join(bad)))
    se = math.hypot(model_se, baseline_se)
    half_width = stats.norm.ppf((1 + confidence) / 2) * se
    low, high = difference - half_width, difference + half_width
    p_value = 2 * stats.norm.sf(abs(difference) / se)
    if low <= 0 <= high:
        return BeatsVerdict(difference, se, low, high, p_value, NO_DIFFERENCE)
    return BeatsVerdict(difference, se, low, high, p_value, BETTER if (difference < 0) == lower_is_better else WORSE)
