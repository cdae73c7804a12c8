"""The training loop: flow-matching regression with EMA, warmup-cosine LR, early stopping and resumable checkpoints.

``train(config, data, run_dir, tracker)`` never opens Wandb, reads environment variables or picks paths: side
effects come in as arguments and results go out as a :class:`TrainResult`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.data import EpochBatchSampler, Normalizer, augment
from flow_pipeline.core.distributed import DistInfo
from flow_pipeline.core.early_stopping import EarlyStopping
from flow_pipeline.core.ema import EMA
from flow_pipeline.core.flows import Flow, PathSample, get_flow
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.schedule import warmup_cosine_schedule
from flow_pipeline.core.time_sampling import sample_times
from flow_pipeline.core.tracking import NullTracker, Tracker

logger = logging.getLogger(__name__)

# Seeds of the dedicated generators derive from the run seed with fixed offsets so the streams never coincide.
_NOISE_SEED_OFFSET = 1
_VAL_SEED_OFFSET = 2


class TrainSettings(Protocol):
    """What the trainer reads of a run's config: every knob of :class:`flow_pipeline.config.TrainConfig` (validated
    there, outside the core) as attributes, plus ``run_name``, ``flow_params()`` and ``model_dump()`` (a plain dict,
    stored in the checkpoint). The core never imports that class."""

    arch: str
    flow: str
    dim: int
    seed: int
    run_name: str

    def flow_params(self) -> dict: ...

    def model_dump(self) -> dict: ...


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became non-finite; the last good checkpoint on disk is untouched."""


@dataclass
class TrainData:
    """Raw (un-normalised) embeddings: train (n_train, dim), exactly the rows the run trains on; val (n_val, dim);
    the normalisation fitted on those train rows. identity: which rows and statistics these are (subset, stats
    sha256), kept in the checkpoint; a resume with a different identity is refused."""

    train: Tensor
    val: Tensor
    normalizer: Normalizer
    identity: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    best_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    global_step: int
    checkpoint_path: Path
    sha256: str
    size_bytes: int
    train_seconds: float
    device: str
    num_params: int
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU (with a warning); ``cuda`` without CUDA is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("device=auto: no CUDA device visible, training on the CPU")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def _build_model(config: TrainSettings) -> nn.Module:
    return build_model(config.arch, dim=config.dim, size=config.model_size, linear_skip=config.linear_skip)


def draw_path(flow: Flow, x_1: Tensor, generator: torch.Generator, time_sampling: str = "uniform") -> PathSample:
    """Noise x_0 ~ N(0, I) (batch, dim) and times t (batch,) drawn by ``time_sampling`` for every row of the data
    batch x_1, then the flow's pairing and path point. Under data parallelism every rank calls this on the whole
    global batch with an identically seeded generator: each row gets the noise it would get in one process, OT pairs
    and mixup partners span the global batch, and the generators of all ranks stay in the same state."""
    x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device)
    t = sample_times(x_1.shape[0], time_sampling, generator, x_1.device)
    return flow.sample(x_0, x_1, t, generator=generator)


def flow_matching_loss(model: nn.Module, path: PathSample, rows: slice,
                       autocast: contextlib.AbstractContextManager) -> Tensor:
    """MSE (scalar tensor) between the model's prediction at ``path.x_t[rows]`` and ``path.target[rows]``."""
    with autocast:
        prediction = model(path.x_t[rows], path.t[rows])
    return F.mse_loss(prediction.float(), path.target[rows])


