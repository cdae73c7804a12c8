"""Where the pipeline's files live under one root directory, and the small files it writes there.

    <root>/data/splits/               train/val/test .npy + row indices + splits.json
    <root>/data/normalization_stats.npz
    <root>/checkpoints/<run_name>/    best.pt (last.pt while running), job.json, loss_curve.png, result.json
    <root>/wandb/                     offline Wandb runs
    <root>/evaluation/<run_name>/     evaluation results
    <root>/reports/                   ablation report (Markdown, CSV, PNG)
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flow_pipeline.core.data import Normalizer


@dataclass(frozen=True)
class ArtifactLayout:
    root: Path

    @property
    def splits_dir(self) -> Path:
        return self.root / "data" / "splits"

    @property
    def stats_path(self) -> Path:
        return self.root / "data" / "normalization_stats.npz"

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
    def reports_dir(self) -> Path:
        return self.root / "reports"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a same-directory temp file and ``os.replace``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: object) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode())


def save_normalization_stats(path: Path, mean: np.ndarray, std: np.ndarray, n: int) -> None:
    """mean/std (dim,) float64 from the train split; ``std`` already floored; ``n`` rows they came from."""
    buffer = io.BytesIO()
    np.savez(buffer, mean=mean, std=std, n=np.int64(n))
    write_atomic(path, buffer.getvalue())


def load_normalizer(path: Path) -> Normalizer:
    if not path.is_file():
        raise FileNotFoundError(f"normalization stats not found: {path} (materialize normalization_stats first)")
    with np.load(path) as stats:
        return Normalizer(torch.from_numpy(stats["mean"]).float(), torch.from_numpy(stats["std"]).float())
