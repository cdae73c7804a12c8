"""Shared pieces of the trainer tests (test_trainer_*.py): tiny data and config, trackers that record or interrupt,
and hooks that break the trained model on purpose. ``data`` and ``_one_thread`` are fixtures: import them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import flow_pipeline.core.checkpoint as checkpoint_module
from flow_pipeline.config import TrainConfig
from flow_pipeline.core.tracking import RecordingTracker
from flow_pipeline_tests.core.mixture_data import mixture_train_data

DIM, N_TRAIN, N_VAL, BATCH = 64, 320, 64, 32
STEPS_PER_EPOCH = N_TRAIN // BATCH  # 10
REPO_ROOT = Path(__file__).resolve().parents[2]
CORE_DIR = REPO_ROOT / "flow_pipeline" / "core"


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see conftest)."""


@pytest.fixture(scope="module")
def data():
    return mixture_train_data(N_TRAIN, N_VAL, DIM, seed=3)


def tiny_config(**overrides) -> TrainConfig:
    # The loop's mechanics on z-scored data and a plain network (mixture_train_data's statistics are z-scores).
    values = dict(arch="mlp", model_size="tiny", dim=DIM, batch_size=BATCH, max_epochs=3, warmup_steps=5,
                  log_every=1, device="cpu", lr=3e-3, normalization="zscore", linear_skip=False,
                  eval_every_steps=0)
    values.update(overrides)
    return TrainConfig(**values)


# --- trackers ----------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands in for a crash (SIGKILL, pre-emption) at a chosen point of a run."""


class InterruptingTracker(RecordingTracker):
    """Records rows, then raises :class:`Interrupted` once ``when(step, metrics)`` is true."""

    def __init__(self, when):
        super().__init__()
        self.when = when

    def log(self, metrics, step):
        super().log(metrics, step)
        if self.when(step, metrics):
            raise Interrupted(f"interrupted at step {step}")


def train_rows(tracker: RecordingTracker) -> list[tuple[int, dict]]:
    return [(step, m) for step, m in tracker.rows if "train/loss" in m]


def val_rows(tracker: RecordingTracker) -> list[tuple[int, dict]]:
    return [(step, m) for step, m in tracker.rows if "val/loss" in m]


# --- breaking the trained model on purpose -------------------------------------------------------------------


def on_trained_model(monkeypatch, install) -> None:
    """Call ``install(model)`` on the model the trainer trains: the first one it builds (the second is the EMA
    evaluation copy)."""
    real_build = checkpoint_module.model_from_config
    built = []

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        if not built:
            install(model)
        built.append(model)
        return model

    monkeypatch.setattr(checkpoint_module, "model_from_config", build)


def nan_at_training_call(monkeypatch, bad_call: int):
    """Make the trained model's output NaN at its ``bad_call``-th training forward pass (1-based)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] == bad_call:
                return output * math.nan
        return output

    on_trained_model(monkeypatch, lambda model: model.register_forward_hook(hook))


def inf_gradient_at_training_call(monkeypatch, bad_call: int):
    """Give the trained model's first parameter an infinite gradient at its ``bad_call``-th backward pass, with a
    finite loss: clipping turns it into NaN (inf x 0), and the optimizer step into NaN weights."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return torch.full_like(grad, math.inf) if calls["n"] == bad_call else grad

    on_trained_model(monkeypatch, lambda model: next(model.parameters()).register_hook(hook))