@torch.no_grad()
def validate(model: nn.Module, flow: Flow, val: Tensor, batch_size: int, seed: int,
             autocast: contextlib.AbstractContextManager, dist: DistInfo) -> float:
    """Mean flow-matching loss on ``val`` (normalised, (n_val, dim)) with x_0, t drawn from a generator seeded
    with ``seed``: the same weights always give the same value. Each rank evaluates its block of every batch
    (the noise is drawn for the whole batch, so the value does not depend on the world size); the per-rank sums
    are added up across ranks."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=val.device).manual_seed(seed)
    total = torch.zeros((), device=val.device, dtype=torch.float64)
    for start in range(0, val.shape[0], batch_size):
        path = draw_path(flow, val[start : start + batch_size], generator)
        mine = dist.shard(path.x_t.shape[0])
        n_mine = mine.stop - mine.start
        if n_mine:
            total += flow_matching_loss(model, path, mine, autocast).double() * n_mine
    total = dist.all_reduce_sum(total)
    model.train(was_training)
    return float(total) / val.shape[0]


def _rng_state(noise_generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict, noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# Config fields that must match for a resume to continue the same trajectory.
_RESUME_MUST_MATCH = ("arch", "flow", "model_size", "dim", "batch_size", "seed", "dataset", "aug", "normalization",
                      "max_steps", "eval_every_steps")


# What a knob was, in effect, for checkpoints written before it existed.
_BEFORE_THE_KNOB_EXISTED = {"normalization": "zscore", "max_steps": 0, "eval_every_steps": 0}


def _check_resumable(saved: dict, config: TrainSettings, path: Path) -> None:
    saved = {key: saved.get(key, _BEFORE_THE_KNOB_EXISTED.get(key)) for key in _RESUME_MUST_MATCH}
    wrong = [f"{key}: checkpoint {saved[key]!r} vs run {getattr(config, key)!r}"
             for key in _RESUME_MUST_MATCH if saved[key] != getattr(config, key)]
    if wrong:
        raise ValueError(f"cannot resume from {path}: it was trained with a different config ({'; '.join(wrong)})")


def reads_values_every_step(device: torch.device) -> bool:
    """Whether the loop reads the loss and gradient norm on the host at every step: on the CPU that is free, so
    every step is checked for divergence and gradients are rescaled only when clipping changes them; on an
    accelerator a read stalls the queue, so values are read at logging intervals and clipping never branches."""
    return device.type == "cpu"


def _latest_checkpoint(paths: list[Path], device: torch.device) -> tuple[Path, dict] | None:
    """The existing checkpoint of ``paths`` with the highest global step, loaded; None if there is none.

    Normally last.pt exists only while it is newer than best.pt, but a kill between writing best.pt and removing
    the older last.pt leaves both: the step, not the name, says which one to continue from.
    """
    loaded = [(path, ckpt.load_checkpoint(path, map_location=device)) for path in paths if path.exists()]
    # At equal steps (a last.pt saved at an epoch's final step, then best.pt after its validation) the later epoch.
    return max(loaded, key=lambda item: (item[1]["global_step"], item[1]["epoch"]), default=None)


def planned_steps(config: TrainSettings, steps_per_epoch: int) -> int:
    """Optimizer steps of the run, the LR schedule's total: ``max_steps`` when set (the same for every dataset size),
    else ``max_epochs`` epochs. A warmup that never ends is rejected: the LR would never decay and early stopping,
    which counts only after warmup, would never act."""
    total = config.max_steps or config.max_epochs * steps_per_epoch
    if config.warmup_steps >= total:
        source = "max_steps" if config.max_steps else f"max_epochs x {steps_per_epoch} steps per epoch"
        raise ValueError(f"warmup_steps: {config.warmup_steps} >= the run's {total} optimizer steps ({source}); "
                         f"lower warmup_steps or raise max_steps/max_epochs")
    return total


def train(config: TrainSettings, data: TrainData, run_dir: str | Path, tracker: Tracker | None = None,
          dist: DistInfo | None = None) -> TrainResult:
    """Train one model; ``best.pt`` (and, while running, ``last.pt``) are written to ``run_dir``.

    ``last.pt`` exists only while it is newer than ``best.pt``: after an improving epoch best.pt is the resume point.

    With ``config.resume`` the run continues from ``last.pt`` (or ``best.pt`` if there is no ``last.pt``) with every
    piece of state restored, so an interrupted run ends bit-identical to an uninterrupted one on the CPU.
    Raises :class:`TrainingDiverged` on a non-finite loss or gradient norm.
    """
    tracker = tracker or NullTracker()
    dist = dist or DistInfo()
    run_dir = Path(run_dir)
    best_path, last_path = run_dir / ckpt.BEST_NAME, run_dir / ckpt.LAST_NAME
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_stale_temp_files(run_dir):
            logger.warning("removed temp file of an interrupted checkpoint write: %s", stale)
    device = dist.device if dist.device is not None else resolve_device(config.device)

    # --- data: normalised once, resident on the device; batches are index selections ---------------------------
    if data.normalizer.dim != config.dim or data.train.shape[1] != config.dim:
        raise ValueError(f"dim: config says {config.dim}, data has {data.train.shape[1]} columns")
    if data.normalizer.method != config.normalization:
        raise ValueError(f"normalization: config says {config.normalization!r}, the statistics given are "
                         f"{data.normalizer.method!r}")
    train_z = data.normalizer.normalize(torch.as_tensor(data.train, dtype=torch.float32)).to(device)
    val_z = data.normalizer.normalize(torch.as_tensor(data.val, dtype=torch.float32)).to(device)
    if config.batch_size % dist.world_size:
        raise ValueError(f"batch_size: {config.batch_size} is not a multiple of the {dist.world_size} training "
                         f"processes (each takes an equal block of every batch)")
    batch_size = min(config.batch_size, train_z.shape[0] - train_z.shape[0] % dist.world_size)
    if batch_size != config.batch_size:
        logger.warning("batch_size %d > %d training rows: using %d", config.batch_size, train_z.shape[0], batch_size)
    # Global batches on every rank; each rank trains on its block ``mine`` of each one (see draw_path).
    sampler = EpochBatchSampler(train_z.shape[0], batch_size, config.seed)
    mine = dist.shard(batch_size)

    # --- model, EMA, optimiser, schedule -----------------------------------------------------------------------
    torch.manual_seed(config.seed)  # model init is the only user of the global RNG
    model = _build_model(config).to(device)
    ema = EMA(model, decay=config.ema_decay)  # after .to(device): the shadow lives where the weights live
    ema_model = _build_model(config).to(device).eval()
    train_model = dist.wrap(model)
    if config.compile:
        train_model = torch.compile(train_model)
    # Fused AdamW runs one kernel per parameter group instead of a Python loop (CPU and CUDA in torch >= 2.4).
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    total_steps = planned_steps(config, sampler.steps_per_epoch)
    scheduler = warmup_cosine_schedule(optimizer, config.warmup_steps, total_steps, config.min_lr_ratio)
    stopper = EarlyStopping(patience=config.patience, min_delta=config.min_delta)
    flow = get_flow(config.flow, **config.flow_params())
    noise_generator = torch.Generator(device=device).manual_seed(config.seed + _NOISE_SEED_OFFSET)
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    epoch, global_step, best_epoch, train_seconds, history = 0, 0, 0, 0.0, []
    stopped_early = False
    # Running sum of the current epoch's losses, part of the state so a mid-epoch resume reports the same mean.
    loss_sum = torch.zeros((), device=device)
    steps_this_epoch = 0

    # --- resume ----------------------------------------------------------------------------------------------
    if config.resume:
        resume_point = _latest_checkpoint([last_path, best_path], device)
        if resume_point is None:
            logger.warning("resume requested but %s has no last.pt or best.pt: starting from scratch", run_dir)
        else:
            source, state = resume_point
            _check_resumable(state["config"], config, source)
            if state.get("data_identity") and data.identity and state["data_identity"] != data.identity:
                raise ValueError(f"cannot resume from {source}: it was trained on other data or statistics "
                                 f"({state.get('data_identity')} vs {data.identity})")
            saved_world_size = state.get("world_size", 1)
            if saved_world_size != dist.world_size and dist.is_main:
                # Same batches and noise, so the run continues its trajectory; only the order in which gradients
                # are summed changes, so it is no longer bit-identical to an uninterrupted run.
                logger.warning("resuming a run trained by %d processes with %d", saved_world_size, dist.world_size)
            model.load_state_dict(state["model_state_dict"])
            ema.load_state_dict(state["ema_state"])
            optimizer.load_state_dict(state["optimizer_state_dict"])
            scheduler.load_state_dict(state["scheduler_state_dict"])
            stopper.load_state_dict(state["early_stopping"])
            sampler.load_state_dict(state["sampler"])
            _set_rng_state(state["rng"], noise_generator)
            epoch, global_step = state["epoch"], state["global_step"]
            best_epoch, train_seconds = state["best_epoch"], state["train_seconds"]
            history = list(state["history"])
            loss_sum = state["epoch_loss_sum"].to(device)
            steps_this_epoch = state["epoch_steps"]
            stopped_early = stopper.should_stop
            if dist.is_main:
                logger.info("resumed from %s at epoch %d, step %d (best %.4f)", source, epoch, global_step,
                            stopper.best_loss)

    def checkpoint_state() -> dict:
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "epoch": epoch,
            "global_step": global_step,
            "model_state_dict": model.state_dict(),
            "ema_shadow": ema.shadow_dict(),
            "ema_state": ema.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "best_loss": stopper.best_loss,
            "best_epoch": best_epoch,
            "config": config.model_dump(),
            "normalization_stats": data.normalizer.state_dict(),
            "data_identity": data.identity,
            "early_stopping": stopper.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": _rng_state(noise_generator),
            "history": history,
            "epoch_loss_sum": loss_sum.detach().cpu(),
            "epoch_steps": steps_this_epoch,
            "world_size": dist.world_size,
            "train_seconds": train_seconds,
            "num_params": count_parameters(model),
        }

    def save(path: Path) -> str | None:
        return ckpt.save_checkpoint(checkpoint_state(), path) if dist.is_main else None

    def sync_ema() -> None:
        # The EMA is updated every ``ema_every`` steps, standing for the steps since its last update; it must be
        # current whenever it is validated or saved, so a resumed run and an uninterrupted one agree bit for bit.
        if global_step > ema.num_updates:
            ema.update(model, steps=global_step - ema.num_updates)

    def diverged(what: str, step: int | None = None) -> TrainingDiverged:
        # ``step`` numbers steps as the tracker does (the k-th optimizer step is step k); default: the last one.
        step = global_step if step is None else step
        return TrainingDiverged(f"{what} at step {step} (epoch {epoch + 1}) of run {config.run_name}; "
                                f"the last good checkpoint {best_path} was left untouched")

    check_every_step = reads_values_every_step(device)
    started = time.perf_counter()
    segment_start_seconds, segment_start_step = train_seconds, global_step
    eval_by_steps = config.eval_every_steps > 0
    period_started = started  # start of the steps the next evaluation reports on

    def evaluate() -> None:
        """Validate raw and EMA weights on the steps since the last evaluation, select on EMA, write best.pt (or
        last.pt), log. Called at every epoch end, or every ``eval_every_steps`` steps, and after the final step."""
        nonlocal loss_sum, steps_this_epoch, best_epoch, stopped_early, train_seconds, period_started
        train_loss = float(loss_sum / max(1, steps_this_epoch))
        if not math.isfinite(train_loss):
            raise diverged(f"non-finite mean training loss {train_loss}")
        loss_sum = torch.zeros((), device=device)
        steps_this_epoch = 0
        val_seed = config.seed + _VAL_SEED_OFFSET
        val_loss = validate(model, flow, val_z, batch_size, val_seed, autocast, dist)
        sync_ema()
        ema.copy_to(ema_model)
        ema_val_loss = validate(ema_model, flow, val_z, batch_size, val_seed, autocast, dist)
        if not math.isfinite(ema_val_loss):
            raise diverged(f"non-finite EMA validation loss {ema_val_loss}")
        improved = stopper.update(ema_val_loss, counting=global_step >= config.warmup_steps)
        train_seconds = segment_start_seconds + time.perf_counter() - started
        lr = scheduler.get_last_lr()[0]
        # Step-cadence evaluations fall inside epochs: their epoch is fractional (steps / steps per epoch).
        epoch_label = round(global_step / sampler.steps_per_epoch, 3) if eval_by_steps else epoch
        history.append({"epoch": epoch_label, "step": global_step, "train_loss": train_loss, "val_loss": val_loss,
                        "ema_val_loss": ema_val_loss, "lr": lr, "seconds": train_seconds})
        if improved:
            best_epoch = epoch
            save(best_path)  # before the patience check: the best weights are on disk before we may stop
            # best.pt now holds exactly the state a resume needs, so the older last.pt goes instead of a second
            # write of the same ~100 MB (a resume reads last.pt when there is one, else best.pt).
            if dist.is_main:
                last_path.unlink(missing_ok=True)
        else:
            save(last_path)
        stopped_early = stopper.should_stop
        if dist.is_main:
            tracker.log({"val/loss": val_loss, "val/ema_loss": ema_val_loss, "val/best_loss": stopper.best_loss,
                         "epoch": epoch_label}, step=global_step)
            period_seconds = time.perf_counter() - period_started
            seconds_per_step = (train_seconds - segment_start_seconds) / max(1, global_step - segment_start_step)
            eta = 0 if stopped_early else seconds_per_step * (total_steps - global_step)
            best = " *best*" if improved else ""
            if eval_by_steps:
                logger.info("step %d/%d (epoch %s) train_loss=%.4f val_loss=%.4f ema_val_loss=%.4f%s lr=%.2e "
                            "period_s=%.1f elapsed_s=%.1f eta_s=%.0f", global_step, total_steps, epoch_label,
                            train_loss, val_loss, ema_val_loss, best, lr, period_seconds, train_seconds, eta)
            else:
                logger.info("epoch %d/%d train_loss=%.4f val_loss=%.4f ema_val_loss=%.4f%s lr=%.2e epoch_s=%.1f "
                            "elapsed_s=%.1f eta_s=%.0f", epoch, -(-total_steps // sampler.steps_per_epoch),
                            train_loss, val_loss, ema_val_loss, best, lr, period_seconds, train_seconds, eta)
            if stopped_early:
                logger.info("early stopping at step %d: no EMA val improvement for %d evaluations", global_step,
                            stopper.bad_epochs)
        period_started = time.perf_counter()

    # --- training loop -----------------------------------------------------------------------------------------
    while global_step < total_steps and not stopped_early:
        train_model.train()
        for rows in sampler.epoch_batches(device):
            x_1 = augment(train_z[rows], config.aug, noise_generator, config.noise_std, config.mixup_max, config.dropout_p)
            path = draw_path(flow, x_1, noise_generator, config.time_sampling)
            loss = flow_matching_loss(train_model, path, mine, autocast)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP this also averages the gradients of all ranks
            # The global batch's loss on every rank, so every rank takes the same divergence decision and the
            # epoch mean (part of the checkpoint) does not depend on which rank saved it.
            batch_loss = dist.all_reduce_mean(loss.detach())
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            # clip_grad_norm_ rescales every gradient by min(1, grad_clip / (norm + 1e-6)), by exactly 1.0 when nothing
            # is clipped, so that CUDA never waits for the norm. On the CPU a host read is free: rescale only when
            # that very coefficient is below 1, which gives bit-identical gradients either way.
            if not check_every_step or (config.grad_clip / (grad_norm + 1e-6)).item() < 1.0:
                torch.nn.utils.clip_grads_with_norm_(model.parameters(), config.grad_clip, grad_norm)
            if check_every_step and not (math.isfinite(batch_loss.item()) and math.isfinite(grad_norm.item())):
                raise diverged(f"non-finite loss {batch_loss.item()} / grad norm {grad_norm.item()}",
                               step=global_step + 1)
            step_lr = optimizer.param_groups[0]["lr"]  # the LR this step uses; the scheduler moves on below
            optimizer.step()
            scheduler.step()
            global_step += 1
            if global_step % config.ema_every == 0:
                sync_ema()
            steps_this_epoch += 1
            loss_sum += batch_loss
            if global_step % config.log_every == 0:
                loss_value, norm_value = batch_loss.item(), grad_norm.item()  # host sync only at logging intervals
                if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                    raise diverged(f"non-finite loss {loss_value} / grad norm {norm_value}")
                if dist.is_main:
                    tracker.log({"train/loss": loss_value, "train/grad_norm": norm_value,
                                 "train/lr": step_lr, "epoch": epoch + 1}, step=global_step)
            if config.save_every_steps and global_step % config.save_every_steps == 0:
                # Without per-step reads a non-finite step may not have been seen yet: one read here (saves are
                # rare) keeps a diverged state out of last.pt. A non-finite loss in any step of the epoch makes the
                # sum non-finite; a non-finite gradient with a finite loss shows in this step's norm (an earlier
                # one has already made the weights, and so this epoch's later losses, non-finite).
                if not check_every_step and not math.isfinite((loss_sum + grad_norm).item()):
                    raise diverged("non-finite training loss found before a checkpoint save")
                train_seconds = segment_start_seconds + time.perf_counter() - started
                sync_ema()
                save(last_path)
            finished = global_step >= total_steps
            inside_epoch = sampler.position < sampler.steps_per_epoch
            if eval_by_steps and (finished or global_step % config.eval_every_steps == 0):
                evaluate()
            elif finished and inside_epoch:
                evaluate()  # max_steps ended the run inside an epoch: its final evaluation
            # Leave mid-epoch only; at an epoch's last batch the loop ends by itself, and the sampler moves on.
            if (finished or stopped_early) and inside_epoch:
                break
        else:
            # --- end of epoch: validate raw and EMA weights, select on EMA -------------------------------------
            epoch += 1
            if not eval_by_steps:
                evaluate()

    # --- finish: best-only on disk ----------------------------------------------------------------------------
    dist.barrier()
    if not best_path.exists():
        raise RuntimeError(f"run {config.run_name} finished without writing {best_path}")
    if dist.is_main:
        last_path.unlink(missing_ok=True)
    return TrainResult(
        best_loss=stopper.best_loss,
        best_epoch=best_epoch,
        epochs_run=epoch,
        stopped_early=stopped_early,
        global_step=global_step,
        checkpoint_path=best_path,
        sha256=ckpt.sha256_file(best_path),
        size_bytes=best_path.stat().st_size,
        train_seconds=train_seconds,
        device=str(device),
        num_params=count_parameters(model),
        history=history,
    )
