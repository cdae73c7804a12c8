"""The training loop on tiny configs: its result and files, the EMA, early stopping, tracking rows and the
logged LR, max_steps and eval_every_steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.tracking import RecordingTracker
from flow_pipeline.core.trainer import TrainData, TrainResult, train
from flow_pipeline_tests.helpers import sha256_of
from flow_pipeline_tests.core.trainer_helpers import (BATCH, DIM, STEPS_PER_EPOCH, Interrupted, InterruptingTracker,
                                                     data, one_thread, tiny_config, train_rows, val_rows)


# --- a finished run ----------------------------------------------------------------------------------------------


def test_train_returns_result_with_verified_best_checkpoint(data, tmp_path):
    config = tiny_config()
    stale = tmp_path / f"{ckpt.TEMP_PREFIX}best.pt.killed"
    stale.write_bytes(b"half a checkpoint")  # left by a killed write: removed at start
    result = train(config, data, tmp_path)

    assert isinstance(result, TrainResult)
    assert not stale.exists()
    best = tmp_path / ckpt.BEST_NAME
    assert result.checkpoint_path == best
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.BEST_NAME]  # last.pt removed at the end
    assert result.sha256 == sha256_of(best) and result.size_bytes == best.stat().st_size

    state = ckpt.load_checkpoint(best)
    torch.load(best, weights_only=True)
    for key in ckpt.REQUIRED_KEYS:
        assert key in state, key
    assert result.epochs_run == 3 and not result.stopped_early
    assert result.global_step == 3 * STEPS_PER_EPOCH
    assert result.device == "cpu"

    # History: one row per epoch, steps at epoch ends, the best EMA val loss is the result's.
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert [row["step"] for row in result.history] == [10, 20, 30]
    ema_losses = [row["ema_val_loss"] for row in result.history]
    assert all(math.isfinite(v) for v in ema_losses)
    assert result.best_loss == min(ema_losses) == state["best_loss"]
    assert result.best_epoch == ema_losses.index(min(ema_losses)) + 1 == state["epoch"]
    assert result.best_loss < 2.0  # better than predicting zero, even after 30 tiny steps

    # The weights load into the architecture; the EMA shadow covers every trainable parameter.
    model = build_model("mlp", dim=DIM, size="tiny")
    model.load_state_dict(state["model_state_dict"])
    assert set(state["ema_shadow"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert result.num_params == count_parameters(model)
    assert state["config"]["batch_size"] == BATCH and state["config"]["arch"] == "mlp"
    assert torch.equal(state["normalization_stats"]["mean"], data.normalizer.mean)
    assert torch.equal(state["normalization_stats"]["std"], data.normalizer.std)


@pytest.mark.parametrize("ema_every", [1, 3, 1000])
def test_saved_ema_accounts_for_every_step(ema_every, data, tmp_path):
    """Whatever ``ema_every`` is, the EMA is brought up to date before it is validated and saved. With an
    interval longer than the run, that single update is the first one: it copies the final weights."""
    train(tiny_config(max_epochs=1, ema_every=ema_every), data, tmp_path)
    state = ckpt.load_checkpoint(tmp_path / ckpt.BEST_NAME)
    assert state["ema_state"]["num_updates"] == state["global_step"] == STEPS_PER_EPOCH
    weights, shadow = state["model_state_dict"], state["ema_shadow"]
    same = [torch.equal(shadow[name], weights[name]) for name in shadow]
    assert all(same) if ema_every > STEPS_PER_EPOCH else not any(same)


class CheckpointWatcher(RecordingTracker):
    """At every epoch's validation row (logged after the epoch's saves): the global step of each checkpoint file."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir, self.on_disk = run_dir, []

    def log(self, metrics, step):
        super().log(metrics, step)
        if "val/loss" in metrics:
            self.on_disk.append({path.name: ckpt.load_checkpoint(path)["global_step"]
                                 for path in sorted(self.run_dir.glob("*.pt"))})


