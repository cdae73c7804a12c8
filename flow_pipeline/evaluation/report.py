"""The cross-partition ablation report: one row per partition, as Markdown, CSV and a PNG figure.

Pure (no Dagster): rows are plain dicts built by :func:`build_row` from an evaluation's and a training's values;
the ``ablation_report`` asset reads those from the Dagster instance.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from flow_pipeline.core.metrics.ranking import LIKELIHOOD_RULE, RANKING_METRIC

# The ranking metric and its direction: held-out negative log-likelihood, a proper scoring rule; lower is better.
PRIMARY_METRIC = "test_nll"
PRIMARY_ASCENDING = True
PRIMARY_METRIC_MEANING = ("mean negative log-likelihood of the held-out test rows in raw embedding space, nats per "
                          "row: a proper scoring rule, which collapse, shrinkage, inflation and copying all lose")
PROTOCOL = ("Protocol: whatever chooses with data chooses on val or on the training rows only (best.pt by the EMA "
            "validation loss; an `auto` guidance w by the val rows' variance; the Gaussian baselines are fitted to "
            "the training rows in closed form, the Gaussian mixture by EM with its components chosen on val); the "
            "test rows are scored once, by the model and the baselines alike.")
BASELINE = "gaussian-full"
LOSES_TO_BASELINE = f"**does not beat {BASELINE}**"
MISSING = "—"


@dataclass(frozen=True)
class Column:
    """One report column: the row key, its header, and the format spec of its value (``""``: as text)."""

    key: str
    header: str
    fmt: str = ""


COLUMNS: tuple[Column, ...] = (
    Column("partition", "partition"),
    Column("arch", "arch"),
    Column("flow", "flow"),
    # --- run identity and budget (study_report): one row per identity, replicates pooled -----------------------
    Column("dataset", "dataset"),
    Column("aug", "aug"),
    Column("model_size", "size"),
    Column("num_params", "params", ","),
    Column("flops_per_sample", "FLOPs / sample", ","),
    Column("steps", "steps", ",.0f"),
    Column("stopped_early", "stopped early"),
    Column("n_replicates", "replicates", "d"),
    Column("best_val_loss", "best val loss", ".4f"),
    Column("val_loss_ratio", "val loss / zero pred.", ".4f"),
    Column(PRIMARY_METRIC, "test NLL (nats/row)", ".2f"),
    Column("test_bits_per_dim", "bits/dim", ".4f"),
    Column("loglik_vs_gaussian_full", "vs gaussian-full (nats/row)", "+.2f"),
    Column("loglik_vs_gaussian_full_ci_low", "CI low", "+.2f"),
    Column("loglik_vs_gaussian_full_ci_high", "CI high", "+.2f"),
    Column("loglik_vs_gaussian_mixture", "vs gaussian-mixture (nats/row)", "+.2f"),
    Column("loglik_vs_gaussian_mixture_ci_low", "mixture CI low", "+.2f"),
    Column("loglik_vs_gaussian_mixture_ci_high", "mixture CI high", "+.2f"),
    Column("kl_to_truth", "KL to truth", ".1f"),
    Column("kl_closed_fraction", "KL closed", ".3f"),
    Column("c2st_accuracy", "C2ST acc.", ".3f"),
    Column("rbf_kid", "RBF KID", ".3g"),
    Column(RANKING_METRIC, "ranking KID", ".4g"),
    Column("kid", "KID", ".4g"),
    Column("kid_se", "± se", ".2g"),
    Column("kid_ci_low", "KID CI low", ".4g"),
    Column("kid_ci_high", "KID CI high", ".4g"),
    Column("fd_inf", "FD∞", ".4g"),
    Column("variance_ratio", "var ratio", ".3f"),
    Column("norm_ratio", "norm ratio", ".3f"),
    Column("precision", "precision", ".3f"),
    Column("recall", "recall", ".3f"),
    Column("density", "density", ".3f"),
    Column("coverage", "coverage", ".3f"),
    Column("memorization_ratio", "memorisation", ".3f"),
    Column("train_copy_fraction", "train copies", ".3f"),
    Column("fd_ratio", "FD / floor", ".3f"),
    Column("train_seconds", "train time (s)", ".1f"),
    Column("sampler", "sampler"),
    Column("nfe", "NFE", "d"),
    Column("n", "n", "d"),
    Column("vs_baseline", "vs baseline"),
    Column("p_holm", "p (Holm)", ".3g"),
    Column("identity", "identity"),
    Column("note", "note"),
)
COLUMN_KEYS = tuple(column.key for column in COLUMNS)
# Keys a row takes from the evaluation's values and from the training's values (the rest come from the partition).
# Metrics kept for each reference row (held-out real, baselines) in the evaluation's metadata.
REFERENCE_METRIC_KEYS = (PRIMARY_METRIC, "test_bits_per_dim", "kl_to_truth", "kl_to_truth_ci_low",
                         "kl_to_truth_ci_high", "kl_closed_fraction", "c2st_accuracy", "c2st_accuracy_ci_low",
                         "c2st_accuracy_ci_high",
                         "rbf_kid", "rbf_kid_se", RANKING_METRIC, "kid", "kid_se", "kid_ci_low", "kid_ci_high", "fd_inf", "variance_ratio",
                         "norm_ratio", "precision", "recall", "density", "coverage", "memorization_ratio",
                         "train_copy_fraction", "fd_ratio")
EVALUATION_KEYS = (*REFERENCE_METRIC_KEYS, "sampler", "nfe", "n")
TRAINING_KEYS = ("num_params", "best_val_loss", "train_seconds")


def beats_baseline(values: dict) -> bool | None:
    """Whether the model's held-out log-likelihood beats ``gaussian-full``'s: the interval of the difference
    (``loglik_vs_gaussian_full_ci_low``: over replicates when there are several, else the paired per-row one) lies
    above 0. A difference that is not finite (a replicate that copies or failed: the row's mean is its worst value,
    and it has no interval) never beats it. None when it is missing."""
    mean, low = values.get("loglik_vs_gaussian_full"), values.get("loglik_vs_gaussian_full_ci_low")
    if not is_missing(mean) and not math.isfinite(float(mean)):
        return False
    return None if is_missing(low) else float(low) > 0


def build_row(partition: str, arch: str, flow: str, evaluation: dict, training: dict, note: str = "",
              study: dict | None = None) -> dict:
    """One report row: every key of :data:`COLUMNS`; values absent from ``evaluation``/``training`` are None.
    A model that does not beat its evaluation's ``gaussian-full`` baseline says so first in its note.
    ``study``: a :func:`flow_pipeline.evaluation.study_report.study_rows` row (identity, replicates, intervals), kept whole."""
    notes = [LOSES_TO_BASELINE] if beats_baseline({**evaluation, **(study or {})}) is False else []
    n_note = evaluation.get("n_note", "")
    notes += [n_note] if n_note and not n_note.startswith("n >=") else []
    row = {**(study or {}), "partition": partition, "arch": arch, "flow": flow,
           "note": "; ".join(notes + ([note] if note else []))}
    row.update({key: evaluation.get(key) for key in EVALUATION_KEYS})
    row.update({key: training.get(key) for key in TRAINING_KEYS})
    return row


def reference_rows(evaluations: dict[str, dict]) -> list[dict]:
    """Report rows for the references (held-out real, baselines) of the evaluations (partition -> metadata values
    with ``references``, ``dataset``, ``n``, ``seed``): one row per reference and distinct (dataset, n, seed), since
    partitions trained on the same rows share them; a reference's own ``note`` (the mixture's choice) follows the
    row's."""
    rows, seen = [], set()
    for partition, evaluation in sorted(evaluations.items()):
        for name, metrics in (evaluation.get("references") or {}).items():
            key = (name, evaluation.get("dataset"), metrics.get("n"), evaluation.get("seed"))
            if key in seen:
                continue
            seen.add(key)
            label = f"reference: {name}"
            note = f"dataset {evaluation.get('dataset')}, seed {evaluation.get('seed')} (as {partition})"
            row = {"partition": label, "arch": MISSING, "flow": MISSING, "sampler": "—", "n": metrics.get("n"),
                   "note": "; ".join(filter(None, (note, metrics.get("note"))))}
            row.update({k: metrics.get(k) for k in REFERENCE_METRIC_KEYS})
            rows.append(row)
    return rows


