"""Every training knob as one validated pydantic model, derived from the core's single declaration
(:class:`flow_pipeline.core.train_config.TrainSettings`): errors name the field before any compute starts."""

from __future__ import annotations

from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator,
                      model_validator)
from pydantic.fields import FieldInfo

from flow_pipeline.core.flows import get_flow
from flow_pipeline.core.knobs import Knob, knobs_of
from flow_pipeline.core.run_identity import run_name
from flow_pipeline.core.train_config import TrainSettings, flow_params

DEVICES = "auto, cpu, cuda, cuda:N"


def knob_description(knob: Knob) -> str:
    """The knob's description followed by its valid values (``one of …`` or its bounds)."""
    valid = knob.info.valid_values()
    return f"{knob.info.description}; {valid}" if valid else knob.info.description


def knob_field(knob: Knob, with_bounds: bool = True) -> tuple[Any, FieldInfo]:
    """``(annotation, Field)`` of a declared knob for :func:`pydantic.create_model`: its default and description,
    and (``with_bounds``) its bounds, which pydantic then enforces with the field named."""
    bounds = knob.info.bounds() if with_bounds else {}
    return knob.annotation, Field(knob.default, description=knob_description(knob), **bounds)


def pydantic_fields(settings: type, exclude: tuple[str, ...] = (), with_bounds: bool = True) -> dict:
    """:func:`knob_field` of every knob the dataclass ``settings`` declares, but ``exclude``, in declaration order."""
    return {knob.name: knob_field(knob, with_bounds) for knob in knobs_of(settings) if knob.name not in exclude}


def _choices(field: str) -> tuple[str, ...]:
    return next((knob.info.choices for knob in knobs_of(TrainSettings) if knob.name == field), ())


class _ValidatedTrainSettings(BaseModel):
    """Validation and derived values of :data:`TrainConfig`; its fields come from ``TrainSettings``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*")
    @classmethod
    def _check_name(cls, value: Any, info: ValidationInfo) -> Any:
        """A named knob (arch, flow, dataset, ...) holds one of its declared choices; ``device`` one of
        :data:`DEVICES`."""
        valid = _choices(info.field_name)
        if valid and value not in valid:
            raise ValueError(f"unknown value {value!r}; valid: {', '.join(valid)}")
        if info.field_name == "device" and value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError(f"unknown value {value!r}; valid: {DEVICES}")
        return value

    @model_validator(mode="after")
    def _check_together(self) -> "_ValidatedTrainSettings":
        core = self.to_core()  # unset lengths and network knobs as the run will use them
        if core.max_steps and self.warmup_steps is not None and self.warmup_steps >= core.max_steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} >= max_steps {core.max_steps}: the LR would never "
                             f"leave warmup; lower warmup_steps (or leave it unset for a default that fits) or raise "
                             f"max_steps")
        if core.principal_dims:
            if core.principal_dims > self.dim:
                raise ValueError(f"principal_dims: {core.principal_dims} > dim {self.dim}")
            if self.normalization != "whiten" or not self.linear_skip:
                raise ValueError("principal_dims: needs normalization 'whiten' (coordinates ordered by variance) and "
                                 "linear_skip true (the other coordinates' velocity); 0 trains the network on every "
                                 "coordinate")
        if core.prototypes and not core.principal_dims:
            raise ValueError("prototypes: needs principal_dims > 0 (the features are computed on those coordinates)")
        return self

    @property
    def run_name(self) -> str:
        """:func:`flow_pipeline.core.run_identity.run_name` of this config."""
        return run_name(self)

    def flow_params(self) -> dict[str, float]:
        return flow_params(self.flow, self.sigma, self.sigma_min)

    def to_core(self, train_rows: int | None = None) -> TrainSettings:
        """The validated values as the core's frozen dataclass, with :attr:`run_name` and unset knobs resolved
        (:meth:`TrainSettings.resolved`); ``train_rows`` fills an unset :attr:`train_rows` (the trainer passes the
        rows it has)."""
        values = self.model_dump()
        if values["train_rows"] is None:
            values["train_rows"] = train_rows
        return TrainSettings(**values, run_name=self.run_name).resolved()

    def zero_predictor_loss(self) -> float:
        """Validation loss of a model that always predicts zero: the scale this run's losses are read on."""
        return get_flow(self.flow, **self.flow_params()).zero_predictor_loss()


TrainConfig = create_model(
    "TrainConfig",
    __base__=_ValidatedTrainSettings,
    __module__=__name__,
    __doc__="Resolved configuration of one training run (architecture, flow, data, optimisation, runtime): every "
            "knob of TrainSettings with its default, description and bounds. Validated here; the trainer takes its "
            "plain copy, :meth:`to_core`.",
    **pydantic_fields(TrainSettings),
)


def zero_predictor_loss_of(config: dict) -> float:
    """:meth:`TrainConfig.zero_predictor_loss` of a stored config dict (checkpoint, metadata); only the flow's
    fields are read, so configs written by other versions still give their reference."""
    fields = {name: config[name] for name in ("flow", "sigma", "sigma_min") if name in config}
    return TrainConfig.model_construct(**{**{name: TrainConfig.model_fields[name].default
                                             for name in ("sigma", "sigma_min")}, **fields}).zero_predictor_loss()


def format_validation_error(error: ValidationError) -> str:
    """One line per bad field: ``field: message``."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        lines.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
    return "invalid training config: " + "; ".join(lines)
