"""Replicates of one run identity: which seeds, whether one is already done, and the one reader of the replicate
list in a ``trained_checkpoint`` materialization (evaluation, checks, report and ``show`` all use it).

Replicates are runs of one identity (:mod:`flow_pipeline.core.run_identity`), differing only by seed. Pure: no
Dagster.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow_pipeline.artifacts import RESULT_NAME
from flow_pipeline.core.checkpoint import BEST_NAME, LAST_NAME, CheckpointError, verify
from flow_pipeline.core.run_identity import identity_of
from flow_pipeline.core.study_stats import t_interval


def replicate_seeds(seed: int, replicates: int) -> list[int]:
    """``seed, seed + 1, …, seed + replicates - 1``."""
    if replicates < 1:
        raise ValueError(f"replicates: must be at least 1, got {replicates}")
    return list(range(seed, seed + replicates))


def completed_result(run_dir: Path, config: dict) -> dict | None:
    """The finished run's ``result.json`` values if it is a run of ``config`` (same identity and seed) and its
    ``best.pt`` is complete and intact: no ``last.pt`` (a run in progress), the sha256 that was reported, and it
    loads with weights_only=True. None otherwise (train it)."""
    result_path, best_path = run_dir / RESULT_NAME, run_dir / BEST_NAME
    if not result_path.is_file() or not best_path.is_file() or (run_dir / LAST_NAME).exists():
        return None
    try:
        result = json.loads(result_path.read_text())
        if (identity_of(result["config"]) != identity_of(config) or result["config"]["seed"] != config["seed"]
                or Path(result["checkpoint_path"]) != best_path or not result.get("sha256")):
            return None
        verify(best_path, result["sha256"])
    except (OSError, ValueError, KeyError, CheckpointError):
        return None
    return result


def replicate_entry(values: dict) -> dict:
    """One replicate as listed in the materialization: seed, run name, path, sha256, best val loss, steps."""
    return {"seed": int(values["config"]["seed"]), "run_name": values["run_name"],
            "checkpoint_path": str(values["checkpoint_path"]), "sha256": values["sha256"],
            "best_val_loss": float(values["best_val_loss"]), "global_step": int(values["global_step"]),
            "stopped_early": bool(values["stopped_early"]), "train_seconds": float(values["train_seconds"])}


def summary_metadata(entries: list[dict]) -> dict:
    """Plain metadata over the replicates: their list, count, and mean and 95% t-interval of the best val loss."""
    interval = t_interval([entry["best_val_loss"] for entry in entries])
    return {"replicates": entries, "n_replicates": len(entries), "replicate_seeds": [e["seed"] for e in entries],
            "best_val_loss_mean": interval.mean, "best_val_loss_ci95_low": interval.low,
            "best_val_loss_ci95_high": interval.high}


def replicates_from_metadata(metadata: dict) -> list[dict]:
    """Every replicate of a ``trained_checkpoint`` materialization (plain metadata values): the ``replicates`` list,
    or, for a materialization written before replicates existed, its one checkpoint as a one-item list."""
    if metadata.get("replicates"):
        return list(metadata["replicates"])
    config = metadata.get("config") or {}
    return [{"seed": config.get("seed"), "run_name": metadata.get("run_name"),
             "checkpoint_path": metadata.get("checkpoint_path") and str(metadata["checkpoint_path"]),
             "sha256": metadata.get("sha256"),
             "best_val_loss": metadata.get("best_val_loss"), "global_step": metadata.get("global_step"),
             "stopped_early": metadata.get("stopped_early"), "train_seconds": metadata.get("train_seconds")}]


@dataclass
class ReplicatesResult:
    """The replicates of one training: each one's materialization metadata as reported (the first one's values are
    the partition's headline ones), and the plain summary over all of them (:func:`summary_metadata`)."""

    first: dict
    summary: dict


def train_replicates(config: Any, replicates: int, run_dir_of: Callable[[str], Path],
                     train_one: Callable[[Any], dict], log: Callable[[str], None]) -> ReplicatesResult:
    """Train ``replicates`` runs of ``config`` (a validated TrainConfig) with seeds ``seed, seed + 1, ...``:
    ``train_one(replicate_config)`` trains one and returns its metadata. A replicate whose run directory
    (``run_dir_of(run_name)``) holds a complete, intact run of it is not trained again when ``resume`` is set."""
    entries, first = [], None
    for seed in replicate_seeds(config.seed, replicates):
        replicate = config.model_copy(update={"seed": seed})
        run_dir = run_dir_of(replicate.run_name)
        done = completed_result(run_dir, replicate.to_core().to_dict()) if replicate.resume else None
        if done is not None:
            log(f"replicate seed={seed}: {run_dir / BEST_NAME} is complete and intact, skipped")
            metadata = {key: value for key, value in done.items() if key != "process"}
        else:
            metadata = train_one(replicate)
        entries.append(replicate_entry({key: getattr(value, "value", value) for key, value in metadata.items()}))
        first = first or metadata
    summary = summary_metadata(entries)
    if len(entries) > 1:
        log(f"{len(entries)} replicates, best val loss {summary['best_val_loss_mean']:.4f} "
            f"(95% CI {summary['best_val_loss_ci95_low']:.4f} .. {summary['best_val_loss_ci95_high']:.4f})")
    return ReplicatesResult(first, summary)
