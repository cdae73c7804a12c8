"""Seeded low-rank Gaussian mixture used as training data by the trainer tests (written independently of core)."""

from __future__ import annotations

import torch

from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.trainer import TrainData


def low_rank_mixture(n: int, dim: int, n_clusters: int = 4, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """(n, dim) float32 rows: cluster centre + a rank-``rank`` Gaussian in a per-cluster subspace + a small
    isotropic floor, then shifted and scaled to SONAR-like magnitudes (mean offset ~0.006, std ~0.005)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * 2.0
    bases = torch.randn(n_clusters, rank, dim, generator=g) / rank**0.5
    labels = torch.randint(n_clusters, (n,), generator=g)
    latent = torch.randn(n, 1, rank, generator=g)
    x = centres[labels] + (latent @ bases[labels]).squeeze(1) + 0.05 * torch.randn(n, dim, generator=g)
    offset = torch.randn(dim, generator=g) * 0.006
    return (x * 0.005 + offset).float()


def mixture_train_data(n_train: int, n_val: int, dim: int, seed: int = 0, **kwargs) -> TrainData:
    """TrainData over one mixture draw, with the Normalizer fitted on the train rows only."""
    x = low_rank_mixture(n_train + n_val, dim, seed=seed, **kwargs)
    train, val = x[:n_train], x[n_train:]
    return TrainData(train=train, val=val, normalizer=Normalizer(train.mean(0), train.std(0)))
