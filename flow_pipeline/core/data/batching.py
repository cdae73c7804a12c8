"""In-memory training batches: a seeded resumable batch sampler and data augmentation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

AUGMENTATIONS = ("none", "noise", "mixup", "dropout", "mixup+noise")


class EpochBatchSampler:
    """Yields row-index batches over ``n_rows`` rows, reshuffled each epoch, resumable mid-epoch.

    The permutation of epoch ``e`` is ``randperm(n_rows)`` from a generator seeded with ``seed + e``, so the state
    (seed, epoch, position) fully determines the permutation and where in it we are without storing it. Incomplete
    last batches are dropped so every step sees ``batch_size`` rows. With ``world_size`` > 1 each rank takes its
    contiguous slice of every global batch, so the data order does not depend on the number of ranks.
    """

    def __init__(self, n_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n_rows < 1:
            raise ValueError("cannot sample batches from an empty training set")
        if batch_size > n_rows:
            raise ValueError(f"batch_size {batch_size} is larger than the {n_rows} training rows")
        if batch_size < world_size or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the world size {world_size}")
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.batch_size

    def permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_rows, generator=generator)

    def epoch_batches(self, device: torch.device | str = "cpu") -> Iterator[Tensor]:
        """Remaining batches of the current epoch, each (batch_size / world_size,) int64 on ``device``.

        ``position`` advances as batches are handed out; after the last one the sampler moves to the next epoch.
        """
        order = self.permutation(self.epoch).to(device)
        per_rank = self.batch_size // self.world_size
        while self.position < self.steps_per_epoch:
            start = self.position * self.batch_size + self.rank * per_rank
            self.position += 1
            yield order[start : start + per_rank]
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "n_rows": self.n_rows,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n_rows", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]}, this run has {getattr(self, key)}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])


def augment(x_1: Tensor, aug: str, generator: torch.Generator, noise_std: float = 0.1, mixup_max: float = 0.2,
            dropout_p: float = 0.1) -> Tensor:
    """Augment a data batch x_1 (batch, dim) in z-score space; noise x_0 is never augmented.

    noise: x + noise_std * eps.  mixup: (1 - lam) x + lam x[perm] with lam ~ U(0, mixup_max) per row.
    dropout: zero each coordinate with probability dropout_p and rescale by 1 / (1 - dropout_p).
    mixup+noise: mixup, then noise.
    """
    if aug not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {aug!r}; valid: {', '.join(AUGMENTATIONS)}")
    if aug == "none":
        return x_1
    batch = x_1.shape[0]
    out = x_1
    if "mixup" in aug:
        lam = torch.rand(batch, 1, generator=generator, device=x_1.device) * mixup_max
        partner = torch.randperm(batch, generator=generator, device=x_1.device)
        out = torch.lerp(out, out[partner], lam)
    if "noise" in aug:
        out = out + noise_std * torch.randn(out.shape, generator=generator, device=x_1.device)
    if aug == "dropout":
        keep = torch.rand(out.shape, generator=generator, device=x_1.device) >= dropout_p
        out = out * keep / (1 - dropout_p)
    return out
