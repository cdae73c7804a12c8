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


def _kl_line(m: dict, references: dict[str, dict]) -> str:
    """The distance to the truth of the model (``m``) and of gaussian-full, and of gaussian-mixture with the share of
    gaussian-full's it closes when it has a row; then the model's share."""
    full, mixture = references.get("gaussian-full", {}), references.get("gaussian-mixture", {})
    text = (f"KL to the truth: model {_interval_text(m, 'kl_to_truth', False)} nats/row, gaussian-full "
            f"{_interval_text(full, 'kl_to_truth', False)}")
    if "kl_to_truth" in mixture:
        text += (f", gaussian-mixture {_interval_text(mixture, 'kl_to_truth', False)} (it closes "
                 f"{_interval_text(mixture, 'kl_closed_fraction', False)} of gaussian-full's)")
    return (text + f"; the model closes {_interval_text(m, 'kl_closed_fraction', False)} of gaussian-full's "
            f"distance (1: all of it).")


def evaluation_summary(partition: str, result: Evaluation) -> str:
    """The summary's Markdown: the model's held-out likelihood against gaussian-full, gaussian-diag and
    gaussian-mixture (paired per row, 95% interval, verdict; the mixture's note when it was skipped), KL to the truth
    and the share of gaussian-full's closed by the model and by the mixture (built-in data only), C2ST accuracy
    beside the references', and the sample-size note."""
    m = result.primary.metrics
    lines = [f"**{partition}** — sampler `{result.primary.sampler}`, {result.n:,} samples; held-out likelihood on "
             f"{int(m.get('likelihood_rows', 0)):,} test rows"]
    if "test_nll" in m:
        lines += ["", "| model vs | log-likelihood difference, nats/row (95% CI) | verdict |", "|---|---|---|"]
        for name in ("gaussian_full", "gaussian_diag", "gaussian_mixture"):
            key = f"loglik_vs_{name}"
            verdict = m.get(f"{key}_verdict") or m.get(f"{name}_note", "—")
            lines.append(f"| {name.replace('_', '-')} | {_interval_text(m, key)} | {verdict} |")
        if "kl_to_truth" in m:
            lines += ["", _kl_line(m, {ref.name: ref.metrics for ref in result.references})]
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
    test NLL over replicates, its likelihood against gaussian-full and gaussian-mixture and its verdict against the
    baseline row."""
    def order(row: dict):
        value = row.get("test_nll")
        return (value is None or (isinstance(value, float) and math.isnan(value)), value or 0.0, row["partition"])

    lines = ["| run | replicates | test NLL, nats/row (95% CI) | vs gaussian-full, nats/row (95% CI) | "
             f"vs gaussian-mixture, nats/row (95% CI) | vs {baseline['partition'] if baseline else 'baseline'} |",
             "|---|---:|---|---|---|---|"]
    for row in sorted(rows, key=order):
        verdict = "baseline" if row is baseline else row.get("vs_baseline") or "—"
        lines.append(f"| {row['partition']} | {row.get('n_replicates', '—')} | "
                     f"{_interval_text(row, 'test_nll', False)} | {_interval_text(row, 'loglik_vs_gaussian_full')} | "
                     f"{_interval_text(row, 'loglik_vs_gaussian_mixture')} | {verdict} |")
    return "\n".join(lines)
