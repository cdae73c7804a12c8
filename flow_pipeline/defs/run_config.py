"""The run config of ``trained_checkpoint``, derived from :class:`~flow_pipeline.config.TrainConfig`.

Every training knob is a field of ``TrainConfig`` (type, default, bounds, description); this module turns each one
into a field of the Dagster run config, so the launchpad and ``--config-json`` can set all of them without a
hand-kept copy. Bounds are not repeated here: the values are validated by ``TrainConfig`` in
:meth:`TrainRunConfig.to_train_config`, whose error messages name the field.
"""

from __future__ import annotations

import typing

import dagster as dg
from pydantic import Field, create_model

from flow_pipeline.ablations import ablation_for
from flow_pipeline.config import TrainConfig

# Fields the partition and the data decide: not settable per run.
FROM_PARTITION_AND_DATA = ("arch", "flow", "dim")


def _launchpad_type(annotation) -> type:
    """The plain type Dagster's config schema understands: a ``Literal`` of strings becomes ``str``."""
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


def _description(name: str, info) -> str | None:
    choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
    text = info.description or ""
    if choices:
        text = (text + "; " if text else "") + "one of " + ", ".join(map(str, choices))
    return text or None


class _RunOnlyConfig(dg.Config):
    """Knobs of the Dagster run that are not part of one training's config (how many processes, how many seeds)."""

    gpus_per_run: int = Field(
        default=1, ge=1,
        description="training processes of the run, one per GPU (torchrun, data parallel; on a CPU-only machine "
        "N CPU processes). The run still holds one slot of the 'gpu' pool: set its limit to GPUs // gpus_per_run",
    )

    replicates: int = Field(
        default=1, ge=1,
        description="seeds seed, seed+1, ... trained one after another in this materialization (each its own run "
        "directory, best.pt and Wandb run), under the run's one 'gpu' pool slot; with resume, finished replicates "
        "are skipped",
    )

    def training_values(self) -> dict:
        """The run config's values that belong to ``TrainConfig``."""
        return self.model_dump(exclude=set(_RunOnlyConfig.model_fields))

    def to_train_config(self, partition_key: str, dim: int, device: str) -> TrainConfig:
        """The validated training config of ``partition_key``; ``device`` replaces ``auto``. Raises pydantic's
        ValidationError (format it with :func:`~flow_pipeline.config.format_validation_error`) or ValueError for an
        unknown partition."""
        ablation = ablation_for(partition_key)
        values = self.training_values()
        values["device"] = device if values["device"] == "auto" else values["device"]
        return TrainConfig(arch=ablation.arch, flow=ablation.flow, dim=dim, **values)


def _train_run_fields() -> dict:
    fields = {}
    for name, info in TrainConfig.model_fields.items():
        if name in FROM_PARTITION_AND_DATA:
            continue
        fields[name] = (_launchpad_type(info.annotation), Field(default=info.default, description=_description(name, info)))
    return fields


TrainRunConfig = create_model(
    "TrainRunConfig",
    __base__=_RunOnlyConfig,
    __doc__="Run config of one training run: every TrainConfig knob (validated by TrainConfig before any compute) "
            "plus the run-level gpus_per_run and replicates.",
    **_train_run_fields(),
)
