"""One training run's pieces: built and seeded, restored from a resume point, saved.

:class:`TrainingRun` is what :func:`flow_pipeline.core.trainer.train` works with: the settings, the stateful pieces a
checkpoint holds (:class:`~flow_pipeline.core.checkpoint.RunPieces`), the model as stepped, the validation data and
where the run writes. Building it (:func:`set_up`) fixes every seed; :func:`resume` loads the run directory's resume
point over it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.data.batching import EpochBatchSampler
from flow_pipeline.core.distributed import DistInfo
from flow_pipeline.core.early_stopping import EarlyStopping
from flow_pipeline.core.ema import EMA
from flow_pipeline.core.flows import Flow, get_flow
from flow_pipeline.core.models import start_prototypes
from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.precision import uses_bf16
from flow_pipeline.core.schedule import StepPlan, plan_steps, warmup_cosine_schedule
from flow_pipeline.core.tracking import Tracker
from flow_pipeline.core.train_config import TrainSettings
from flow_pipeline.core.train_state import TrainData, TrainingDiverged, TrainState

logger = logging.getLogger(__name__)

# Seeds of the dedicated generators derive from the run seed with fixed offsets so the streams never coincide.
NOISE_SEED_OFFSET = 1
PROTOTYPE_SEED_OFFSET = 2
VAL_SEED_OFFSET = 2


@dataclass
class TrainingRun:
    """What one call of :func:`train` works with: its settings, the stateful pieces a checkpoint holds, the models
    and data as trained, and where it writes. ``started``/``segment_*`` time this process's part of the run."""

    config: TrainSettings
    data: TrainData
    dist: DistInfo
    tracker: Tracker
    device: torch.device
    run_dir: Path
    state: TrainState
    pieces: ckpt.RunPieces
    train_model: nn.Module  # the model as stepped: DDP-wrapped and/or compiled around pieces.model
    ema_model: nn.Module  # scratch model the EMA weights are copied into for validation
    flow: Flow
    autocast: contextlib.AbstractContextManager
    precision: str  # "bf16" when autocast is on (core/precision.py decides), else "fp32"
    val_z: Tensor
    batch_size: int
    step_plan: StepPlan  # the run's optimizer steps and LR warmup
    started: float = 0.0
    period_started: float = 0.0
    segment_start_seconds: float = 0.0
    segment_start_step: int = 0

    @property
    def total_steps(self) -> int:
        return self.step_plan.total_steps

    @property
    def best_path(self) -> Path:
        return self.run_dir / ckpt.BEST_NAME

    @property
    def last_path(self) -> Path:
        return self.run_dir / ckpt.LAST_NAME

    def start_clock(self) -> None:
        self.started = self.period_started = time.perf_counter()
        self.segment_start_seconds, self.segment_start_step = self.state.train_seconds, self.state.global_step

    def elapsed(self) -> float:
        """Training seconds of the whole run so far, earlier (resumed) segments included."""
        return self.segment_start_seconds + time.perf_counter() - self.started

    def sync_ema(self) -> None:
        # The EMA is updated every ``ema_every`` steps, standing for the steps since its last update; it must be
        # current whenever it is validated or saved, so a resumed run and an uninterrupted one agree bit for bit.
        ema = self.pieces.ema
        if self.state.global_step > ema.num_updates:
            ema.update(self.pieces.model, steps=self.state.global_step - ema.num_updates)

    def save(self, path: Path) -> None:
        if self.dist.is_main:
            ckpt.save_checkpoint(ckpt.capture(self.pieces, config=self.config.to_dict(),
                                              normalization_stats=self.data.normalizer.state_dict(),
                                              data_identity=self.data.identity, world_size=self.dist.world_size),
                                 path)

    def diverged(self, what: str, step: int | None = None) -> TrainingDiverged:
        # ``step`` numbers steps as the tracker does (the k-th optimizer step is step k); default: the last one.
        step = self.state.global_step if step is None else step
        return TrainingDiverged(f"{what} at step {step} (epoch {self.state.epoch + 1}) of run {self.config.run_name}; "
                                f"the last good checkpoint {self.best_path} was left untouched")


def prepare_run_dir(run_dir: Path, dist: DistInfo) -> Path:
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_stale_temp_files(run_dir):
            logger.warning("removed temp file of an interrupted checkpoint write: %s", stale)
    return run_dir