def test_last_pt_exists_only_while_newer_than_best_pt(data, tmp_path):
    # min_delta larger than any improvement: epoch 1 is the best, epochs 2 and 3 are not.
    watcher = CheckpointWatcher(tmp_path)
    train(tiny_config(max_epochs=3, min_delta=10.0, patience=5), data, tmp_path, tracker=watcher)
    best, last = ckpt.BEST_NAME, ckpt.LAST_NAME
    assert watcher.on_disk == [{best: 10}, {best: 10, last: 20}, {best: 10, last: 30}]


def test_an_improving_epoch_removes_the_older_last_pt(data, tmp_path):
    # last.pt every 3 steps, and every epoch the new best (min_delta 0, the loss falls): at each epoch's end the
    # mid-epoch last.pt (step 9, 18, 27) is gone and best.pt is the resume point.
    watcher = CheckpointWatcher(tmp_path)
    result = train(tiny_config(max_epochs=3, save_every_steps=3), data, tmp_path, tracker=watcher)
    improving = [row["epoch"] for row in result.history
                 if row["ema_val_loss"] == min(r["ema_val_loss"] for r in result.history[: row["epoch"]])]
    assert improving[:1] == [1] and len(improving) >= 2, "test precondition: at least two improving epochs"
    for epoch, files in enumerate(watcher.on_disk, start=1):
        if epoch in improving:
            assert files == {ckpt.BEST_NAME: 10 * epoch}
        else:
            assert files[ckpt.LAST_NAME] == 10 * epoch > files[ckpt.BEST_NAME]


def test_a_mid_epoch_last_pt_holds_an_up_to_date_ema(data, tmp_path):
    # last.pt every 4 steps, EMA every 5: the save at step 24 must first fold steps 21-24 into the EMA.
    config = tiny_config(max_epochs=3, save_every_steps=4, ema_every=5)
    with pytest.raises(Interrupted):
        train(config, data, tmp_path, tracker=InterruptingTracker(lambda step, m: "train/loss" in m and step == 25))
    state = ckpt.load_checkpoint(tmp_path / ckpt.LAST_NAME)
    assert state["global_step"] == state["ema_state"]["num_updates"] == 24


def test_early_stopping_ends_the_run(data, tmp_path):
    # min_delta larger than any possible improvement: epoch 1 sets the best, every later epoch is bad.
    config = tiny_config(max_epochs=6, patience=2, min_delta=100.0)
    result = train(config, data, tmp_path)
    assert result.stopped_early
    assert result.epochs_run == 3 and len(result.history) == 3
    assert result.best_epoch == 1
    assert ckpt.load_checkpoint(result.checkpoint_path)["epoch"] == 1


def test_tracker_rows(data, tmp_path):
    config = tiny_config(log_every=3, max_epochs=3)
    tracker = RecordingTracker()
    result = train(config, data, tmp_path, tracker=tracker)
    rows = train_rows(tracker)
    assert [step for step, _ in rows] == list(range(3, 31, 3))
    for step, metrics in rows:
        assert {"train/loss", "train/grad_norm", "train/lr", "epoch"} <= set(metrics)
        assert math.isfinite(metrics["train/loss"]) and metrics["train/lr"] > 0
        assert metrics["epoch"] == (step - 1) // STEPS_PER_EPOCH + 1
    vals = val_rows(tracker)
    assert [step for step, _ in vals] == [10, 20, 30]
    best_so_far = math.inf
    for (step, metrics), row in zip(vals, result.history):
        best_so_far = min(best_so_far, metrics["val/ema_loss"])
        assert metrics["val/best_loss"] == best_so_far
        assert metrics["val/loss"] == row["val_loss"] and metrics["val/ema_loss"] == row["ema_val_loss"]
    steps = [step for step, _ in tracker.rows]
    assert steps == sorted(steps)  # never decreasing (Wandb drops rows logged with a lower step)


