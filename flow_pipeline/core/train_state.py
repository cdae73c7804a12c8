"""What flows in and out of the training loop, and the loop's own resumable state.

:class:`TrainData` goes in, :class:`TrainResult` comes out, :class:`TrainState` is the loop's counters and history
(saved in every checkpoint), :class:`TrainingDiverged` is how a run that went non-finite ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from flow_pipeline.core.data.normalization import Normalizer


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
    precision: str  # what the forward passes ran in: "bf16" (autocast) or "fp32"
    warmup_steps: int  # the LR warmup used: the config's, or the default that fits the run
    warmup_from: str  # "config", or the default rule with its numbers
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainState:
    """The loop's own state: what a resume needs besides the model, EMA, optimiser, schedule, early stopping, sampler
    and RNGs (:class:`~flow_pipeline.core.checkpoint.RunPieces`). Written here only; its ``state_dict`` keys are
    top-level keys of the checkpoint (names kept from the checkpoints written before this class).

    loss_sum: running sum (device scalar, no host sync) of the training losses since the last evaluation, part of
    the state so that a mid-epoch resume reports the same mean; period_steps: how many steps it sums.
    """

    loss_sum: Tensor
    epoch: int = 0  # completed epochs
    global_step: int = 0  # completed optimizer steps
    best_epoch: int = 0
    train_seconds: float = 0.0
    period_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "global_step": self.global_step, "best_epoch": self.best_epoch,
                "history": list(self.history), "epoch_loss_sum": self.loss_sum.detach().cpu(),
                "epoch_steps": self.period_steps, "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.global_step, self.best_epoch = state["epoch"], state["global_step"], state["best_epoch"]
        self.history = list(state["history"])
        self.loss_sum = state["epoch_loss_sum"].to(self.loss_sum.device)
        self.period_steps = state["epoch_steps"]
        self.train_seconds = state["train_seconds"]

    def take_mean_loss(self) -> float:
        """Mean training loss of the steps since the last evaluation; starts the next period's sum."""
        mean = float(self.loss_sum / max(1, self.period_steps))
        self.loss_sum = torch.zeros((), device=self.loss_sum.device)
        self.period_steps = 0
        return mean
