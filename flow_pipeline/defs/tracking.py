"""Wandb settings for training runs. The run itself is opened inside the training process (rank 0 only) by
:func:`flow_pipeline.tracking_wandb.open_wandb_tracker`."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field

from flow_pipeline.config import TrainConfig

TRACKING_MODES = ("auto", "online", "offline", "disabled")


class WandbResource(dg.ConfigurableResource):
    """How training runs are tracked in Wandb.

    The API key is read from the environment (``WANDB_API_KEY``) by the training process, which inherits it; it is
    never written to config, job.json or metadata. Offline runs land under ``<artifacts root>/wandb/wandb/`` and are
    uploaded later with the ``wandb_sync_command`` of their materialization.
    """

    mode: str = Field(default="auto", description="auto (online when WANDB_API_KEY is set, else offline), online, "
                      "offline or disabled; an online start that fails falls back to offline with a warning")
    project: str = "flow-matching-study"
    group: str = Field(default="flow-methods", description="the ablation dimension studied, e.g. flow-methods, "
                       "architectures")
    entity: str = Field(default="", description="Wandb team or user; empty: the key's default entity")
    init_timeout_s: float = Field(default=30.0, description="give up an online start after this long (then offline)")
    flush_interval_s: float = Field(default=1.0, description="seconds between writes of the run's local log: a "
                                    "killed training loses at most about this much of its metrics")

    def job_settings(self, config: TrainConfig, partition_key: str, wandb_dir: Path) -> dict:
        """The ``tracking`` block of job.json (``config`` and ``partition_key`` are the run's; no secrets)."""
        if self.mode not in TRACKING_MODES:
            raise dg.Failure(f"wandb.mode: unknown value {self.mode!r}; valid: {', '.join(TRACKING_MODES)}")
        for name in ("init_timeout_s", "flush_interval_s"):
            if not getattr(self, name) > 0:
                raise dg.Failure(f"wandb.{name}: must be > 0, got {getattr(self, name)!r}")
        return {"mode": self.mode, "project": self.project, "group": self.group, "entity": self.entity,
                "dir": str(wandb_dir), "init_timeout_s": self.init_timeout_s,
                "flush_interval_s": self.flush_interval_s}

    def environment(self) -> dict[str, str]:
        """Nothing: the training process inherits WANDB_* (the API key included) from the Dagster process."""
        return {}
