"""A linear skip path around any velocity field: the exact velocity of a diagonal Gaussian, with learned variances.

For data ``x_1 ~ N(0, diag(s^2))`` and noise ``x_0 ~ N(0, I)`` on the rectified-flow path
``x_t = (1 - t) x_0 + t x_1``, the flow-matching velocity ``E[x_1 - x_0 | x_t]`` is linear in x_t, per dimension:

    v_i(x, t) = g_i(t) x_i,   g_i(t) = (t s_i^2 - (1 - t)) / ((1 - t)^2 + t^2 s_i^2).

On whitened data (covariance close to diagonal) that is most of the velocity, and a network has to spend capacity and
steps to represent it through its bottleneck (near t = 1 it grows like -1 / (1 - t) in directions with little
variance, which no small polynomial in t follows). A direct path with one learned log-variance per dimension
represents it exactly, so the network only models what is not Gaussian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .subspace import PrincipalSubspace

# Lower bound on the learned log-variance: keeps the denominator (1 - t)^2 + t^2 s^2 >= s^2 / (1 + s^2) away from 0.
_MIN_LOG_VAR = -12.0


def gaussian_velocity_gain(t: Tensor, var: Tensor) -> Tensor:
    """g(t) = (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2) for times t (batch, 1) and variances s^2 (dim,):
    (batch, dim)."""
    return (t * var - (1 - t)) / ((1 - t) ** 2 + t**2 * var)


class LinearSkip(nn.Module):
    """v(x, t) = net(x, t) + g(t) * x with g the diagonal-Gaussian gain of learned per-dimension variances
    (``dim`` parameters, variance 1 at initialisation; :meth:`start_at` sets them to the data's).

    ``fixed_from`` k: coordinates k.. keep variance 1 instead (their entries of ``log_var`` stay 0 and unused). On
    whitened data that is the whitening's Gaussian, whose shrinkage the val rows chose; the training rows' own
    variance there, which the skip path would learn, is 0 in every direction they do not span (fewer rows than
    dimensions) and a held-out row would cost millions of nats.

    forward: x_t (batch, dim), t (batch,) or scalar -> (batch, dim).
    """

    def __init__(self, net: nn.Module, dim: int, fixed_from: int | None = None) -> None:
        super().__init__()
        if fixed_from is not None and not 0 <= fixed_from <= dim:
            raise ValueError(f"fixed_from must be in 0..{dim}, got {fixed_from}")
        self.net = net
        self.fixed_from = fixed_from
        self.log_var = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def start_at(self, variance: Tensor) -> None:
        """Set the learned variances to the data's per-dimension ``variance`` (dim,), so that training starts from
        the exact velocity of the diagonal Gaussian fit instead of unit variances.

        Adam moves a log-variance by about ``lr`` per step, so from 0 a direction whose variance is 0.003 (on
        whitened SONAR, the direction the std floor lifts) would still sit near 0.25 after 3,000 steps at lr 1e-3:
        93x the data's variance there, which alone made KID several times the Gaussian baseline's."""
        if variance.shape != self.log_var.shape:
            raise ValueError(f"variance has shape {tuple(variance.shape)}, expected {tuple(self.log_var.shape)}")
        self.log_var.copy_(variance.to(self.log_var).log().clamp_min(_MIN_LOG_VAR))
        if self.fixed_from is not None:
            self.log_var[self.fixed_from:] = 0.0

    def variances(self) -> Tensor:
        """The per-dimension variances s^2 (dim,), as the velocity uses them: learned, 1 from ``fixed_from`` on."""
        variance = self.log_var.clamp_min(_MIN_LOG_VAR).exp()
        if self.fixed_from is None:
            return variance
        return torch.cat([variance[: self.fixed_from], torch.ones_like(variance[self.fixed_from:])])

    def forward(self, x_t: Tensor, t: Tensor, guidance: float = 1.0) -> Tensor:
        """The velocity; ``guidance`` w scales the network's part: g(t) x + w net(x, t) (1: the model as trained).

        w > 1 extrapolates from the skip path's Gaussian (the model as training starts it) through the trained
        model, the way guidance extrapolates from a weaker model: an under-fitted network's residual is shrunk
        towards zero, and so are its samples (see :mod:`flow_pipeline.core.guidance`)."""
        t_col = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1)
        return guidance * self.net(x_t, t) + gaussian_velocity_gain(t_col, self.variances()) * x_t

    def subspace_velocity(self, guidance: float = 1.0) -> "SubspaceVelocity | None":
        """This velocity (with ``guidance`` as in :meth:`forward`) split by coordinates when the wrapped network
        moves only the first k (:class:`PrincipalSubspace`); None for any other network."""
        if not isinstance(self.net, PrincipalSubspace):
            return None
        k, var = self.net.k, self.variances()
        network = self.net.subspace_velocity

        def velocity(x_k: Tensor, t: Tensor) -> Tensor:
            t_col = torch.as_tensor(t, dtype=x_k.dtype, device=x_k.device).reshape(-1, 1)
            return guidance * network(x_k, t) + gaussian_velocity_gain(t_col, var[:k]) * x_k

        return SubspaceVelocity(k=k, velocity=velocity, end_scale=var[k:].sqrt())


@dataclass
class SubspaceVelocity:
    """A :class:`LinearSkip` velocity around a :class:`PrincipalSubspace` network, split by coordinates.

    The first ``k`` coordinates follow ``velocity(x_k (batch, k), t (batch,)) -> (batch, k)``, which reads only
    them. Each of the other dim - k follows dx/dt = g(t) x on its own; g is the time derivative of
    log sqrt((1 - t)^2 + t^2 s^2), so the exact solution from t = 0 to t = 1 is x(1) = s x(0): ``end_scale`` (dim - k,)
    holds those s. A sampler integrates the k coordinates and multiplies out the rest.
    """

    k: int
    velocity: Callable[[Tensor, Tensor], Tensor]
    end_scale: Tensor
