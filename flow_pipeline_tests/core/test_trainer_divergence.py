"""Divergence: a non-finite loss or gradient stops the run naming the step, on the CPU path and on the accelerator
path (exercised on the CPU), and never reaches a checkpoint."""

from __future__ import annotations

import pytest
import torch

import flow_pipeline.core.trainer as trainer_module
from flow_pipeline.core import checkpoint as ckpt
from flow_pipeline.core.tracking import RecordingTracker
from flow_pipeline.core.trainer import TrainingDiverged, train
from flow_pipeline_tests.helpers import sha256_of
from flow_pipeline_tests.core.trainer_helpers import (data, inf_gradient_at_training_call, nan_at_training_call,
                                                     one_thread, tiny_config, train_rows)


# --- divergence --------------------------------------------------------------------------------------------------


def test_nan_loss_raises_naming_the_step_and_keeps_best(data, tmp_path, monkeypatch):
    bad_step = 14  # in epoch 2, after best.pt was written at the end of epoch 1
    nan_at_training_call(monkeypatch, bad_step)
    best = tmp_path / ckpt.BEST_NAME
    hashes = {}

    class HashAtEpochEnd(RecordingTracker):
        def log(self, metrics, step):
            super().log(metrics, step)
            if "val/loss" in metrics:
                hashes[metrics["epoch"]] = sha256_of(best)

    tracker = HashAtEpochEnd()
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_config(), data, tmp_path, tracker=tracker)
    message = str(info.value)
    assert f"step {bad_step}" in message
    assert str(best) in message
    assert list(hashes) == [1]
    assert sha256_of(best) == hashes[1]
    ckpt.load_checkpoint(best)
    # Nothing at or after the bad step reached the tracker.
    assert max(step for step, _ in tracker.rows) == bad_step - 1


def test_nan_before_any_checkpoint_writes_no_best(data, tmp_path, monkeypatch):
    nan_at_training_call(monkeypatch, 3)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(tiny_config(), data, tmp_path)
    assert not (tmp_path / ckpt.BEST_NAME).exists()


# --- the accelerator path, exercised on the CPU ---------------------------------------------------------------------


@pytest.fixture
def without_per_step_reads(monkeypatch):
    """The loop as it runs on CUDA: no host read of loss or norm between logging steps, clipping never branches."""
    monkeypatch.setattr(trainer_module, "reads_values_every_step", lambda device: False)


def test_accelerator_path_trains_bit_identically(data, tmp_path, monkeypatch):
    """Rescaling by exactly 1.0 is the identity and the clip coefficient is the same on both paths, so the
    sync-free path must give the very same weights, with steps on both sides of ``grad_clip``."""
    config = tiny_config(max_epochs=2, grad_clip=0.8)
    on_cpu = RecordingTracker()
    train(config, data, tmp_path / "cpu", tracker=on_cpu)
    norms = [m["train/grad_norm"] for _, m in train_rows(on_cpu)]
    assert min(norms) < config.grad_clip < max(norms), f"test precondition: some steps clipped, some not: {norms}"
    monkeypatch.setattr(trainer_module, "reads_values_every_step", lambda device: False)
    train(config, data, tmp_path / "accelerator")
    cpu, accelerator = (ckpt.load_checkpoint(tmp_path / run / ckpt.BEST_NAME) for run in ("cpu", "accelerator"))
    for key in ("model_state_dict", "ema_shadow"):
        for name, tensor in cpu[key].items():
            assert torch.equal(accelerator[key][name], tensor), f"{key}[{name}]"


def test_accelerator_path_catches_divergence_at_the_next_log_step(data, tmp_path, monkeypatch, without_per_step_reads):
    nan_at_training_call(monkeypatch, 14)
    with pytest.raises(TrainingDiverged, match="step 15"):
        train(tiny_config(log_every=5), data, tmp_path)
    assert ckpt.load_checkpoint(tmp_path / ckpt.BEST_NAME)["global_step"] == 10  # epoch 1's, untouched


@pytest.mark.parametrize("breakage", ["nan_loss", "inf_gradient_finite_loss"])
def test_accelerator_path_never_saves_a_diverged_last_pt(breakage, data, tmp_path, monkeypatch, without_per_step_reads):
    # A NaN loss shows in the epoch's loss sum; an infinite gradient with a finite loss only in that step's norm.
    break_at = nan_at_training_call if breakage == "nan_loss" else inf_gradient_at_training_call
    break_at(monkeypatch, 14)
    with pytest.raises(TrainingDiverged, match="before a checkpoint save at step 14"):
        train(tiny_config(log_every=5, save_every_steps=1), data, tmp_path)
    last = ckpt.load_checkpoint(tmp_path / ckpt.LAST_NAME)
    assert last["global_step"] == 13
    assert all(torch.isfinite(tensor).all() for tensor in last["model_state_dict"].values())


def test_cpu_path_stops_at_an_infinite_gradient_before_the_optimizer_step(data, tmp_path, monkeypatch):
    inf_gradient_at_training_call(monkeypatch, 14)
    with pytest.raises(TrainingDiverged, match="grad norm inf at step 14"):
        train(tiny_config(log_every=5, save_every_steps=1), data, tmp_path)
    assert ckpt.load_checkpoint(tmp_path / ckpt.LAST_NAME)["global_step"] == 13


def test_huge_data_values_diverge(data, tmp_path):
    """Raw values that overflow float32 once normalised: caught as divergence, not trained on silently."""
    raw = data.train.clone()
    raw[5] = 1e38
    bad = trainer_module.TrainData(raw, data.val, data.normalizer)
    with pytest.raises(TrainingDiverged, match=r"step \d+"):
        train(tiny_config(max_epochs=2), bad, tmp_path)
