"""The ablation report's files: rows sorted by the ranking metric, written as Markdown, CSV and a PNG figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flow_pipeline.artifacts import REPORT_CSV, REPORT_MARKDOWN, REPORT_PNG, write_atomic
from flow_pipeline.evaluation.plots import InlineFigure, plot_report
from flow_pipeline.evaluation.report import PRIMARY_METRIC, csv_text, markdown_report, sort_rows


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
    ordered = sort_rows(rows, metric, ascending)
    markdown = markdown_report(ordered, metric, ascending, statistics)
    markdown_path, csv_path = reports_dir / REPORT_MARKDOWN, reports_dir / REPORT_CSV
    write_atomic(markdown_path, markdown.encode())
    write_atomic(csv_path, csv_text(ordered).encode())
    figure = plot_report(ordered, curves, metric)
    png_path = figure.save(reports_dir / REPORT_PNG)
    return ReportFiles(markdown=markdown, markdown_path=markdown_path, csv_path=csv_path, png_path=png_path,
                       rows=ordered, figure=figure)
