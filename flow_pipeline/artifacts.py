"""Where the pipeline's files live under one root directory, and the small files it writes there.

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

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flow_pipeline.core.atomic import write_bytes_atomic
from flow_pipeline.core.data import Normalizer


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
        (:func:`flow_pipeline.evaluation_references.cached_references`)."""
        return self.root / "evaluation" / "references"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, the directory fsynced (:func:`flow_pipeline.core.atomic.write_bytes_atomic`)."""
    write_bytes_atomic(path, data)


def write_json(path: Path, value: object) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode())


def save_normalizer(path: Path, normalizer: Normalizer, extra: dict | None = None) -> None:
    """Write a Normalizer's state (method, mean, std, components when whitening) as one ``.npz``, atomically;
    ``extra`` (JSON-serialisable: where the rows came from, how many) is kept beside it under ``info``."""
    arrays = {key: value.numpy() for key, value in normalizer.state_dict().items() if key != "method"}
    info = {**normalizer.details, **(extra or {})}
    buffer = io.BytesIO()
    np.savez(buffer, method=np.array(normalizer.method), info=np.array(json.dumps(info, sort_keys=True)), **arrays)
    write_atomic(path, buffer.getvalue())


def load_normalizer(path: Path) -> Normalizer:
    """The Normalizer saved by :func:`save_normalizer` at ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"normalization stats not found: {path} (materialize normalization_stats first)")
    with np.load(path, allow_pickle=False) as stats:
        state = {key: torch.from_numpy(stats[key]) for key in stats.files if key not in ("method", "info")}
        state["method"] = str(stats["method"]) if "method" in stats.files else "zscore"
    return Normalizer.from_state_dict(state)


def normalizer_sha256(normalizer: Normalizer) -> str:
    """sha256 of a Normalizer's content (method and arrays), unlike the file's: the same statistics written again
    hash the same."""
    digest = hashlib.sha256(normalizer.method.encode())
    for key, value in sorted(normalizer.state_dict().items()):
        if key != "method":
            digest.update(key.encode() + value.contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_normalizer_info(path: Path) -> dict:
    """The ``info`` saved with a Normalizer (rows it was fitted on, subset, shrinkage...)."""
    with np.load(path, allow_pickle=False) as stats:
        return json.loads(str(stats["info"])) if "info" in stats.files else {}
