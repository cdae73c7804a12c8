"""Flow-matching probability paths.

Every flow turns a noise batch ``x_0`` (batch, dim), a data batch ``x_1`` (batch, dim) and times ``t`` (batch,) in
[0, 1] into a :class:`PathSample`: the point ``x_t`` on the path and the conditional velocity ``u_t = d x_t / dt``.
The model is trained to regress ``target`` (``u_t`` times the flow's ``target_scale``); :meth:`Flow.to_velocity`
undoes that scale, so sampling integrates the true velocity whatever the training target was.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flow_pipeline.core.time_sampling import sample_times


@dataclass
class PathSample:
    """One batch of points on a probability path.

    x_0: noise (batch, dim); x_1: data (batch, dim), possibly re-paired; t: (batch,);
    x_t: the interpolant (batch, dim); u_t: its time derivative (batch, dim);
    target: what the model regresses, ``u_t * target_scale`` (batch, dim).
    """

    x_0: Tensor
    x_1: Tensor
    t: Tensor
    x_t: Tensor
    u_t: Tensor
    target: Tensor


class Flow:
    """Base class: subclasses define ``interpolate`` (x_t, u_t) for given x_0, x_1, t."""

    name = "base"

    def __init__(self, target_scale: float = 1.0):
        if not target_scale > 0:
            raise ValueError(f"target_scale must be > 0, got {target_scale}")
        self.target_scale = float(target_scale)

    def interpolate(self, x_0: Tensor, x_1: Tensor, t: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def pair(self, x_0: Tensor, x_1: Tensor) -> tuple[Tensor, Tensor]:
        """Coupling of noise and data rows; independent (identity) by default."""
        return x_0, x_1

    def sample(self, x_0: Tensor, x_1: Tensor, t: Tensor, generator: torch.Generator | None = None) -> PathSample:
        """Pair, interpolate and build the regression target. ``generator`` feeds any path noise."""
        x_0, x_1 = self.pair(x_0, x_1)
        x_t, u_t = self.interpolate(x_0, x_1, t, generator)
        target = u_t if self.target_scale == 1.0 else u_t * self.target_scale
        return PathSample(x_0=x_0, x_1=x_1, t=t, x_t=x_t, u_t=u_t, target=target)

    def to_velocity(self, output: Tensor, t: Tensor) -> Tensor:
        """Model output (batch, dim) at times t (batch,) -> dx/dt (batch, dim): undoes ``target_scale``."""
        return output if self.target_scale == 1.0 else output / self.target_scale

    def params(self) -> dict[str, float]:
        return {"target_scale": self.target_scale}

    def zero_predictor_loss(self, quadrature_points: int = 64) -> float:
        """Flow-matching loss (mean over dimensions) of a model that always predicts zero, on data with zero mean
        and unit variance per dimension (z-scored or whitened) paired independently with x_0 ~ N(0, I).

        Derived from the path itself, not tabulated by name: every path here has u_t = a(t) x_1 + b(t) x_0, so the
        loss is target_scale^2 * E_t[a(t)^2 + b(t)^2] with t ~ U(0, 1). a and b are read off ``interpolate`` at
        (x_0, x_1) = (0, 1) and (1, 0), and the integral over t is Gauss-Legendre quadrature (exact for
        polynomial paths, 1e-12 for vp). icfm/fm: 2 (fm: 1 + (1 - sigma_min)^2); vp: pi^2/4. otcfm's minibatch OT
        pairing lowers its loss below this independent-coupling value, which stays its reference.
        """
        nodes, weights = np.polynomial.legendre.leggauss(quadrature_points)
        t = torch.from_numpy((nodes + 1) / 2).double()  # [-1, 1] -> [0, 1]; the weights then sum to 2
        ones, zeros = torch.ones(len(t), 1, dtype=torch.float64), torch.zeros(len(t), 1, dtype=torch.float64)
        generator = torch.Generator().manual_seed(0)  # path noise (icfm's sigma) moves x_t, never u_t
        _, a = self.interpolate(zeros, ones, t, generator)
        _, b = self.interpolate(ones, zeros, t, generator)
        second_moment = (a.squeeze(1) ** 2 + b.squeeze(1) ** 2).numpy()
        return float(self.target_scale**2 * np.dot(weights, second_moment) / 2)


def _col(t: Tensor) -> Tensor:
    """(batch,) -> (batch, 1) so that times broadcast over the feature dimension."""
    return t.reshape(-1, 1)


class ICFM(Flow):
    """Independent conditional flow matching: x_t = (1-t) x_0 + t x_1 + sigma eps, u_t = x_1 - x_0.

    sigma = 0 is rectified flow.
    """

    name = "icfm"

    def __init__(self, sigma: float = 0.0, target_scale: float = 1.0):
        super().__init__(target_scale)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.sigma = float(sigma)

    def interpolate(self, x_0, x_1, t, generator):
        tc = _col(t)
        x_t = (1 - tc) * x_0 + tc * x_1
        if self.sigma > 0:
            eps = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_t = x_t + self.sigma * eps
        return x_t, x_1 - x_0

    def params(self):
        return {**super().params(), "sigma": self.sigma}


def exact_ot_permutation(x_0: Tensor, x_1: Tensor) -> Tensor:
    """Permutation ``perm`` (batch,) minimising sum_i ||x_0[i] - x_1[perm[i]]||^2 (Hungarian algorithm).

    A permutation, unlike sampling from the OT plan, never duplicates or drops a data row.
    """
    # Imported here: scipy.optimize costs ~0.6 s at start-up and only OT-CFM needs it.
    from scipy.optimize import linear_sum_assignment

    # The assignment is solved on the CPU in float64: scipy needs NumPy, and ties are rare in float64.
    cost = torch.cdist(x_0.detach().double(), x_1.detach().double()).pow_(2).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.from_numpy(perm).to(x_1.device)


class OTCFM(ICFM):
    """ICFM path on minibatch exact optimal-transport pairs of (x_0, x_1)."""

    name = "otcfm"

    def pair(self, x_0, x_1):
        return x_0, x_1[exact_ot_permutation(x_0, x_1)]


class FM(Flow):
    """Lipman et al. (2023) conditional OT path: x_t = t x_1 + (1 - (1 - sigma_min) t) x_0,
    u_t = x_1 - (1 - sigma_min) x_0."""

    name = "fm"

    def __init__(self, sigma_min: float = 1e-4, target_scale: float = 1.0):
        super().__init__(target_scale)
        if not 0 <= sigma_min < 1:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def interpolate(self, x_0, x_1, t, generator):
        tc = _col(t)
        x_t = tc * x_1 + (1 - (1 - self.sigma_min) * tc) * x_0
        return x_t, x_1 - (1 - self.sigma_min) * x_0

    def params(self):
        return {**super().params(), "sigma_min": self.sigma_min}


class VP(Flow):
    """Trigonometric (variance-preserving) interpolant: x_t = cos(pi t/2) x_0 + sin(pi t/2) x_1,
    u_t = (pi/2) (cos(pi t/2) x_1 - sin(pi t/2) x_0)."""

    name = "vp"

    def interpolate(self, x_0, x_1, t, generator):
        angle = _col(t) * (math.pi / 2)
        cos, sin = torch.cos(angle), torch.sin(angle)
        return cos * x_0 + sin * x_1, (math.pi / 2) * (cos * x_1 - sin * x_0)


FLOWS: dict[str, type[Flow]] = {cls.name: cls for cls in (ICFM, OTCFM, FM, VP)}


def get_flow(name: str, **params: float) -> Flow:
    """Flow by name (``icfm``, ``otcfm``, ``fm``, ``vp``) with its parameters (e.g. sigma, sigma_min, target_scale)."""
    try:
        cls = FLOWS[name]
    except KeyError:
        raise ValueError(f"unknown flow method {name!r}; valid: {', '.join(FLOWS)}") from None
    return cls(**params)


def draw_path(flow: Flow, x_1: Tensor, generator: torch.Generator, time_sampling: str = "uniform") -> PathSample:
    """Noise x_0 ~ N(0, I) (batch, dim) and times t (batch,) drawn by ``time_sampling`` for every row of the data
    batch x_1, then the flow's pairing and path point. Under data parallelism every rank calls this on the whole
    global batch with an identically seeded generator: each row gets the noise it would get in one process, OT pairs
    and mixup partners span the global batch, and the generators of all ranks stay in the same state."""
    x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device)
    t = sample_times(x_1.shape[0], time_sampling, generator, x_1.device)
    return flow.sample(x_0, x_1, t, generator=generator)


def flow_matching_loss(model: nn.Module, path: PathSample, rows: slice,
                       autocast: contextlib.AbstractContextManager) -> Tensor:
    """MSE (scalar float32 tensor) between the model's prediction at ``path.x_t[rows]`` and ``path.target[rows]``."""
    with autocast:
        prediction = model(path.x_t[rows], path.t[rows])
    return F.mse_loss(prediction.float(), path.target[rows])
