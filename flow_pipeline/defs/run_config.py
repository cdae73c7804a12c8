"""The run config of ``trained_checkpoint``, derived from the knob declarations.

Every training knob is declared once in :class:`~flow_pipeline.core.train_config.TrainSettings` (type, default,
bounds, description); this module turns each one into a field of the Dagster run config, so the launchpad and
``--config-json`` can set all of them without a hand-kept copy. Their bounds are not enforced here: the values are
validated by :data:`~flow_pipeline.config.TrainConfig` in :meth:`TrainRunConfig.to_train_config`, whose errors name
the field and fail the run as a config failure. The run-level knobs (:class:`RunLevelSettings`) are declared here.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg
from pydantic import create_model

from flow_pipeline.ablations import ablation_for
from flow_pipeline.config import TrainConfig, pydantic_fields
from flow_pipeline.core.knobs import knob, knobs_of
from flow_pipeline.core.train_config import TrainSettings

# Fields the partition and the data decide: not settable per run.
FROM_PARTITION_AND_DATA = ("arch", "flow", "dim", "train_rows")
RUN = "run"


@dataclass(frozen=True)
class RunLevelSettings:
    """Knobs of the Dagster run that are not part of one training's config (how many processes, how many seeds)."""

    gpus_per_run: int = knob(
        1, "training processes of the run, one per GPU (torchrun, data parallel; on a CPU-only machine N CPU "
        "processes). The run still holds one slot of the 'gpu' pool: set its limit to GPUs // gpus_per_run",
        group=RUN, ge=1)
    replicates: int = knob(
        1, "seeds seed, seed+1, ... trained one after another in this materialization (each its own run directory, "
        "best.pt and Wandb run), under the run's one 'gpu' pool slot; with resume, finished replicates are skipped",
        group=RUN, ge=1)


class _RunOnlyConfig(dg.Config):
    """Base of :data:`TrainRunConfig`: turns its values into the validated training config."""

    def training_values(self) -> dict:
        """The run config's values that belong to ``TrainConfig``."""
        return self.model_dump(exclude={knob.name for knob in knobs_of(RunLevelSettings)})

    def to_train_config(self, partition_key: str, dim: int, device: str,
                        train_rows: int | None = None) -> TrainConfig:
        """The validated training config of ``partition_key`` on data of ``dim`` columns and ``train_rows`` training
        rows (None: not known yet); ``device`` replaces ``auto``. Raises pydantic's ValidationError (format it with
        :func:`~flow_pipeline.config.format_validation_error`) or ValueError for an unknown partition."""
        ablation = ablation_for(partition_key)
        values = self.training_values()
        values["device"] = device if values["device"] == "auto" else values["device"]
        return TrainConfig(arch=ablation.arch, flow=ablation.flow, dim=dim, train_rows=train_rows, **values)


TrainRunConfig = create_model(
    "TrainRunConfig",
    __base__=_RunOnlyConfig,
    __module__=__name__,
    __doc__="Run config of one training run: every training knob (validated by TrainConfig before any compute) "
            "plus the run-level gpus_per_run and replicates.",
    **pydantic_fields(RunLevelSettings),
    **pydantic_fields(TrainSettings, exclude=FROM_PARTITION_AND_DATA, with_bounds=False),
)
