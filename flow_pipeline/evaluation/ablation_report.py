"""The ablation report from every evaluation: one row per run identity (replicates pooled), whether each row is
stale, every row's validation-loss curve on the zero-predictor scale, the comparisons with a baseline row, and the
files (Markdown, CSV, PNG), rows sorted by the ranking metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flow_pipeline.ablations import ablation_for
from flow_pipeline.artifacts import REPORT_CSV, REPORT_MARKDOWN, REPORT_PNG, STALE_TEMP_AGE_S, write_atomic
from flow_pipeline.core.atomic import remove_stale_temp_files
from flow_pipeline.core.checkpoint import CheckpointError, load_checkpoint
from flow_pipeline.evaluation.plots import InlineFigure, plot_report
from flow_pipeline.evaluation.report import (LOSES_TO_BASELINE, PRIMARY_METRIC, build_row, csv_text,
                                             markdown_report, reference_rows, sort_rows)
from flow_pipeline.evaluation.study_report import add_comparisons, pick_baseline, statistics_markdown, study_rows
from flow_pipeline.core.run_identity import identity_key
from flow_pipeline.replicates import replicates_from_metadata


@dataclass
class ReportFiles:
    markdown: str
    markdown_path: Path
    csv_path: Path
    png_path: Path
    rows: list[dict]
    figure: InlineFigure  # the PNG, also embeddable in Markdown


def write_report(rows: list[dict], curves: dict[str, list[dict]], reports_dir: Path,
                 metric: str = PRIMARY_METRIC, ascending: bool = True, statistics: str = "") -> ReportFiles:
    """Sort the rows by ``metric`` and write Markdown (with the ``statistics`` section), CSV and PNG atomically
    under ``reports_dir``."""
    remove_stale_temp_files(reports_dir, older_than_s=STALE_TEMP_AGE_S)  # what killed reports left
    ordered = sort_rows(rows, metric, ascending)
    markdown = markdown_report(ordered, metric, ascending, statistics)
    markdown_path, csv_path = reports_dir / REPORT_MARKDOWN, reports_dir / REPORT_CSV
    write_atomic(markdown_path, markdown.encode())
    write_atomic(csv_path, csv_text(ordered).encode())
    figure = plot_report(ordered, curves, metric)
    png_path = figure.save(reports_dir / REPORT_PNG)
    return ReportFiles(markdown=markdown, markdown_path=markdown_path, csv_path=csv_path, png_path=png_path,
                       rows=ordered, figure=figure)


class NothingToReport(ValueError):
    """No evaluation is materialized yet: there is no row to report."""


def history(checkpoint_path: str | None) -> tuple[list[dict], str]:
    """(per-epoch history, note): a checkpoint that no longer reads gives no curve and says why in the note."""
    if not checkpoint_path:
        return [], "no checkpoint path in the evaluation metadata"
    try:
        return list(load_checkpoint(checkpoint_path).get("history", [])), ""
    except CheckpointError as exc:
        return [], f"no loss curve: {exc}"


def staleness_notes(study: dict, training: dict | None) -> list[str]:
    """Why a study row may not describe the partition's latest training: none, or it was trained again since."""
    if not training:
        return ["no trained_checkpoint materialization"]
    # The partition's newest training, if it is of this identity (or says nothing of it), must be the one
    # evaluated; a newer one of another identity is another row's business.
    same_identity = "config" not in training or identity_key(training["config"]) == study["identity"]
    shas = {entry["sha256"] for entry in study["replicates"]}
    if same_identity and {e.get("sha256") for e in replicates_from_metadata(training)} != shas:
        return ["trained again since this evaluation: re-materialize evaluation"]
    return []


def scaled_curve(entries: list[dict], zero_loss: float) -> list[dict]:
    """A history's validation losses divided by the flow's zero-predictor loss (comparable across flows)."""
    return [{**entry, "val_loss": entry["val_loss"] / zero_loss, "ema_val_loss": entry["ema_val_loss"] / zero_loss}
            for entry in entries]


@dataclass
class StudyRows:
    """The report's model rows, each identity's scaled loss curve, and each partition's newest evaluation."""

    rows: list[dict]
    curves: dict[str, list[dict]]
    newest: dict[str, dict]


def model_rows(evaluations: list[tuple[str, dict]], training_of: Callable[[str], dict | None],
               partition_order: Sequence[str]) -> StudyRows:
    """One row per run identity from ``evaluations`` ((partition, plain evaluation metadata), newest first), with
    ``training_of(partition)`` the partition's latest trained_checkpoint metadata (None: never trained); rows in
    registry order, then identity."""
    rows, curves, newest = [], {}, {}
    for study in study_rows(evaluations):
        partition = study["partition"]
        newest.setdefault(partition, study["evaluation"])
        notes = staleness_notes(study, training_of(partition))
        entries, curve_note = history(study["replicates"][0]["checkpoint_path"])
        curves.setdefault(study["identity"], scaled_curve(entries, study["zero_predictor_loss"]))
        notes += [curve_note] if curve_note else []
        ablation = ablation_for(partition)
        pooled = {key: study[key] for key in study["per_seed"]}  # means over replicates replace the first's values
        rows.append(build_row(partition, ablation.arch, ablation.flow, {**study["evaluation"], **pooled}, study,
                              note="; ".join(notes), study=study))
    rows.sort(key=lambda row: (partition_order.index(row["partition"]), row["identity"]))
    return StudyRows(rows, curves, newest)


@dataclass
class AblationReport:
    """The report's model rows (with their comparisons), the baseline row (None: none), the partitions that do not
    beat gaussian-full, and the files written."""

    rows: list[dict]
    baseline: dict | None
    losing: list[str]
    files: ReportFiles


def build_ablation_report(evaluations: list[tuple[str, dict]], training_of: Callable[[str], dict | None],
                          partition_order: Sequence[str], baseline: str, reports_dir: Path) -> AblationReport:
    """The whole report (see :func:`model_rows`) compared with the ``baseline`` row (a run identity or a partition
    key, :func:`~flow_pipeline.evaluation.study_report.pick_baseline`), written under ``reports_dir``.
    :class:`NothingToReport` when there is no evaluation."""
    study = model_rows(evaluations, training_of, partition_order)
    rows = study.rows
    if not rows:
        raise NothingToReport("no partition of evaluation is materialized yet; materialize evaluation for at "
                              "least one partition first")
    losing = [row["partition"] for row in rows if row["note"].startswith(LOSES_TO_BASELINE)]
    baseline_row = pick_baseline(rows, baseline)
    add_comparisons(rows, baseline_row, PRIMARY_METRIC)
    statistics = statistics_markdown(sort_rows(rows), baseline_row, PRIMARY_METRIC)
    files = write_report(rows + reference_rows(study.newest), study.curves, reports_dir, statistics=statistics)
    return AblationReport(rows, baseline_row, losing, files)
