"""The trainer's own configuration: a plain frozen dataclass, every knob with its default.

Validation (ranges, names, errors that name the field) happens once, outside the core, in
:class:`flow_pipeline.config.TrainConfig`, which converts itself with ``to_core()``; the core never imports it. The
fields here are exactly that model's fields (a test keeps the two in step), plus ``run_name``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class TrainSettings:
    """One training run's knobs (meanings: :class:`flow_pipeline.config.TrainConfig` and README's table).

    run_name: the name its checkpoint directory and tracking run carry (derived by the validated config).
    """

    # what is trained
    arch: str = "mlp"
    flow: str = "icfm"
    model_size: str = "small"
    dim: int = 1024
    sigma: float = 0.0
    sigma_min: float = 1e-4
    linear_skip: bool = False
    principal_dims: int = 0
    time_sampling: str = "uniform"
    # data
    dataset: str = "full"
    aug: str = "none"
    normalization: str = "zscore"
    noise_std: float = 0.1
    mixup_max: float = 0.2
    dropout_p: float = 0.1
    # optimisation
    max_epochs: int = 50
    max_steps: int = 0
    eval_every_steps: int = 0
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_every: int = 10
    patience: int = 20
    min_delta: float = 0.0
    seed: int = 42
    # runtime
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    log_every: int = 10
    save_every_steps: int = 0
    resume: bool = False
    # identity
    run_name: str = "run"

    def flow_params(self) -> dict[str, float]:
        """The keyword arguments of :func:`flow_pipeline.core.flows.get_flow` for this run's flow."""
        return flow_params(self.flow, self.sigma, self.sigma_min)

    def to_dict(self) -> dict:
        """Every knob as a plain dict (``run_name`` left out): the ``config`` stored in checkpoints."""
        return {key: value for key, value in asdict(self).items() if key != "run_name"}


def flow_params(flow: str, sigma: float, sigma_min: float) -> dict[str, float]:
    """Path parameters of ``flow``: ``sigma`` for icfm/otcfm, ``sigma_min`` for fm, none for vp."""
    if flow in ("icfm", "otcfm"):
        return {"sigma": sigma}
    if flow == "fm":
        return {"sigma_min": sigma_min}
    return {}


KNOBS = tuple(field.name for field in fields(TrainSettings) if field.name != "run_name")
