"""The Wandb-backed :class:`~flow_pipeline.core.tracking.Tracker`, opened inside the training process (rank 0 only).

``open_wandb_tracker(settings, config, partition_key)`` takes the ``tracking`` block of ``job.json`` (written by
:class:`~flow_pipeline.defs.tracking.WandbResource`) and returns ``(tracker, tracking_info)``; ``tracking_info``
becomes materialization metadata: ``tracking`` (the mode actually used) plus ``wandb_url`` when online, or the
offline run directory and the exact ``wandb sync`` command that uploads it later.

Contracts:
- The API key reaches this process only through the inherited environment (``WANDB_API_KEY``); it is never put into
  settings, config, metadata or log lines.
- An online start that fails or exceeds ``init_timeout_s`` falls back to offline tracking with a warning on the
  ``flow_pipeline`` logger (forwarded to the Dagster run log): tracking trouble never stops a training run.
- The run id is derived from the run name, so a resumed training continues the same Wandb run. Every row carries
  ``global_step`` and every metric is plotted against it; rows are logged without an explicit ``step=``, so Wandb
  never drops a resumed segment's rows for repeating steps that the interrupted segment had already logged.
- The offline transaction log is flushed every ``flush_interval_s`` seconds, so a killed process loses at most that
  much of its metrics (Wandb's default is 15 s).
- ``finish`` waits at most ``FINISH_TIMEOUT_S`` for uploads. Checkpoints are never uploaded; the summary holds
  their path.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import wandb

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.tracking import NullTracker, Tracker

logger = logging.getLogger(__name__)

API_KEY_ENV = "WANDB_API_KEY"
FAILED_TAG = "failed"
STEP_METRIC = "global_step"
# Metrics whose best (lowest) value is the useful summary rather than the last one.
MIN_SUMMARY_METRICS = ("train/loss", "val/loss", "val/ema_loss")
# Wandb's default finish blocks until every byte is uploaded; a network that dies late in a run must not hold the
# training process (and its gpu pool slot) forever. What is not sent stays in the run's .wandb file for `wandb sync`.
FINISH_TIMEOUT_S = 120.0


class WandbTracker:
    """Sends the trainer's metrics to one open Wandb run."""

    def __init__(self, run: "wandb.Run") -> None:
        self.run = run

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, STEP_METRIC: step})

    def summary(self, **values: Any) -> None:
        self.run.summary.update(values)

    def finish(self, failed: bool = False) -> None:
        """Close the run. ``failed``: tag it ``failed``, put the error in its notes and exit with code 1. Called
        from a ``finally`` while the error propagates, ``sys.exception()`` is that error."""
        try:
            if failed:
                error = sys.exception()
                self.run.tags = (*self.run.tags, FAILED_TAG)
                self.run.notes = f"failed: {type(error).__name__}: {error}" if error else "failed"
        finally:
            self.run.finish(exit_code=1 if failed else 0)


def resolve_mode(mode: str, environ: dict[str, str] | os._Environ = os.environ) -> str:
    """``auto`` -> ``online`` when an API key is in the environment, else ``offline``; other modes unchanged."""
    if mode == "auto":
        return "online" if environ.get(API_KEY_ENV) else "offline"
    return mode


def wandb_run_id(config: TrainConfig) -> str:
    """Stable id of the run name (arch, flow, dataset, aug, model size, seed): Wandb ids allow ``[\\w-]`` only."""
    return re.sub(r"[^\w-]", "_", config.run_name)


def init_kwargs(settings: dict, config: TrainConfig, partition_key: str | None, mode: str) -> dict:
    """Arguments of ``wandb.init`` for one training run (no secrets: the key stays in the environment)."""
    return {
        "project": settings.get("project") or "flow-matching-study",
        "entity": settings.get("entity") or None,
        "group": settings.get("group") or None,
        "name": config.run_name,
        "id": wandb_run_id(config),
        "job_type": "train",
        "tags": [config.arch, config.flow, config.dataset, config.aug],
        "config": {**config.to_core().to_dict(), "partition": partition_key},
        "resume": "allow",
        "dir": settings["dir"],
        "mode": mode,
        "settings": wandb.Settings(
            init_timeout=float(settings.get("init_timeout_s", 30.0)),
            x_transaction_log_flush_interval=float(settings.get("flush_interval_s", 1.0)),
            finish_timeout=FINISH_TIMEOUT_S,
            console="off",  # the training process's stdout/stderr already reach Dagster's compute logs
            reinit="create_new",  # never hand back a run that an earlier failure left open
        ),
    }


def _scrubbed(error: BaseException) -> str:
    """The error's text with the API key (if any) masked: exception messages may echo request details."""
    text = f"{type(error).__name__}: {error}"
    key = os.environ.get(API_KEY_ENV)
    return text.replace(key, "***") if key else text


def _start_run(kwargs: dict) -> "wandb.Run":
    """``wandb.init``; online trouble (bad key, no network, timeout) becomes an offline run with a warning."""
    if kwargs["mode"] != "online":
        return wandb.init(**kwargs)
    try:
        return wandb.init(**kwargs)
    except Exception as exc:  # wandb raises CommError, AuthenticationError, UsageError, ServerResponseError, ...
        logger.warning("wandb: online tracking could not start (%s); tracking offline instead, upload later with "
                       "the wandb_sync_command in the materialization metadata", _scrubbed(exc))
    # The failed attempt keeps its run id registered in Wandb's service process; only a fresh service accepts it.
    wandb.teardown()
    return wandb.init(**{**kwargs, "mode": "offline"})


def define_metrics(run: "wandb.Run") -> None:
    """Plot every metric against ``global_step``; summarise the losses by their minimum."""
    run.define_metric(STEP_METRIC)
    run.define_metric("*", step_metric=STEP_METRIC)
    for name in MIN_SUMMARY_METRICS:
        run.define_metric(name, summary="min")


def open_wandb_tracker(settings: dict, config: TrainConfig, partition_key: str | None) -> tuple[Tracker, dict]:
    """Open the Wandb run of one training process: ``(tracker, tracking_info)``.

    settings: the ``tracking`` block of ``job.json`` — ``mode`` (auto, online, offline, disabled), ``project``,
    ``group``, ``entity``, ``dir`` (Wandb writes its runs to ``<dir>/wandb/``), ``init_timeout_s``,
    ``flush_interval_s``.
    """
    mode = resolve_mode(settings.get("mode", "auto"))
    if mode == "disabled":
        return NullTracker(), {"tracking": "disabled"}
    Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
    run = _start_run(init_kwargs(settings, config, partition_key, mode))
    define_metrics(run)
    if run.offline:
        run_dir = run.settings.sync_dir
        info = {"tracking": "offline", "wandb_run_dir": run_dir, "wandb_sync_command": f"wandb sync {shlex.quote(run_dir)}"}
    else:
        info = {"tracking": "online", "wandb_url": run.url}
    logger.info("wandb: %s run %s (%s)", info["tracking"], run.id, info.get("wandb_url") or info["wandb_run_dir"])
    return WandbTracker(run), {**info, "wandb_run_id": run.id}