def reference_table(evaluation, metric: str = PRIMARY_METRIC) -> str:
    """One evaluation's primary sampler beside its references, as Markdown (an :class:`Evaluation`)."""
    keys = (metric, "kl_to_truth", "c2st_accuracy", "rbf_kid", "kid", "kid_se", "fd_inf", "variance_ratio",
            "precision", "coverage", "train_copy_fraction")
    lines = ["| samples | n | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    entries = [(f"model ({evaluation.primary.sampler})", evaluation.n, evaluation.primary.metrics)]
    entries += [(ref.name, ref.n, ref.metrics) for ref in evaluation.references]
    for name, n, metrics in entries:
        lines.append(f"| {name} | {n} | " + " | ".join(format_cell(metrics.get(key), ".4g") for key in keys) + " |")
    return "\n".join(lines)


def is_missing(value) -> bool:
    """None and NaN are missing; so is the empty string."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def sort_rows(rows: list[dict], metric: str = PRIMARY_METRIC, ascending: bool = True) -> list[dict]:
    """Rows ordered by ``metric`` (ascending: best first for fd_ratio); rows missing it go last; ties by partition."""

    def key(row: dict):
        value = row.get(metric)
        if is_missing(value):
            return (1, 0.0, row["partition"])
        return (0, value if ascending else -value, row["partition"])

    return sorted(rows, key=key)


def format_cell(value, fmt: str = "") -> str:
    """A Markdown cell: missing values as an em dash, numbers with ``fmt``, text with ``|`` escaped."""
    if is_missing(value):
        return MISSING
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if fmt == "d" or fmt == ",":
            return format(int(value), fmt)
        if fmt == ",.0f":
            return format(float(value), fmt)
        return format(float(value), fmt)
    return str(value).replace("|", "\\|")


def sort_statement(metric: str = PRIMARY_METRIC, ascending: bool = True) -> str:
    """The report's header line, naming the primary metric and the direction of the sort; for the primary metric
    also the ranking rule, what the reference rows are, and how a model that loses to the baseline is marked."""
    direction = "ascending (lower is better)" if ascending else "descending (higher is better)"
    if metric != PRIMARY_METRIC:
        return f"Sorted by **{metric}**, {direction}."
    return (f"Sorted by **{metric}** ({PRIMARY_METRIC_MEANING}), {direction}.\n\n"
            f"Ranking rule: {LIKELIHOOD_RULE}\n\n{PROTOCOL}\n\n"
            f"Rows named `reference: ...` are scored with the same metrics, n and seed as the models: held-out real "
            f"val rows (the level to reach), Gaussians fitted to the run's training rows (`{BASELINE}`: "
            f"Ledoit–Wolf covariance; `gaussian-diag`: per-dimension variances), a Gaussian mixture fitted to them "
            f"by EM (`gaussian-mixture`: the stronger level to beat, its components chosen on val; the model's "
            f"paired difference against it is `vs gaussian-mixture`), and on the built-in data the truth "
            f"(the generator's own density: the floor of test NLL, KL 0). A model whose likelihood does not beat "
            f"`{BASELINE}`'s (the interval of the difference not above 0) is marked {LOSES_TO_BASELINE} in its note. "
            f"Precision/recall/density/coverage below n = 5 x dim are too lenient to judge (their note says so).")


def markdown_table(rows: list[dict]) -> str:
    """The rows, in the given order, as a Markdown table with the :data:`COLUMNS` headers."""
    lines = ["| " + " | ".join(column.header for column in COLUMNS) + " |",
             "|" + "|".join("---:" if column.fmt else "---" for column in COLUMNS) + "|"]
    lines += ["| " + " | ".join(format_cell(row.get(c.key), c.fmt) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(rows: list[dict], metric: str = PRIMARY_METRIC, ascending: bool = True,
                    statistics: str = "") -> str:
    """Header stating the sort (first line) and the ranking rule, the table of the rows sorted by ``metric`` (means
    over replicates), then the ``statistics`` section (:func:`flow_pipeline.evaluation.study_report.statistics_markdown`)."""
    text = sort_statement(metric, ascending) + "\n\n" + markdown_table(sort_rows(rows, metric, ascending)) + "\n"
    return text + ("\n" + statistics if statistics else "")


def csv_text(rows: list[dict]) -> str:
    """The rows, in the given order, as CSV with the :data:`COLUMN_KEYS` header; values unrounded, missing empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMN_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if is_missing(row.get(key)) else row.get(key) for key in COLUMN_KEYS})
    return buffer.getvalue()


def sampler_table(results: list[dict]) -> str:
    """One partition's sampler settings as Markdown: results are dicts with sampler, nfe, seconds and metrics."""
    keys = ((RANKING_METRIC, "ranking KID", ".4g"), ("kid_se", "± se", ".2g"), ("c2st_accuracy", "C2ST", ".3f"), ("fd_inf", "FD∞", ".4g"),
            ("variance_ratio", "var ratio", ".3f"), ("fd_ratio", "FD / floor", ".3f"),
            ("precision", "precision", ".3f"), ("recall", "recall", ".3f"),
            ("coverage", "coverage", ".3f"), ("memorization_ratio", "memorisation", ".3f"),
            ("train_copy_fraction", "train copies", ".3f"))
    lines = ["| sampler | NFE | seconds | " + " | ".join(header for _, header, _ in keys) + " |",
             "|---|---:|---:|" + "---:|" * len(keys)]
    for result in results:
        cells = [format_cell(result["sampler"]), format_cell(result["nfe"], "d"), format_cell(result["seconds"], ".2f")]
        cells += [format_cell(result["metrics"].get(key), fmt) for key, _, fmt in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
