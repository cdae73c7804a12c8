"""DiT velocity field over a tokenised embedding vector.

The (batch, dim) vector is cut into ``num_tokens`` contiguous chunks of size
ceil(dim / num_tokens) (the last zero-padded when needed), each chunk is a token. Transformer blocks with adaLN-Zero
time conditioning (Peebles & Xie, 2023) process the tokens, and the output
tokens are concatenated back into a (batch, dim) velocity.

All residual branches and the output layer start at zero, so the untrained
model outputs exactly zero and each block starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import TimeEmbedding, broadcast_time


@dataclass(frozen=True)
class DiTConfig:
    num_tokens: int  # dim is split into this many tokens (>= 2; the last is zero-padded when it does not divide dim)
    hidden_size: int  # transformer width
    depth: int  # number of transformer blocks
    num_heads: int  # attention heads (must divide hidden_size)
    mlp_ratio: int  # feed-forward inner width = hidden_size * mlp_ratio

    def __post_init__(self) -> None:
        # A single token would make attention trivial (softmax over one key).
        if self.num_tokens < 2:
            raise ValueError(f"DiT needs num_tokens >= 2; got {self.num_tokens}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )


DIT_PRESETS: dict[str, DiTConfig] = {
    # 154,624 params at dim=1024 (16 tokens x 64): for unit tests.
    "tiny": DiTConfig(num_tokens=16, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2),
    # 1,288,384 params at dim=1024 (16 tokens x 64): trainable on CPU (compute scales with
    # tokens x params, so it is kept narrower than the mlp/unet small presets).
    "small": DiTConfig(num_tokens=16, hidden_size=128, depth=4, num_heads=4, mlp_ratio=4),
    # 1,288,384 params at dim=1024, the "small" DiT: the reference the other architectures' "matched" presets are sized to.
    "matched": DiTConfig(num_tokens=16, hidden_size=128, depth=4, num_heads=4, mlp_ratio=4),
    # 38,779,424 params at dim=1024 (32 tokens x 32): GPU.
    "base": DiTConfig(num_tokens=32, hidden_size=512, depth=8, num_heads=8, mlp_ratio=4),
}

# Measured with count_parameters(DiT(1024, DIT_PRESETS[size])).
PRESET_PARAM_COUNTS: dict[str, int] = {
    "tiny": 154_624,
    "small": 1_288_384,
    "matched": 1_288_384,
    "base": 38_779_424,
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Apply per-sample shift/scale (batch, hidden) to tokens (batch, tokens, hidden)."""
    # (1 + scale) so that a zero modulation is the identity.
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention: (batch, tokens, hidden) -> (batch, tokens, hidden)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, hidden = x.shape
        head_dim = hidden // self.num_heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
        # No dropout, no mask. On CUDA the fused backward of this kernel is only
        # bit-reproducible under torch.use_deterministic_algorithms(True) (warn_only=False).
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(1, 2).reshape(batch, tokens, hidden)
        return self.output(attended)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    forward: x (batch, tokens, hidden), conditioning (batch, hidden) -> (batch, tokens, hidden).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        # No affine parameters: scale and shift come from the time embedding instead.
        self.attention_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attention = SelfAttention(hidden_size, num_heads)
        self.feed_forward_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, hidden_size * mlp_ratio),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size * mlp_ratio, hidden_size),
        )
        # shift, scale, gate for attention and for the feed-forward branch.
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, conditioning: Tensor) -> Tensor:
        (
            attention_shift,
            attention_scale,
            attention_gate,
            feed_forward_shift,
            feed_forward_scale,
            feed_forward_gate,
        ) = self.modulation(conditioning).chunk(6, dim=-1)
        attention_input = modulate(self.attention_norm(x), attention_shift, attention_scale)
        x = x + attention_gate[:, None, :] * self.attention(attention_input)
        feed_forward_input = modulate(self.feed_forward_norm(x), feed_forward_shift, feed_forward_scale)
        return x + feed_forward_gate[:, None, :] * self.feed_forward(feed_forward_input)


class FinalLayer(nn.Module):
    """adaLN + linear read-out: (batch, tokens, hidden) -> (batch, tokens, token_size)."""

    def __init__(self, hidden_size: int, token_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, token_size)

    def forward(self, x: Tensor, conditioning: Tensor) -> Tensor:
        shift, scale = self.modulation(conditioning).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Velocity field v(x_t, t): (batch, dim), (batch,) -> (batch, dim)."""

    def __init__(self, dim: int, config: DiTConfig) -> None:
        super().__init__()
        self.dim = dim
        self.config = config
        # A dim that num_tokens does not divide (a principal subspace plus prototype features sized by the data)
        # is zero-padded at the end to whole tokens; the padding's outputs are dropped.
        self.token_size = -(-dim // config.num_tokens)
        self.padding = self.token_size * config.num_tokens - dim
        hidden = config.hidden_size

        self.token_embedding = nn.Linear(self.token_size, hidden)
        # Learned because token positions are arbitrary coordinates, not a sequence.
        self.position_embedding = nn.Parameter(torch.empty(1, config.num_tokens, hidden))
        self.time_embedding = TimeEmbedding(hidden)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(hidden, self.token_size)
        self._initialise_weights()

    def _initialise_weights(self) -> None:
        # DiT recipe: xavier for the transformer linears...
        for block in self.blocks:
            for layer in (block.attention.qkv, block.attention.output, *block.feed_forward[::2]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.token_embedding.weight)
        nn.init.zeros_(self.token_embedding.bias)
        nn.init.normal_(self.position_embedding, std=0.02)
        # ...and adaLN-Zero: every modulation and the read-out start at zero, so
        # each block is the identity and the model output is exactly zero.
        for block in self.blocks:
            nn.init.zeros_(block.modulation[1].weight)
            nn.init.zeros_(block.modulation[1].bias)
        for layer in (self.final_layer.modulation[1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        batch = x_t.shape[0]
        t = broadcast_time(t, batch)
        if self.padding:
            x_t = F.pad(x_t, (0, self.padding))
        tokens = x_t.reshape(batch, self.config.num_tokens, self.token_size)
        h = self.token_embedding(tokens) + self.position_embedding  # (batch, tokens, hidden)
        conditioning = self.time_embedding(t)  # (batch, hidden)
        for block in self.blocks:
            h = block(h, conditioning)
        output_tokens = self.final_layer(h, conditioning)  # (batch, tokens, token_size)
        return output_tokens.reshape(batch, -1)[:, : self.dim]

