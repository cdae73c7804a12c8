"""ODE sampling: integrate a learned velocity field from noise at t=0 to data at t=1.

Contract of the inputs:

* ``model`` is an ``nn.Module`` with ``forward(x_t (batch, dim), t (batch,)) -> output (batch, dim)``; it must
  already live on ``device`` and accept float32 inputs.
* ``flow`` is any object with ``to_velocity(output (batch, dim), t (batch,)) -> dx/dt (batch, dim)``, which undoes
  any rescaling of the training target (see :mod:`flow_pipeline.core.flows`).

The starting points are ``x_0 = torch.randn((n, dim), generator=torch.Generator().manual_seed(seed))``, drawn on the
CPU in float32 for all ``n`` rows at once, so samples depend on neither ``device`` nor ``batch_size`` (up to the
floating-point effects of batching inside the model, and for ``dopri5`` the per-batch adaptive step choice).

A model that offers ``subspace_velocity()`` (:class:`~flow_pipeline.core.models.skip.LinearSkip` around a
:class:`~flow_pipeline.core.models.subspace.PrincipalSubspace` network: the quickstart's recipe) is integrated
split: every solver steps only the k coordinates the network moves, and the other dim - k, whose velocity is the
skip path's linear one, get their exact solution x(1) = s x(0). dopri5 still measures its error as the RMS over all
dim coordinates (the exact ones counting zero), the criterion of integrating them all. At dim 1,024 and k = 64 that
is 1.7-2.4x less sampling time, the metrics within a quarter of a standard error of a tight solve (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flow_pipeline.core.models.skip import LinearSkip, SubspaceVelocity

SOLVERS = ("euler", "midpoint", "rk4", "dopri5")

# Model evaluations per step of each hand-written fixed-step solver.
_EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}

Velocity = Callable[[Tensor, float], Tensor]


@dataclass
class SampleResult:
    """Output of :func:`sample`.

    x: samples (n, dim), CPU float32, after ``denormalize`` if one was given.
    nfe: model function evaluations per sample trajectory. Fixed-step solvers: ``evals_per_step * steps``
        (euler 1, midpoint 2, rk4 4). dopri5: counted calls of the wrapped function; batches can take different
        adaptive steps, so this is the largest count over batches (the cost of the slowest trajectory).
    solver: solver name; steps: number of fixed steps (ignored by dopri5 but recorded as given);
    seconds: wall-clock time of the integration (all batches, including the transfer back to the CPU).
    """

    x: Tensor
    nfe: int
    solver: str
    steps: int
    seconds: float


def velocity_field(model: Callable[[Tensor, Tensor], Tensor], flow, dtype: torch.dtype = torch.float32) -> Velocity:
    """Wrap ``model`` (a module or any ``(x, t (batch,)) -> output``) and ``flow`` into
    ``v(x (batch, dim), t: float) -> dx/dt (batch, dim)``.

    The scalar time is broadcast to the (batch,) tensor the model and flow expect.
    """

    def v(x: Tensor, t: float) -> Tensor:
        t_batch = torch.full((x.shape[0],), float(t), dtype=dtype, device=x.device)
        return flow.to_velocity(model(x, t_batch), t_batch)

    return v


def euler_step(v: Velocity, x: Tensor, t: float, h: float) -> Tensor:
    """One explicit Euler step (first order, 1 evaluation)."""
    return x + h * v(x, t)


def midpoint_step(v: Velocity, x: Tensor, t: float, h: float) -> Tensor:
    """One explicit midpoint step (second order, 2 evaluations)."""
    k1 = v(x, t)
    return x + h * v(x + 0.5 * h * k1, t + 0.5 * h)


def rk4_step(v: Velocity, x: Tensor, t: float, h: float) -> Tensor:
    """One classical Runge-Kutta step (fourth order, 4 evaluations)."""
    k1 = v(x, t)
    k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = v(x + h * k3, t + h)
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


_STEPPERS = {"euler": euler_step, "midpoint": midpoint_step, "rk4": rk4_step}


def integrate_fixed(v: Velocity, x0: Tensor, solver: str, steps: int) -> Tensor:
    """Integrate dx/dt = v(x, t) from t=0 to t=1 with ``steps`` equal steps of a fixed-step ``solver``.

    x0: (batch, dim) -> x(1): (batch, dim).
    """
    stepper = _STEPPERS[solver]
    h = 1.0 / steps
    x = x0
    for i in range(steps):
        # i / steps rather than a running sum, so the grid has no accumulated round-off.
        x = stepper(v, x, i / steps, h)
    return x


def integrate_dopri5(v: Velocity, x0: Tensor, rtol: float, atol: float,
                     error_dims: int | None = None) -> tuple[Tensor, int]:
    """Integrate from t=0 to t=1 with adaptive dopri5 (torchdiffeq); returns (x(1) (batch, dim), evaluations).

    The step error is measured as torchdiffeq's RMS over the batch's elements, with ``error_dims`` (>= dim) columns
    per row: the dim integrated here plus coordinates solved exactly elsewhere, whose error is zero."""
    from torchdiffeq import odeint  # imported here: it pulls in scipy.integrate (~0.25 s), for dopri5 only

    calls = 0

    def f(t: Tensor, x: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return v(x, float(t))

    options = {}
    if error_dims is not None:
        if error_dims < x0.shape[1]:
            raise ValueError(f"error_dims must be >= the {x0.shape[1]} integrated coordinates, got {error_dims}")
        options["norm"] = lambda error: error.pow(2).sum().div(error.shape[0] * error_dims).sqrt()
    t_span = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
    trajectory = odeint(f, x0, t_span, rtol=rtol, atol=atol, method="dopri5", options=options)
    return trajectory[-1], calls


def initial_noise(n: int, dim: int, seed: int) -> Tensor:
    """x_0 ~ N(0, I): (n, dim) float32 on the CPU from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, dim), generator=generator, dtype=torch.float32)


