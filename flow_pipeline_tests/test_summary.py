"""The summaries that open the evaluation and report pages: numbers rounded to their intervals, verdicts as
computed, rows in the order of their held-out likelihood."""

from __future__ import annotations

import math

import numpy as np

from flow_pipeline.evaluation.references import ReferenceEvaluation
from flow_pipeline.evaluation.results import Evaluation, SamplerEvaluation
from flow_pipeline.evaluation.summary import evaluation_summary, report_summary, rounded


def test_rounding_keeps_two_significant_digits_of_the_half_width():
    rng = np.random.default_rng(3)
    for value, half_width in zip(rng.normal(0, 1e4, 200), 10.0 ** rng.uniform(-5, 4, 200)):
        text = rounded(value, half_width)
        decimals = len(text.split(".")[1]) if "." in text else 0
        step = 10.0 ** -decimals
        assert abs(float(text) - value) <= step / 2 + 1e-9 * abs(value)
        if 0 < decimals < 6:  # inside the clamp: the last digit shown is the half-width's second significant digit
            assert step <= half_width / 10 < 10 * step
        elif decimals == 0:
            assert half_width >= 10
        assert text[0] in "+-"
    assert rounded(0.5, 0.01, signed=False) == "0.500"
    assert rounded(2.0, math.nan) == "+2"  # no interval: plain significant digits


def _evaluation(metrics: dict, references: list[ReferenceEvaluation]) -> Evaluation:
    primary = SamplerEvaluation("dopri5", "dopri5", 0, 50, 1.0, metrics)
    return Evaluation("best.pt", "0" * 64, "run", "mlp", "icfm", 5120, 0, 5, [primary], references)


def test_the_evaluation_summary_shows_each_verdict_with_its_interval():
    metrics = {"likelihood_rows": 1024, "test_nll": -5189.29, "c2st_accuracy": 0.63, "c2st_accuracy_ci_low": 0.616,
               "c2st_accuracy_ci_high": 0.643, "kl_to_truth": 538.94, "kl_to_truth_ci_low": 533.13,
               "kl_to_truth_ci_high": 544.76, "kl_closed_fraction": 0.1136, "kl_closed_fraction_ci_low": 0.1109,
               "kl_closed_fraction_ci_high": 0.1164}
    for name, (mean, low, high, verdict) in {"gaussian_full": (69.08, 67.72, 70.44, "better"),
                                             "gaussian_diag": (-3.0, -9.5, 3.5, "no detectable difference"),
                                             "gaussian_mixture": (-12.43, -14.11, -10.75, "worse")}.items():
        metrics.update({f"loglik_vs_{name}": mean, f"loglik_vs_{name}_ci_low": low,
                        f"loglik_vs_{name}_ci_high": high, f"loglik_vs_{name}_verdict": verdict})
    full = ReferenceEvaluation("gaussian-full", 5120, 0.0, {"kl_to_truth": 608.02, "kl_to_truth_ci_low": 602.9,
                                                            "kl_to_truth_ci_high": 613.2, "c2st_accuracy": 0.8707})
    mixture = ReferenceEvaluation("gaussian-mixture", 5120, 0.0, {
        "kl_to_truth": 526.51, "kl_to_truth_ci_low": 520.87, "kl_to_truth_ci_high": 532.17,
        "kl_closed_fraction": 0.1341, "kl_closed_fraction_ci_low": 0.1297, "kl_closed_fraction_ci_high": 0.1385})
    text = evaluation_summary("mlp-icfm", _evaluation(metrics, [full, mixture]))
    assert "| gaussian-full | +69.1 [+67.7, +70.4] | better |" in text
    assert "| gaussian-diag | -3.0 [-9.5, +3.5] | no detectable difference |" in text
    assert "| gaussian-mixture | -12.4 [-14.1, -10.8] | worse |" in text
    assert "model 538.9 [533.1, 544.8] nats/row, gaussian-full 608.0 [602.9, 613.2]" in text
    assert "gaussian-mixture 526.5 [520.9, 532.2] (it closes 0.1341 [0.1297, 0.1385] of gaussian-full's)" in text
    assert "the model closes 0.1136 [0.1109, 0.1164]" in text and "gaussian-full 0.87" in text
    without = evaluation_summary("mlp-icfm", _evaluation({"c2st_accuracy": 0.6}, []))
    assert "No held-out likelihood" in without and "KL to the truth" not in without
    # No val rows: the mixture's line says why it is missing, and the KL line names no mixture.
    skipped = {key: value for key, value in metrics.items() if "gaussian_mixture" not in key}
    skipped["gaussian_mixture_note"] = "skipped: gaussian-mixture: no val rows to choose its components on"
    text = evaluation_summary("mlp-icfm", _evaluation(skipped, [full]))
    assert "| gaussian-mixture | — | skipped: gaussian-mixture: no val rows to choose its components on |" in text
    assert "gaussian-mixture 5" not in text and "the model closes 0.1136" in text


def test_the_report_summary_orders_rows_by_test_nll_with_missing_ones_last():
    def row(partition, nll, verdict):
        return {"partition": partition, "n_replicates": 3, "test_nll": nll, "test_nll_ci_low": nll - 1,
                "test_nll_ci_high": nll + 1, "vs_baseline": verdict}

    baseline = row("mlp-icfm", -10.0, None)
    rows = [row("dit-icfm", math.nan, "worse"), baseline, row("unet-vp", -12.0, "better")]
    rows[2].update(loglik_vs_gaussian_mixture=-3.27, loglik_vs_gaussian_mixture_ci_low=-4.91,
                   loglik_vs_gaussian_mixture_ci_high=-1.63)
    lines = report_summary(rows, baseline).splitlines()
    assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == ["unet-vp", "mlp-icfm", "dit-icfm"]
    assert lines[0].endswith("vs mlp-icfm |") and lines[3].endswith("| baseline |") and "better" in lines[2]
    assert lines[0].split(" | ")[4] == "vs gaussian-mixture, nats/row (95% CI)"
    assert lines[2].split(" | ")[4] == "-3.3 [-4.9, -1.6]" and lines[3].split(" | ")[4] == "—"
