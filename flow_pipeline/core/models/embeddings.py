"""Time embeddings shared by all velocity-field architectures.

A flow-matching model is conditioned on the interpolation time ``t`` in [0, 1].
Raw scalars are a poor input for a network, so ``t`` is first expanded into
sinusoidal features (as in DDPM / DiT) and then passed through a small MLP.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# t lives in [0, 1]; the sinusoidal frequencies were designed for integer diffusion
# steps in [0, 1000], so scaling keeps the high-frequency features informative.
DEFAULT_TIME_SCALE = 1000.0
DEFAULT_FREQUENCY_DIM = 256
MAX_PERIOD = 10_000.0


def broadcast_time(t: Tensor, batch_size: int) -> Tensor:
    """Return ``t`` as shape (batch,).

    Accepts a 0-d tensor (as ODE solvers such as torchdiffeq pass it) or a
    (batch,) tensor; anything else is an error rather than a silent broadcast.
    """
    if t.dim() == 0:
        return t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape ({batch_size},) or be a scalar; got {tuple(t.shape)}")
    return t


def sinusoidal_features(
    t: Tensor,
    frequency_dim: int = DEFAULT_FREQUENCY_DIM,
    time_scale: float = DEFAULT_TIME_SCALE,
) -> Tensor:
    """Map times (batch,) to sinusoidal features (batch, frequency_dim) in float32.

    Frequencies are computed on the fly (no buffer) so the module holds no state
    besides its learned parameters.
    """
    if frequency_dim % 2 != 0:
        raise ValueError(f"frequency_dim must be even; got {frequency_dim}")
    half = frequency_dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    frequencies = torch.exp(-math.log(MAX_PERIOD) * exponents)  # (half,)
    angles = t.to(torch.float32)[:, None] * time_scale * frequencies[None, :]  # (batch, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t followed by a two-layer SiLU MLP.

    forward: t (batch,) in [0, 1] -> embedding (batch, embedding_dim).
    """

    def __init__(
        self,
        embedding_dim: int,
        frequency_dim: int = DEFAULT_FREQUENCY_DIM,
        time_scale: float = DEFAULT_TIME_SCALE,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, embedding_dim),
            nn.SiLU(),
            nn.Linear(embedding_dim, embedding_dim),
        )
        # Small init as in DiT: the embedding starts near zero and grows as needed.
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: Tensor) -> Tensor:
        features = sinusoidal_features(t, self.frequency_dim, self.time_scale)
        # Features are float32; match the parameter dtype (e.g. bf16 models).
        features = features.to(self.mlp[0].weight.dtype)
        return self.mlp(features)