def _check_arguments(n: int, dim: int, solver: str, steps: int, batch_size: int) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
    if n < 1 or dim < 1:
        raise ValueError(f"n and dim must be >= 1, got n={n}, dim={dim}")
    if solver != "dopri5" and steps < 1:
        raise ValueError(f"steps must be >= 1 for {solver}, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def sample(
    model: nn.Module,
    flow,
    n: int,
    dim: int,
    solver: str = "euler",
    steps: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    denormalize: Callable[[Tensor], Tensor] | None = None,
    guidance: float = 1.0,
) -> SampleResult:
    """Draw ``n`` samples (n, dim) by integrating ``flow.to_velocity(model(x, t), t)`` from t=0 to t=1.

    Runs under ``torch.inference_mode()`` with the model in eval mode; the model's previous train/eval mode is
    restored afterwards. ``n`` is processed in batches of ``batch_size`` rows. ``steps`` is used by the fixed-step
    solvers, ``rtol``/``atol`` by ``dopri5``. ``denormalize`` maps the CPU float32 (n, dim) result back to data space
    (the checkpoint normaliser's inverse). ``guidance`` w: integrate ``model(x, t, guidance=w)`` instead, for a
    :class:`~flow_pipeline.core.models.skip.LinearSkip` model (its network's part scaled by w; 1: the model as
    trained). Raises ValueError for an unknown solver, non-positive sizes, or guidance != 1 on another model.
    """
    _check_arguments(n, dim, solver, steps, batch_size)
    if guidance != 1.0:
        model = _guided(model, guidance)
    x0_all = initial_noise(n, dim, seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            x, nfe = _integrate_batches(model, flow, x0_all, solver, steps, device, batch_size, rtol, atol)
            seconds = time.perf_counter() - start
            if denormalize is not None:
                x = denormalize(x)
    finally:
        model.train(was_training)
    return SampleResult(x=x.detach().to("cpu", torch.float32), nfe=nfe, solver=solver, steps=steps, seconds=seconds)


def _integrate_batches(
    model: nn.Module,
    flow,
    x0_all: Tensor,
    solver: str,
    steps: int,
    device: str | torch.device,
    batch_size: int,
    rtol: float,
    atol: float,
) -> tuple[Tensor, int]:
    """Integrate each batch of x0_all (n, dim); returns (x(1) (n, dim) on the CPU, nfe per trajectory)."""
    split = _subspace_velocity(model, flow)
    if split is None:
        k, v = x0_all.shape[1], velocity_field(model, flow, dtype=x0_all.dtype)
    else:
        k, v = split.k, velocity_field(split.velocity, flow, dtype=x0_all.dtype)
    outputs = []
    nfe = 0
    for x0 in x0_all.split(batch_size):
        x0 = x0.to(device)
        if solver == "dopri5":
            x1, calls = integrate_dopri5(v, x0[:, :k], rtol, atol, error_dims=None if split is None else x0.shape[1])
            nfe = max(nfe, calls)
        else:
            x1 = integrate_fixed(v, x0[:, :k], solver, steps)
            nfe = _EVALS_PER_STEP[solver] * steps
        if split is not None:
            x1 = torch.cat([x1, x0[:, k:] * split.end_scale], dim=1)
        outputs.append(x1.to("cpu", torch.float32))
    return torch.cat(outputs), nfe


class _Guided(nn.Module):
    """A LinearSkip model called with a fixed ``guidance``; keeps ``subspace_velocity`` so the split still applies."""

    def __init__(self, model: nn.Module, guidance: float) -> None:
        super().__init__()
        self.model, self.guidance = model, float(guidance)
        self.train(model.training)  # sample() restores this mode afterwards, on the wrapped model too

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.model(x_t, t, guidance=self.guidance)

    def subspace_velocity(self) -> SubspaceVelocity | None:
        return self.model.subspace_velocity(guidance=self.guidance)


def _guided(model: nn.Module, guidance: float) -> nn.Module:
    if not isinstance(model, LinearSkip):
        raise ValueError(f"guidance {guidance} needs a model with a linear skip path (linear_skip: true), "
                         f"got {type(model).__name__}")
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance}")
    return _Guided(model, guidance)


def _subspace_velocity(model: nn.Module, flow) -> SubspaceVelocity | None:
    """The model's split velocity (see the module docstring), or None to integrate all coordinates. Only for a flow
    whose velocity is the model's output (target_scale 1): the exact solution x(1) = s x(0) is the model's own."""
    subspace_velocity = getattr(model, "subspace_velocity", None)
    if subspace_velocity is None or getattr(flow, "target_scale", None) != 1.0:
        return None
    return subspace_velocity()
