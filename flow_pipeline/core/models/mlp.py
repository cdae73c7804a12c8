"""Residual MLP velocity field: the simplest baseline architecture.

x_t (batch, dim) is projected to a hidden width, refined by pre-LayerNorm
residual blocks that each receive the time embedding additively, then
projected back to (batch, dim).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .embeddings import TimeEmbedding, broadcast_time


@dataclass(frozen=True)
class MLPConfig:
    width: int  # hidden width of the residual stream
    depth: int  # number of residual blocks
    mlp_ratio: int  # inner width of each block = width * mlp_ratio
    time_dim: int  # size of the time embedding


MLP_PRESETS: dict[str, MLPConfig] = {
    # 145,232 params at dim=1024: for unit tests.
    "tiny": MLPConfig(width=48, depth=2, mlp_ratio=2, time_dim=64),
    # 5,913,600 params at dim=1024: trainable on CPU.
    "small": MLPConfig(width=512, depth=4, mlp_ratio=2, time_dim=256),
    # 1,317,440 params at dim=1024: parameter-matched (within 3%) to dit/unet "matched", for fair comparisons.
    "matched": MLPConfig(width=192, depth=4, mlp_ratio=2, time_dim=256),
    # 40,293,376 params at dim=1024: GPU.
    "base": MLPConfig(width=1024, depth=8, mlp_ratio=2, time_dim=512),
}

# Measured with count_parameters(ResidualMLP(1024, MLP_PRESETS[size])).
PRESET_PARAM_COUNTS: dict[str, int] = {
    "tiny": 145_232,
    "small": 5_913_600,
    "matched": 1_317_440,
    "base": 40_293_376,
}


class ResidualBlock(nn.Module):
    """Pre-LayerNorm residual block conditioned on time by addition.

    forward: h (batch, width), time_embedding (batch, time_dim) -> (batch, width).
    """

    def __init__(self, width: int, mlp_ratio: int, time_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        # SiLU before the projection so the conditioning is a nonlinear function of t.
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, width))
        self.feed_forward = nn.Sequential(
            nn.Linear(width, width * mlp_ratio),
            nn.SiLU(),
            nn.Linear(width * mlp_ratio, width),
        )

    def forward(self, h: Tensor, time_embedding: Tensor) -> Tensor:
        conditioned = self.norm(h) + self.time_projection(time_embedding)
        return h + self.feed_forward(conditioned)


class ResidualMLP(nn.Module):
    """Velocity field v(x_t, t): (batch, dim), (batch,) -> (batch, dim)."""

    def __init__(self, dim: int, config: MLPConfig) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        self.time_embedding = TimeEmbedding(config.time_dim)
        self.input_projection = nn.Linear(dim, config.width)
        self.blocks = nn.ModuleList(
            ResidualBlock(config.width, config.mlp_ratio, config.time_dim) for _ in range(config.depth)
        )
        self.output_norm = nn.LayerNorm(config.width)
        self.output_projection = nn.Linear(config.width, dim)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        t = broadcast_time(t, x_t.shape[0])
        time_embedding = self.time_embedding(t)  # (batch, time_dim)
        h = self.input_projection(x_t)  # (batch, width)
        for block in self.blocks:
            h = block(h, time_embedding)
        return self.output_projection(self.output_norm(h))  # (batch, dim)
