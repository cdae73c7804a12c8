"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the base LR."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


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


def planned_steps(config, steps_per_epoch: int) -> int:
    """Optimizer steps of the run, the LR schedule's total: ``max_steps`` when set (the same for every dataset size),
    else ``max_epochs`` epochs. A warmup that never ends is rejected: the LR would never decay and early stopping,
    which counts only after warmup, would never act."""
    total = config.max_steps or config.max_epochs * steps_per_epoch
    if config.warmup_steps >= total:
        source = "max_steps" if config.max_steps else f"max_epochs x {steps_per_epoch} steps per epoch"
        raise ValueError(f"warmup_steps: {config.warmup_steps} >= the run's {total} optimizer steps ({source}); "
                         f"lower warmup_steps or raise max_steps/max_epochs")
    return total
