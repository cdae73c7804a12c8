"""What the trainer needs to know about data-parallel training, behind one small object.

A single process uses the default ``DistInfo()``; under torchrun the entry point builds one from the initialised
process group. The trainer never reads environment variables itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: the trainer resolves config.device itself

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs metrics and reports to Dagster."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()

    def shard(self, n: int) -> slice:
        """This rank's contiguous block of the rows 0..n-1 of a global batch: rank r of W takes
        ``[r*n//W, (r+1)*n//W)``, so the ranks' blocks concatenate, in rank order, to the whole batch."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``model`` when several ranks train together, else ``model``."""
        if not self.active:
            return model
        device_ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.active:
            value = value.clone()
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(value) / self.world_size if self.active else value

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()


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
