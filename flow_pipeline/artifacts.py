"""Where the pipeline's files live under one root directory, and how its JSON files are written (the normalisation
``.npz`` files: :mod:`flow_pipeline.core.data.normalization`).

    <root>/data/splits/               train/val/test .npy + row indices (+ sentences .jsonl) + splits.json, or, from
                                      a splits/ root, one such set per <size>/ and sizes.json
    <root>/data/normalization_stats/  <dataset>-<normalization>.npz: one Normalizer per training subset and method
    <root>/checkpoints/<run_name>/    best.pt (last.pt while running), job.json, loss_curve.png, result.json
    <root>/wandb/                     offline Wandb runs
    <root>/evaluation/<run_name>/     evaluation results
    <root>/evaluation/references/     reference rows (held-out real, Gaussian baselines) by the sha256 of their inputs
    <root>/reports/                   ablation report (Markdown, CSV, PNG)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flow_pipeline.core.atomic import write_bytes_atomic


# File names inside a run directory (``ArtifactLayout.run_dir``; best.pt and last.pt: flow_pipeline.core.checkpoint).
JOB_NAME = "job.json"  # what the training process is asked to do
RESULT_NAME = "result.json"  # a finished training's metadata
FAILURE_NAME = "failure.json"  # why a training process failed
LOSS_CURVE_NAME = "loss_curve.png"
# Inside an evaluation directory (``ArtifactLayout.evaluation_dir``).
# A temp file this old in a directory that several processes write into is a killed write's, never a live one.
STALE_TEMP_AGE_S = 3600.0
EVALUATION_JSON = "evaluation.json"
EVALUATION_PNG = "samples.png"
# Inside ``ArtifactLayout.reports_dir``.
REPORT_MARKDOWN, REPORT_CSV, REPORT_PNG = "ablation_report.md", "ablation_report.csv", "ablation_report.png"


@dataclass(frozen=True)
class ArtifactLayout:
    root: Path

    @property
    def splits_dir(self) -> Path:
        return self.root / "data" / "splits"

    @property
    def stats_dir(self) -> Path:
        return self.root / "data" / "normalization_stats"

    def stats_path(self, dataset: str, normalization: str) -> Path:
        """The statistics of training subset ``dataset`` (1k, 5k, 10k, full) under ``normalization``."""
        return self.stats_dir / f"{dataset}-{normalization}.npz"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def run_dir(self, run_name: str) -> Path:
        return self.checkpoints_dir / run_name

    @property
    def wandb_dir(self) -> Path:
        return self.root / "wandb"

    def evaluation_dir(self, run_name: str) -> Path:
        return self.root / "evaluation" / run_name

    @property
    def reference_cache_dir(self) -> Path:
        """Scored reference rows, one JSON per set of inputs
        (:func:`flow_pipeline.evaluation.references.cached_references`)."""
        return self.root / "evaluation" / "references"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, the directory fsynced (:func:`flow_pipeline.core.atomic.write_bytes_atomic`)."""
    write_bytes_atomic(path, data)


def write_json(path: Path, value: object) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode())


@dataclass
class TrainJob:
    """Everything one training process needs, written by the orchestrator as ``job.json`` in the run directory."""

    config: dict
    splits_dir: str
    stats_path: str
    run_dir: str
    partition_key: str | None = None
    tracking: dict = field(default_factory=lambda: {"mode": "disabled"})
    # Which training rows and statistics (subset, stats file and its sha256): in the metadata and the checkpoint.
    data_identity: dict = field(default_factory=dict)

    def save(self) -> Path:
        path = Path(self.run_dir) / JOB_NAME
        write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainJob":
        return cls(**json.loads(Path(path).read_text()))
