"""Every training knob as one validated pydantic model: errors name the field before any compute starts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flow_pipeline.core.data.batching import AUGMENTATIONS
from flow_pipeline.core.data.splits import DATASET_SIZES
from flow_pipeline.core.flows import FLOWS, get_flow
from flow_pipeline.core.models import ARCHITECTURES, MODEL_SIZES
from flow_pipeline.core.run_identity import run_name
from flow_pipeline.core.train_config import KNOBS, TrainSettings, flow_params

DEFAULT_MODEL_SIZE = "small"
DEFAULT_SEED = 42
DEFAULT_NORMALIZATION = "zscore"
DEFAULT_LINEAR_SKIP = False
DEFAULT_TIME_SAMPLING = "uniform"
DEFAULT_PRINCIPAL_DIMS = 0


def _one_of(field: str, value: str, valid) -> str:
    if value not in valid:
        raise ValueError(f"{field}: unknown value {value!r}; valid: {', '.join(valid)}")
    return value


class TrainConfig(BaseModel):
    """Resolved configuration of one training run (architecture, flow, data, optimisation, runtime). Validated here;
    the trainer takes its plain copy, :meth:`to_core`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # what is trained
    arch: str = "mlp"
    flow: str = "icfm"
    model_size: str = Field(DEFAULT_MODEL_SIZE, description="tiny (tests), small (CPU), base (GPU), matched (mlp, dit "
                            "and unet within 4% of 1.3M parameters: an architecture comparison at equal capacity)")
    dim: int = Field(1024, gt=0)
    sigma: float = Field(0.0, ge=0, description="icfm/otcfm path noise; 0 is rectified flow")
    sigma_min: float = Field(1e-4, ge=0, lt=1, description="fm path minimum std")
    linear_skip: bool = Field(DEFAULT_LINEAR_SKIP, description="add g(t) * x_t to the velocity field, g the exact "
                              "velocity gain of a diagonal Gaussian with learned per-dimension variances: the network "
                              "then models only what is not Gaussian (meant for whitened data)")
    principal_dims: int = Field(
        DEFAULT_PRINCIPAL_DIMS, ge=0, description="k > 0: the network models only the first k whitened coordinates "
        "(the top k principal directions, where the data's cluster structure lives); the rest follow the linear skip "
        "path's Gaussian velocity. Needs normalization whiten and linear_skip; 0: the network models every coordinate")
    time_sampling: Literal["uniform", "logit_normal"] = Field(
        DEFAULT_TIME_SAMPLING, description="training distribution of t: uniform, or logit_normal (t = sigmoid(N(0, 1)), more "
        "steps mid-path); validation always uses uniform t")
    # data
    dataset: str = "full"
    aug: str = "none"
    normalization: Literal["zscore", "whiten"] = Field(
        DEFAULT_NORMALIZATION, description="zscore: per-dimension mean/std; whiten: PCA whitening with the training "
        "rows' full covariance (eigenvalues shrunk, Ledoit-Wolf). Statistics come from the training rows the run uses",
    )
    noise_std: float = Field(0.1, ge=0)
    mixup_max: float = Field(0.2, ge=0, le=1)
    dropout_p: float = Field(0.1, ge=0, lt=1)
    # optimisation
    max_epochs: int = Field(50, ge=1, description="training length in passes over the data (when max_steps is 0)")
    max_steps: int = Field(0, ge=0, description="optimizer steps of the run and the LR schedule's total, the same for "
                           "every dataset size (a study's budget); 0: max_epochs epochs")
    eval_every_steps: int = Field(0, ge=0, description="validate, keep the best and count patience every N optimizer "
                                  "steps (and after the last); 0: at the end of every epoch")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(200, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_every: int = Field(10, ge=1, description="update the EMA every N steps (decay^N), and always before it "
                           "is validated or saved; 1: every step")
    patience: int = Field(20, ge=0, description="evaluations without EMA val improvement (after warmup) before "
                          "stopping")
    min_delta: float = Field(0.0, ge=0)
    seed: int = Field(DEFAULT_SEED, ge=0)
    # runtime
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    log_every: int = Field(10, ge=1)
    save_every_steps: int = Field(0, ge=0, description="also write last.pt every N steps (0: once per epoch)")
    resume: bool = False

    @model_validator(mode="after")
    def _check_names(self) -> "TrainConfig":
        _one_of("arch", self.arch, ARCHITECTURES)
        _one_of("flow", self.flow, tuple(FLOWS))
        _one_of("model_size", self.model_size, MODEL_SIZES)
        _one_of("dataset", self.dataset, tuple(DATASET_SIZES))
        _one_of("aug", self.aug, AUGMENTATIONS)
        if self.max_steps and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} >= max_steps {self.max_steps}: the LR would never "
                             f"leave warmup; lower warmup_steps or raise max_steps")
        if self.principal_dims:
            if self.principal_dims > self.dim:
                raise ValueError(f"principal_dims: {self.principal_dims} > dim {self.dim}")
            if self.normalization != "whiten" or not self.linear_skip:
                raise ValueError("principal_dims: needs normalization 'whiten' (coordinates ordered by variance) and "
                                 "linear_skip true (the other coordinates' velocity)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: unknown value {self.device!r}; valid: auto, cpu, cuda, cuda:N")
        return self

    @property
    def run_name(self) -> str:
        """:func:`flow_pipeline.core.run_identity.run_name` of this config."""
        return run_name(self)

    def flow_params(self) -> dict[str, float]:
        return flow_params(self.flow, self.sigma, self.sigma_min)

    def to_core(self) -> TrainSettings:
        """The validated values as the core's frozen dataclass, with :attr:`run_name`."""
        values = self.model_dump()
        if set(values) != set(KNOBS):
            raise TypeError(f"TrainConfig and flow_pipeline.core.train_config.TrainSettings disagree: only in "
                            f"TrainConfig {sorted(set(values) - set(KNOBS))}, only in TrainSettings "
                            f"{sorted(set(KNOBS) - set(values))}; add a new knob to both")
        return TrainSettings(**values, run_name=self.run_name)

    def zero_predictor_loss(self) -> float:
        """Validation loss of a model that always predicts zero: the scale this run's losses are read on."""
        return get_flow(self.flow, **self.flow_params()).zero_predictor_loss()


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
