"""The training loop: flow-matching regression with EMA, warmup-cosine LR, early stopping and resumable checkpoints.

``train(config, data, run_dir, tracker)`` never opens Wandb, reads environment variables or picks paths: side
effects come in as arguments and results go out as a :class:`TrainResult`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.data.batching import augment
from flow_pipeline.core.distributed import DistInfo, resolve_device
from flow_pipeline.core.flows import Flow, draw_path, flow_matching_loss
from flow_pipeline.core.models import count_parameters
from flow_pipeline.core.schedule import plan_steps
from flow_pipeline.core.tracking import NullTracker, Tracker
from flow_pipeline.core.train_config import TrainSettings
from flow_pipeline.core.train_state import TrainData, TrainingDiverged, TrainResult, TrainState
from flow_pipeline.core.training_run import (VAL_SEED_OFFSET, TrainingRun, global_batch_size, normalised_data,
                                             prepare_run_dir, resume, set_up)

__all__ = ["TrainData", "TrainResult", "TrainSettings", "TrainState", "TrainingDiverged", "plan_steps",
           "reads_values_every_step", "train", "validate"]

logger = logging.getLogger(__name__)


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


def reads_values_every_step(device: torch.device) -> bool:
    """Whether the loop reads the loss and gradient norm on the host at every step: on the CPU that is free, so
    every step is checked for divergence and gradients are rescaled only when clipping changes them; on an
    accelerator a read stalls the queue, so values are read at logging intervals and clipping never branches."""
    return device.type == "cpu"


def with_train_rows(config, rows: int) -> TrainSettings:
    """``config`` (:class:`TrainSettings`, or a validated config with ``to_core``) as core settings whose
    ``train_rows`` is ``rows``, the training rows the run has, so unset knobs sized by them resolve from the data.
    Raises ValueError when the config names another number of rows (it was resolved for other data)."""
    if not isinstance(config, TrainSettings):
        config = config.to_core(train_rows=rows)
    if config.train_rows is None:
        return replace(config, train_rows=rows)
    if config.train_rows != rows:
        raise ValueError(f"train_rows: the config was set up for {config.train_rows} training rows, the data has "
                         f"{rows}")
    return config


def train(config: TrainSettings, data: TrainData, run_dir: str | Path, tracker: Tracker | None = None,
          dist: DistInfo | None = None) -> TrainResult:
    """Train one model; ``best.pt`` (and, while running, ``last.pt``) are written to ``run_dir``.

    ``config``: the core's :class:`TrainSettings`, or a validated config that converts itself (``to_core()``, as
    :class:`flow_pipeline.config.TrainConfig` does).

    ``last.pt`` exists only while it is newer than ``best.pt``: after an improving epoch best.pt is the resume point.

    With ``config.resume`` the run continues from the newer of ``last.pt`` and ``best.pt`` with every piece of state
    restored, so an interrupted run ends bit-identical to an uninterrupted one on the CPU.
    Raises :class:`TrainingDiverged` on a non-finite loss or gradient norm.
    """
    config = with_train_rows(config, data.train.shape[0]).resolved()
    dist = dist or DistInfo()
    device = dist.device if dist.device is not None else resolve_device(config.device)
    run_dir = prepare_run_dir(Path(run_dir), dist)

    # --- data: normalised once, resident on the device; batches are index selections ---------------------------
    train_z, val_z = normalised_data(config, data, device)
    batch_size = global_batch_size(config.batch_size, train_z.shape[0], dist.world_size)
    mine = dist.shard(batch_size)  # every rank draws whole global batches and trains on its block (see draw_path)

    # --- model, EMA, optimiser, schedule; then the resume point's state over them -------------------------------
    run = set_up(config, data, run_dir, tracker or NullTracker(), dist, device, train_z, batch_size, val_z)
    if config.resume:
        resume(run)
    state, pieces, sampler, generator = run.state, run.pieces, run.pieces.sampler, run.pieces.noise_generator
    check_every_step = reads_values_every_step(device)
    eval_by_steps = config.eval_every_steps > 0
    run.start_clock()

    # --- training loop -----------------------------------------------------------------------------------------
    while state.global_step < run.total_steps and not pieces.stopper.should_stop:
        run.train_model.train()
        for rows in sampler.epoch_batches(device):
            x_1 = augment(train_z[rows], config.aug, generator, config.noise_std, config.mixup_max, config.dropout_p)
            path = draw_path(run.flow, x_1, generator, config.time_sampling)
            loss = flow_matching_loss(run.train_model, path, mine, run.autocast)
            pieces.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP this also averages the gradients of all ranks
            # The global batch's loss on every rank, so every rank takes the same divergence decision and the
            # period's mean (part of the checkpoint) does not depend on which rank saved it.
            batch_loss = dist.all_reduce_mean(loss.detach())
            grad_norm = clip_and_check(run, batch_loss, check_every_step)
            step_lr = pieces.optimizer.param_groups[0]["lr"]  # the LR this step uses; the scheduler moves on below
            pieces.optimizer.step()
            pieces.scheduler.step()
            state.global_step += 1
            state.period_steps += 1
            state.loss_sum += batch_loss
            if state.global_step % config.ema_every == 0:
                run.sync_ema()
            if state.global_step % config.log_every == 0:
                _log_step(run, batch_loss, grad_norm, step_lr)
            if config.save_every_steps and state.global_step % config.save_every_steps == 0:
                _save_mid_epoch(run, grad_norm, check_every_step)
            finished = state.global_step >= run.total_steps
            inside_epoch = sampler.position < sampler.steps_per_epoch
            if eval_by_steps:
                if finished or state.global_step % config.eval_every_steps == 0:
                    evaluate(run)
            elif finished and inside_epoch:
                evaluate(run)  # max_steps ended the run inside an epoch: its final evaluation
            # Leave mid-epoch only; at an epoch's last batch the loop ends by itself, and the sampler moves on.
            if (finished or pieces.stopper.should_stop) and inside_epoch:
                break
        else:
            # --- end of epoch: validate raw and EMA weights, select on EMA -------------------------------------
            state.epoch += 1
            if not eval_by_steps:
                evaluate(run)

    # --- finish: best-only on disk ----------------------------------------------------------------------------
    return _finish(run)


def clip_and_check(run: TrainingRun, batch_loss: Tensor, check_every_step: bool) -> Tensor:
    """Clip the gradients of ``run``'s model to ``grad_clip`` and return their norm (before clipping, a device
    scalar). With ``check_every_step`` a non-finite loss or norm raises :class:`TrainingDiverged` here, before the
    optimizer step can write it into the weights.

    clip_grad_norm_ rescales every gradient by min(1, grad_clip / (norm + 1e-6)), by exactly 1.0 when nothing is
    clipped, so that CUDA never waits for the norm. On the CPU a host read is free: rescale only when that very
    coefficient is below 1, which gives bit-identical gradients either way.
    """
    model, grad_clip = run.pieces.model, run.config.grad_clip
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if not check_every_step or (grad_clip / (grad_norm + 1e-6)).item() < 1.0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip, grad_norm)
    if check_every_step and not (math.isfinite(batch_loss.item()) and math.isfinite(grad_norm.item())):
        raise run.diverged(f"non-finite loss {batch_loss.item()} / grad norm {grad_norm.item()}",
                           step=run.state.global_step + 1)
    return grad_norm


def _log_step(run: TrainingRun, batch_loss: Tensor, grad_norm: Tensor, step_lr: float) -> None:
    """Training metrics of the step just taken; the host reads (and the accelerator path's divergence check)."""
    loss_value, norm_value = batch_loss.item(), grad_norm.item()  # host sync only at logging intervals
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise run.diverged(f"non-finite loss {loss_value} / grad norm {norm_value}")
    if run.dist.is_main:
        run.tracker.log({"train/loss": loss_value, "train/grad_norm": norm_value, "train/lr": step_lr,
                         "epoch": run.state.epoch + 1}, step=run.state.global_step)


def _save_mid_epoch(run: TrainingRun, grad_norm: Tensor, check_every_step: bool) -> None:
    """An extra ``last.pt`` (``save_every_steps``).

    Without per-step reads a non-finite step may not have been seen yet: one read here (saves are rare) keeps a
    diverged state out of last.pt. A non-finite loss in any step of the period makes the sum non-finite; a
    non-finite gradient with a finite loss shows in this step's norm (an earlier one has already made the weights,
    and so the later losses, non-finite)."""
    if not check_every_step and not math.isfinite((run.state.loss_sum + grad_norm).item()):
        raise run.diverged("non-finite training loss found before a checkpoint save")
    run.state.train_seconds = run.elapsed()
    run.sync_ema()
    run.save(run.last_path)


def evaluate(run: TrainingRun) -> None:
    """Validate raw and EMA weights on the steps since the last evaluation, select on EMA, write best.pt (or
    last.pt), log. Called at every epoch end, or every ``eval_every_steps`` steps, and after the final step."""
    config, state, pieces = run.config, run.state, run.pieces
    train_loss = state.take_mean_loss()
    if not math.isfinite(train_loss):
        raise run.diverged(f"non-finite mean training loss {train_loss}")
    val_seed = config.seed + VAL_SEED_OFFSET
    val_loss = validate(pieces.model, run.flow, run.val_z, run.batch_size, val_seed, run.autocast, run.dist)
    run.sync_ema()
    pieces.ema.copy_to(run.ema_model)
    ema_val_loss = validate(run.ema_model, run.flow, run.val_z, run.batch_size, val_seed, run.autocast, run.dist)
    if not math.isfinite(ema_val_loss):
        raise run.diverged(f"non-finite EMA validation loss {ema_val_loss}")
    improved = pieces.stopper.update(ema_val_loss, counting=state.global_step >= run.step_plan.warmup_steps)
    state.train_seconds = run.elapsed()
    # Step-cadence evaluations fall inside epochs: their epoch is fractional (steps / steps per epoch).
    steps_per_epoch = pieces.sampler.steps_per_epoch
    epoch_label = round(state.global_step / steps_per_epoch, 3) if config.eval_every_steps > 0 else state.epoch
    row = {"epoch": epoch_label, "step": state.global_step, "train_loss": train_loss, "val_loss": val_loss,
           "ema_val_loss": ema_val_loss, "lr": pieces.scheduler.get_last_lr()[0], "seconds": state.train_seconds}
    state.history.append(row)
    if improved:
        state.best_epoch = state.epoch
        run.save(run.best_path)  # before the patience check: the best weights are on disk before we may stop
        # best.pt now holds exactly the state a resume needs, so the older last.pt goes instead of a second
        # write of the same ~100 MB (a resume reads the newer of last.pt and best.pt).
        if run.dist.is_main:
            run.last_path.unlink(missing_ok=True)
    else:
        run.save(run.last_path)
    if run.dist.is_main:
        _log_evaluation(run, row, improved)
    run.period_started = time.perf_counter()


def _log_evaluation(run: TrainingRun, row: dict, improved: bool) -> None:
    """One history ``row`` to the tracker and the log line with elapsed time and ETA."""
    state, stopper = run.state, run.pieces.stopper
    run.tracker.log({"val/loss": row["val_loss"], "val/ema_loss": row["ema_val_loss"],
                     "val/best_loss": stopper.best_loss, "epoch": row["epoch"]}, step=state.global_step)
    period_seconds = time.perf_counter() - run.period_started
    seconds_per_step = (state.train_seconds - run.segment_start_seconds) / max(1, state.global_step
                                                                               - run.segment_start_step)
    eta = 0 if stopper.should_stop else seconds_per_step * (run.total_steps - state.global_step)
    losses = (row["train_loss"], row["val_loss"], row["ema_val_loss"], " *best*" if improved else "", row["lr"])
    if run.config.eval_every_steps > 0:
        logger.info("step %d/%d (epoch %s) train_loss=%.4f val_loss=%.4f ema_val_loss=%.4f%s lr=%.2e "
                    "period_s=%.1f elapsed_s=%.1f eta_s=%.0f", state.global_step, run.total_steps, row["epoch"],
                    *losses, period_seconds, state.train_seconds, eta)
    else:
        logger.info("epoch %d/%d train_loss=%.4f val_loss=%.4f ema_val_loss=%.4f%s lr=%.2e epoch_s=%.1f "
                    "elapsed_s=%.1f eta_s=%.0f", state.epoch, -(-run.total_steps // run.pieces.sampler.steps_per_epoch),
                    *losses, period_seconds, state.train_seconds, eta)
    if stopper.should_stop:
        logger.info("early stopping at step %d: no EMA val improvement for %d evaluations", state.global_step,
                    stopper.bad_epochs)


def _finish(run: TrainingRun) -> TrainResult:
    """Remove last.pt (best-only on disk) and describe the run."""
    run.dist.barrier()
    if not run.best_path.exists():
        raise RuntimeError(f"run {run.config.run_name} finished without writing {run.best_path}")
    if run.dist.is_main:
        run.last_path.unlink(missing_ok=True)
    state = run.state
    return TrainResult(
        best_loss=run.pieces.stopper.best_loss,
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped_early=run.pieces.stopper.should_stop,
        global_step=state.global_step,
        checkpoint_path=run.best_path,
        sha256=ckpt.sha256_file(run.best_path),
        size_bytes=run.best_path.stat().st_size,
        train_seconds=state.train_seconds,
        device=str(run.device),
        num_params=count_parameters(run.pieces.model),
        precision=run.precision,
        warmup_steps=run.step_plan.warmup_steps,
        warmup_from=run.step_plan.warmup_from,
        history=state.history,
    )