def test_logged_lr_is_the_lr_of_the_logged_step(data, tmp_path):
    """train/lr at step s is the LR the s-th optimizer step used: linear warmup (s / warmup) * lr, then cosine."""
    config = tiny_config(max_epochs=2, warmup_steps=8, min_lr_ratio=0.1)
    tracker = RecordingTracker()
    train(config, data, tmp_path, tracker=tracker)
    total = 2 * STEPS_PER_EPOCH
    for step, metrics in train_rows(tracker):
        if step <= 8:
            want = config.lr * step / 8
        else:
            progress = (step - 1 - 8) / (total - 8)
            want = config.lr * (0.1 + 0.9 * (1 + math.cos(math.pi * progress)) / 2)
        assert metrics["train/lr"] == pytest.approx(want, rel=1e-9), step


def test_an_unset_warmup_is_a_tenth_of_the_run_and_the_result_says_so(data, tmp_path):
    """warmup_steps None on 2 epochs of 10 steps: warmup over 2 steps, LR (s / 2) * lr at steps 1 and 2."""
    config = tiny_config(max_epochs=2, warmup_steps=None, min_lr_ratio=0.1)
    tracker = RecordingTracker()
    result = train(config, data, tmp_path, tracker=tracker)
    assert result.warmup_steps == 2 and result.warmup_from.startswith("default")
    lrs = {step: metrics["train/lr"] for step, metrics in train_rows(tracker)}
    assert lrs[1] == pytest.approx(config.lr / 2, rel=1e-9) and lrs[2] == pytest.approx(config.lr, rel=1e-9)
    assert lrs[12] == pytest.approx(config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * 9 / 18))), rel=1e-9)
    assert train(tiny_config(max_epochs=2, warmup_steps=3), data, tmp_path / "set").warmup_from == "config"


# --- equal budgets: max_steps and eval_every_steps ------------------------------------------------------------------


def test_max_steps_trains_every_data_size_the_same_steps_and_schedule(data, tmp_path):
    small = TrainData(train=data.train[:64], val=data.val, normalizer=data.normalizer)  # 2 steps per epoch
    config = tiny_config(max_steps=12, eval_every_steps=4, warmup_steps=5, min_lr_ratio=0.1, patience=50)
    results = {name: train(config, d, tmp_path / name) for name, d in (("full", data), ("small", small))}
    for result in results.values():
        assert result.global_step == 12
        assert [row["step"] for row in result.history] == [4, 8, 12]
        # After 12 steps: warmup over (5), cosine progress (12 - 5) / (12 - 5) = 1 -> min_lr_ratio * lr.
        assert result.history[-1]["lr"] == pytest.approx(0.1 * config.lr)
        # After 4 steps the scheduler stands at 0-based step 4, the last warmup step: factor (4 + 1) / 5. After 8:
        # cosine progress (8 - 5) / 7.
        assert result.history[0]["lr"] == pytest.approx(config.lr * 5 / 5)
        assert result.history[1]["lr"] == pytest.approx(config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7))))
    assert results["full"].epochs_run == 1 and results["small"].epochs_run == 6


def test_max_steps_ends_a_run_inside_an_epoch_with_a_final_evaluation(data, tmp_path):
    result = train(tiny_config(max_steps=15, warmup_steps=5), data, tmp_path)  # 10 steps per epoch
    assert result.global_step == 15
    assert [row["step"] for row in result.history] == [10, 15]  # epoch end, then the final step


def test_warmup_longer_than_the_run_is_rejected_naming_both_fields(data, tmp_path):
    with pytest.raises(ValidationError, match="warmup_steps.*max_steps"):
        tiny_config(max_steps=10, warmup_steps=10)
    # In epochs the total depends on the data: 64 rows / batch 32 x 3 epochs = 6 steps.
    small = TrainData(train=data.train[:64], val=data.val, normalizer=data.normalizer)
    with pytest.raises(ValueError, match="warmup_steps: 6 >= the run's 6 optimizer steps .max_epochs"):
        train(tiny_config(warmup_steps=6), small, tmp_path)
