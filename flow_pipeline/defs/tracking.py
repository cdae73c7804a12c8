"""Wandb settings for training runs. The run itself is opened inside the training process (rank 0 only)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from flow_pipeline.config import TrainConfig

TRACKING_MODES = ("auto", "online", "offline", "disabled")


class WandbResource(dg.ConfigurableResource):
    """How training runs are tracked in Wandb.

    mode: ``auto`` (online when WANDB_API_KEY is set, else offline), ``online``, ``offline`` or ``disabled``.
    The API key is read from the environment by the training process and never written to config or metadata.
    """

    mode: str = "disabled"
    project: str = "flow-matching-study"
    group: str = "flow-methods"
    entity: str = ""
    init_timeout_s: float = 30.0

    def job_settings(self, config: TrainConfig, partition_key: str, wandb_dir: Path) -> dict:
        if self.mode not in TRACKING_MODES:
            raise dg.Failure(f"wandb.mode: unknown value {self.mode!r}; valid: {', '.join(TRACKING_MODES)}")
        return {"mode": self.mode, "project": self.project, "group": self.group, "entity": self.entity,
                "dir": str(wandb_dir), "init_timeout_s": self.init_timeout_s}

    def environment(self) -> dict[str, str]:
        return {}
