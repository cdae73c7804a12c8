"""A velocity field that models only the leading principal directions of whitened data.

On whitened data the coordinates are the principal directions, by decreasing variance. Real SONAR (and the built-in
generator calibrated on it) carries its local, cluster structure in the top few dozen of them: the remaining ~950
hold little of the raw-space variance, and distances (hence precision, coverage, KID) hardly see them. A network fed
all 1024 coordinates starts with hidden features dominated by those near-noise directions and, at CPU budgets,
learns no more than a Gaussian. :class:`PrincipalSubspace` feeds the network the first ``k`` coordinates only and
gives the others zero network velocity: wrapped in :class:`~flow_pipeline.core.models.skip.LinearSkip`, they follow
the exact velocity of a Gaussian with learned variances, while every step of the network goes to the top ``k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .prototypes import PrototypeFeatures


class PrincipalSubspace(nn.Module):
    """v(x, t) = (net(x[:, :k], t), 0): ``net`` a velocity field on ``k`` coordinates, zero on the other dim - k.

    With ``features`` (:class:`PrototypeFeatures` on the k coordinates, n prototypes) the network reads the k
    coordinates and the n features: ``net`` is then built for k + n coordinates and only its first k outputs are used.

    forward: x_t (batch, dim), t (batch,) or scalar -> (batch, dim).
    """

    def __init__(self, net: nn.Module, dim: int, k: int, features: PrototypeFeatures | None = None) -> None:
        super().__init__()
        if not 0 < k <= dim:
            raise ValueError(f"principal_dims must be in 1..{dim} (the data's dim), got {k}")
        self.net, self.dim, self.k, self.features = net, dim, k, features

    def subspace_velocity(self, x_k: Tensor, t: Tensor) -> Tensor:
        """The network's velocity on the k coordinates: x_k (batch, k), t (batch,) or scalar -> (batch, k)."""
        if self.features is None:
            return self.net(x_k, t)
        return self.net(torch.cat([x_k, self.features(x_k, t)], dim=1), t)[:, : self.k]

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        if x_t.shape[-1] != self.dim:
            raise ValueError(f"x_t has {x_t.shape[-1]} coordinates, the model was built for {self.dim}")
        return F.pad(self.subspace_velocity(x_t[:, : self.k], t), (0, self.dim - self.k))
