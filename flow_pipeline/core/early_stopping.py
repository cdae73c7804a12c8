"""Early stopping on a validation loss, with patience that only counts once LR warmup is over."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    """Stop after ``patience`` consecutive counted epochs without an improvement larger than ``min_delta``.

    An improvement always updates ``best_loss`` (also during warmup); a bad epoch only counts when ``counting``
    is true (warmup over), because losses during warmup say little about convergence.
    """

    patience: int = 20
    min_delta: float = 0.0
    best_loss: float = math.inf
    bad_epochs: int = 0
    should_stop: bool = False

    def update(self, val_loss: float, counting: bool = True) -> bool:
        """Record one validation loss; returns True when it is a new best."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss = val_loss
            self.bad_epochs = 0
            return True
        if counting:
            self.bad_epochs += 1
            self.should_stop = self.bad_epochs >= self.patience
        return False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