def normalised_data(config: TrainSettings, data: TrainData, device: torch.device) -> tuple[Tensor, Tensor]:
    """(train, val) normalised with ``data.normalizer``, float32 on ``device``; a dim or method mismatch with the
    config is a ValueError naming the field."""
    if data.normalizer.dim != config.dim or data.train.shape[1] != config.dim:
        raise ValueError(f"dim: config says {config.dim}, data has {data.train.shape[1]} columns")
    if data.normalizer.method != config.normalization:
        raise ValueError(f"normalization: config says {config.normalization!r}, the statistics given are "
                         f"{data.normalizer.method!r}")
    train_z = data.normalizer.normalize(torch.as_tensor(data.train, dtype=torch.float32)).to(device)
    val_z = data.normalizer.normalize(torch.as_tensor(data.val, dtype=torch.float32)).to(device)
    return train_z, val_z


def global_batch_size(batch_size: int, n_train: int, world_size: int) -> int:
    """The configured batch, or all training rows (rounded down to a multiple of the ranks) when there are fewer."""
    if batch_size % world_size:
        raise ValueError(f"batch_size: {batch_size} is not a multiple of the {world_size} training "
                         f"processes (each takes an equal block of every batch)")
    usable = min(batch_size, n_train - n_train % world_size)
    if usable != batch_size:
        logger.warning("batch_size %d > %d training rows: using %d", batch_size, n_train, usable)
    return usable


def set_up(config: TrainSettings, data: TrainData, run_dir: Path, tracker: Tracker, dist: DistInfo,
            device: torch.device, train_z: Tensor, batch_size: int, val_z: Tensor) -> TrainingRun:
    """A fresh run's model, EMA, optimiser, schedule, early stopping, sampler and noise generator, all seeded.
    train_z (n_train, dim): the normalised training rows; a linear skip path starts at their variances."""
    sampler = EpochBatchSampler(train_z.shape[0], batch_size, config.seed)
    torch.manual_seed(config.seed)  # model init is the only user of the global RNG
    model = ckpt.model_from_config(config.to_dict()).to(device)
    if isinstance(model, LinearSkip):
        model.start_at(train_z.var(dim=0))
    start_prototypes(model, train_z, config.seed + PROTOTYPE_SEED_OFFSET)
    ema = EMA(model, decay=config.ema_decay)  # after .to(device): the shadow lives where the weights live
    ema_model = ckpt.model_from_config(config.to_dict()).to(device).eval()
    train_model = dist.wrap(model)
    if config.compile:
        train_model = torch.compile(train_model)
    # Fused AdamW runs one kernel per parameter group instead of a Python loop (CPU and CUDA in torch >= 2.4).
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    step_plan = plan_steps(config, sampler.steps_per_epoch)
    if dist.is_main and step_plan.warmup_from != "config":
        logger.info("warmup_steps: %d (%s)", step_plan.warmup_steps, step_plan.warmup_from)
    scheduler = warmup_cosine_schedule(optimizer, step_plan.warmup_steps, step_plan.total_steps, config.min_lr_ratio)
    stopper = EarlyStopping(patience=config.patience, min_delta=config.min_delta)
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + NOISE_SEED_OFFSET)
    use_bf16 = uses_bf16(config.precision, device.type)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    state = TrainState(loss_sum=torch.zeros((), device=device))
    pieces = ckpt.RunPieces(loop=state, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                            stopper=stopper, sampler=sampler, noise_generator=noise_generator)
    return TrainingRun(config=config, data=data, dist=dist, tracker=tracker, device=device, run_dir=run_dir,
                       state=state, pieces=pieces, train_model=train_model, ema_model=ema_model,
                       flow=get_flow(config.flow, **config.flow_params()),
                       autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16),
                       precision="bf16" if use_bf16 else "fp32",
                       val_z=val_z, batch_size=batch_size, step_plan=step_plan)


def resume(run: TrainingRun) -> None:
    """Restore every piece of ``run`` from the run directory's resume point (the newer of last.pt and best.pt)."""
    resume_point = ckpt.resume_point(run.run_dir, run.device)
    if resume_point is None:
        logger.warning("resume requested but %s has no last.pt or best.pt: starting from scratch", run.run_dir)
        return
    source, saved = resume_point
    ckpt.check_resumable(saved, source, run.config, run.data.identity, run.dist.world_size, warn=run.dist.is_main)
    ckpt.restore(run.pieces, saved)
    if run.dist.is_main:
        logger.info("resumed from %s at epoch %d, step %d (best %.4f)", source, run.state.epoch,
                    run.state.global_step, run.pieces.stopper.best_loss)
