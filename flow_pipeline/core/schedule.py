"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the base LR."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# A run that does not set warmup_steps warms up over 10% of its steps (a usual share in warmup-cosine schedules), at
# most 200: a run of 2,000 steps or more (the default 50 epochs of the built-in data: 3,000) warms up over the 200
# steps its recipe uses, a short smoke run over a tenth of its length instead of never leaving warmup.
DEFAULT_WARMUP_CAP = 200
DEFAULT_WARMUP_PERCENT = 10


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR multiplier for the optimizer step with index ``step`` (0-based).

    Warmup: (step + 1) / warmup_steps, so the very first step already moves the weights (never a step at LR 0).
    After warmup: min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * progress)) / 2, progress going 0 -> 1 over the
    remaining steps and held at 1 past ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> LambdaLR:
    """``LambdaLR`` over :func:`warmup_cosine_factor`; its ``state_dict`` carries the step, so resume needs no re-warm."""
    factor = partial(warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class StepPlan:
    """A run's optimizer steps (the LR schedule's total) and its LR warmup. warmup_from: ``"config"`` when the
    config set ``warmup_steps``, else the default rule with its numbers (:func:`default_warmup_steps`)."""

    total_steps: int
    warmup_steps: int
    warmup_from: str


def default_warmup_steps(total_steps: int) -> int:
    """The warmup of a run that does not set one: :data:`DEFAULT_WARMUP_PERCENT` % of its optimizer steps, at most
    :data:`DEFAULT_WARMUP_CAP`. Always shorter than the run, and a function of the run's steps alone, so a resumed
    run of the same config and data warms up exactly as the run it continues."""
    return min(DEFAULT_WARMUP_CAP, total_steps * DEFAULT_WARMUP_PERCENT // 100)


def plan_steps(config, steps_per_epoch: int) -> StepPlan:
    """Optimizer steps of the run: ``max_steps`` when set (the same for every dataset size), else ``max_epochs``
    epochs; and its warmup: ``warmup_steps``, or :func:`default_warmup_steps` when that is None. A warmup set
    explicitly that never ends is rejected (ValueError naming warmup_steps): the LR would never decay and early
    stopping, which counts only after warmup, would never act."""
    total = config.max_steps or config.max_epochs * steps_per_epoch
    source = "max_steps" if config.max_steps else f"max_epochs x {steps_per_epoch} steps per epoch"
    if config.warmup_steps is None:
        return StepPlan(total, default_warmup_steps(total), f"default: min({DEFAULT_WARMUP_CAP}, "
                        f"{DEFAULT_WARMUP_PERCENT}% of the run's {total} optimizer steps)")
    if config.warmup_steps >= total:
        raise ValueError(f"warmup_steps: {config.warmup_steps} >= the run's {total} optimizer steps ({source}); "
                         f"lower warmup_steps (or leave it unset for a default that fits) or raise "
                         f"max_steps/max_epochs")
    return StepPlan(total, config.warmup_steps, "config")
