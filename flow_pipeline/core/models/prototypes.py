"""Soft assignments of a point on the path to prototypes of the data: the input features that let a network see
cluster structure spread over many coordinates.

A network fed the first k whitened coordinates finds the data's clusters from random projections of them; with k of
a few dozen it does (the quickstart's k = 64), but with k = 128 or 256 every hidden unit mixes so many weakly
structured coordinates that its input looks Gaussian and training never leaves the skip path's Gaussian (on the
built-in data the network's output stayed near zero for 4,000 steps). Yet most of a clustered distribution's distance
from its Gaussian fit lies beyond the top 64 directions (built-in data: 20% of it inside them, 71% inside the top
256). :class:`PrototypeFeatures` gives the network the cluster posterior directly: for data near a prototype c with
spread s^2 per coordinate, a point of the path x_t = (1 - t) x_0 + t x_1 is distributed as N(t c, ((1 - t)^2 +
t^2 s^2) I), and the features are the prototypes' posterior probabilities under that model, with equal priors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PrototypeFeatures(nn.Module):
    """phi(x_t, t) = sqrt(n) softmax_j(-|x_t - t c_j|^2 / (2 ((1 - t)^2 + t^2 s^2))) over n learned prototypes c_j
    (n, k) and one learned spread s^2; sqrt(n) keeps the features' total scale near that of k unit coordinates.

    forward: x_t (batch, k), t (batch,) or scalar -> (batch, n), computed in float32 whatever autocast is on (the
    squared distances are differences of terms of order k, which bfloat16 would round away).
    """

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        if k < 1 or n < 1:
            raise ValueError(f"prototype features need k >= 1 coordinates and n >= 1 prototypes, got k={k}, n={n}")
        self.prototypes = nn.Parameter(torch.zeros(n, k))
        self.log_spread = nn.Parameter(torch.zeros(()))

    @property
    def n(self) -> int:
        return self.prototypes.shape[0]

    @torch.no_grad()
    def start_at(self, rows: Tensor, generator: torch.Generator) -> None:
        """Prototypes := n distinct training rows (m, k) drawn with ``generator`` (every row, then repeats drawn
        at random, when m < n); spread := half the mean squared distance from a row to its nearest prototype, per
        coordinate (two draws of one cluster are 2 s^2 k apart).

        Raises ValueError when ``rows`` is empty or has another number of coordinates."""
        m = rows.shape[0]
        if m == 0 or rows.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"prototypes: need rows of {self.prototypes.shape[1]} coordinates to start {self.n} "
                             f"prototypes, got {tuple(rows.shape)}")
        chosen = torch.randperm(m, generator=generator, device=generator.device)[: self.n]
        if m < self.n:
            repeats = torch.randint(m, (self.n - m,), generator=generator, device=generator.device)
            chosen = torch.cat([chosen, repeats])
        self.prototypes.copy_(rows[chosen.to(rows.device)])
        others = rows[torch.randperm(rows.shape[0], generator=generator, device=generator.device)[:4096]]
        nearest = torch.cdist(others.float(), self.prototypes.float()).min(dim=1).values
        nearest = nearest[nearest > 0]  # a row that is a prototype says nothing about the spread
        spread = nearest.square().mean() / (2 * rows.shape[1]) if nearest.numel() else torch.tensor(1.0)
        self.log_spread.copy_(spread.clamp_min(1e-4).log())

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            x = x_t.float()
            t_col = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1)
            centres = self.prototypes.float()
            variance = (1 - t_col) ** 2 + t_col**2 * self.log_spread.float().exp()
            distance_sq = (x * x).sum(1, keepdim=True) - 2 * t_col * (x @ centres.T) + t_col**2 * (centres * centres).sum(1)
            features = torch.softmax(-distance_sq / (2 * variance), dim=1) * self.n**0.5
        return features.to(x_t.dtype)
