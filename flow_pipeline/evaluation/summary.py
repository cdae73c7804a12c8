"""The answer first: a short Markdown summary of one evaluation for the top of its page in the UI — the verdict
against each baseline with its interval, the distance to the truth where it is known, the classifier test — with
every number rounded to what its interval supports. The raw keys follow it for scripts."""

from __future__ import annotations

import math

from flow_pipeline.evaluation.results import Evaluation


def rounded(value: float, half_width: float, signed: bool = True) -> str:
    """``value`` with as many decimals as two significant digits of its interval's ``half_width`` ask for (at
    least none, at most 6); with its sign when ``signed``."""
    sign = "+" if signed else ""
    if not (math.isfinite(value) and math.isfinite(half_width)) or half_width <= 0:
        return f"{value:{sign}.4g}"
    decimals = min(6, max(0, 1 - math.floor(math.log10(half_width))))
    return f"{value:{sign}.{decimals}f}"


def _interval_text(values: dict, key: str, signed: bool = True) -> str:
    """"mean [low, high]" of ``key`` and its ``_ci_low``/``_ci_high``, rounded to the interval; "—" if missing."""
    mean, low, high = (values.get(f"{key}{suffix}") for suffix in ("", "_ci_low", "_ci_high"))
    if mean is None or low is None or high is None:
        return "—"
    half = (high - low) / 2
    return f"{rounded(mean, half, signed)} [{rounded(low, half, signed)}, {rounded(high, half, signed)}]"


def evaluation_summary(partition: str, result: Evaluation) -> str:
    """The summary's Markdown: the model's held-out likelihood against gaussian-full and gaussian-diag (paired per
    row, 95% interval, verdict), KL to the truth and the share of gaussian-full's closed (built-in data only), C2ST
    accuracy beside the references', and the sample-size note."""
    m = result.primary.metrics
    lines = [f"**{partition}** — sampler `{result.primary.sampler}`, {result.n:,} samples; held-out likelihood on "
             f"{int(m.get('likelihood_rows', 0)):,} test rows"]
    if "test_nll" in m:
        lines += ["", "| model vs | log-likelihood difference, nats/row (95% CI) | verdict |", "|---|---|---|"]
        for name in ("gaussian_full", "gaussian_diag"):
            key = f"loglik_vs_{name}"
            lines.append(f"| {name.replace('_', '-')} | {_interval_text(m, key)} | {m.get(f'{key}_verdict', '—')} |")
        if "kl_to_truth" in m:
            truth = {ref.name: ref.metrics for ref in result.references}.get("gaussian-full", {})
            lines += ["", f"KL to the truth: model {_interval_text(m, 'kl_to_truth', False)} nats/row, gaussian-full "
                      f"{_interval_text(truth, 'kl_to_truth', False)}; the model closes "
                      f"{_interval_text(m, 'kl_closed_fraction', False)} of gaussian-full's distance (1: all of it)."]
    else:
        lines += ["", "No held-out likelihood in this evaluation (likelihood_rows: 0)."]
    if "c2st_accuracy" in m:
        others = ", ".join(f"{ref.name} {ref.metrics['c2st_accuracy']:.2f}" for ref in result.references
                           if ref.metrics.get("c2st_accuracy") is not None)
        lines += ["", f"Classifier two-sample test accuracy (0.5: indistinguishable from held-out rows): model "
                  f"{_interval_text(m, 'c2st_accuracy', False)}"
                  + (f"; {others}" if others else "") + "."]
    note = m.get("prdc_note") or result.n_note
    if note:
        lines += ["", f"_{note}_"]
    return "\n".join(lines)


def report_summary(rows: list[dict], baseline: dict | None) -> str:
    """The report's answer first: each model row (best held-out likelihood first; rows without one last) with its
    test NLL over replicates, its likelihood against gaussian-full and its verdict against the baseline row."""
    def order(row: dict):
        value = row.get("test_nll")
        return (value is None or (isinstance(value, float) and math.isnan(value)), value or 0.0, row["partition"])

    lines = ["| run | replicates | test NLL, nats/row (95% CI) | vs gaussian-full, nats/row (95% CI) | "
             f"vs {baseline['partition'] if baseline else 'baseline'} |", "|---|---:|---|---|---|"]
    for row in sorted(rows, key=order):
        verdict = "baseline" if row is baseline else row.get("vs_baseline") or "—"
        lines.append(f"| {row['partition']} | {row.get('n_replicates', '—')} | "
                     f"{_interval_text(row, 'test_nll', False)} | {_interval_text(row, 'loglik_vs_gaussian_full')} | "
                     f"{verdict} |")
    return "\n".join(lines)
