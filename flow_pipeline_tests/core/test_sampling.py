"""ODE sampler against velocity fields whose flow has a closed-form solution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flow_pipeline.core.sampling import SOLVERS, SampleResult, sample

N, DIM = 48, 12


class IdentityFlow:
    """Stand-in flow whose model output already is the velocity."""

    def to_velocity(self, output, t):
        return output


class ScaledFlow:
    """Stand-in flow trained on velocity * scale: to_velocity divides it back out (and checks the t contract)."""

    def __init__(self, scale: float):
        self.scale = scale

    def to_velocity(self, output, t):
        assert t.shape == (output.shape[0],)
        return output / self.scale


class TimeLinearField(nn.Module):
    """dx/dt = (a + b t) x, so x(1) = x_0 exp(a + b/2); depends on t, so time plumbing is exercised."""

    def __init__(self, a: float, b: float, scale: float = 1.0):
        super().__init__()
        self.a, self.b, self.scale = a, b, scale

    def forward(self, x, t):
        return self.scale * (self.a + self.b * t)[:, None] * x

    def exact(self, x0):
        return x0 * math.exp(self.a + self.b / 2)


class ConstantField(nn.Module):
    """dx/dt = c, so x(1) = x_0 + c, exactly, for every solver."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.register_buffer("c", c)

    def forward(self, x, t):
        return self.c.expand_as(x)


class CountingMLP(nn.Module):
    """Small random MLP velocity that counts forward calls and records the mode it runs in."""

    def __init__(self, dim: int):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(dim + 1, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, dim))
        self.calls = 0
        self.seen_training: set[bool] = set()
        self.seen_inference: set[bool] = set()

    def forward(self, x, t):
        self.calls += 1
        self.seen_training.add(self.training)
        self.seen_inference.add(torch.is_inference_mode_enabled())
        return self.net(torch.cat([x, t[:, None]], dim=1))


def reference_x0(n: int, dim: int, seed: int) -> torch.Tensor:
    """The documented starting-point contract, written out independently."""
    return torch.randn((n, dim), generator=torch.Generator().manual_seed(seed))


def relative_error(result: SampleResult, exact: torch.Tensor) -> float:
    return float((result.x - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize(
    ("solver", "order", "step_counts", "max_final_error"),
    [("euler", 1, (16, 32, 64), 0.05), ("midpoint", 2, (8, 16, 32), 2e-3), ("rk4", 4, (4, 8, 16), 1e-5)],
)
def test_fixed_step_solvers_converge_with_their_order(solver, order, step_counts, max_final_error):
    field = TimeLinearField(a=0.75, b=1.5)
    exact = field.exact(reference_x0(N, DIM, seed=5))
    errors = [
        relative_error(sample(field, IdentityFlow(), N, DIM, solver, steps, seed=5), exact) for steps in step_counts
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[-1] < max_final_error
    # Least-squares slope of log(error) vs log(h): the observed order of convergence.
    observed = np.polyfit(np.log(1.0 / np.array(step_counts)), np.log(errors), 1)[0]
    assert order - 0.3 < observed < order + 0.4, (solver, errors, observed)


def test_dopri5_matches_exact_solution_and_counts_evaluations():
    field = TimeLinearField(a=0.75, b=1.5)
    exact = field.exact(reference_x0(N, DIM, seed=2))
    result = sample(field, IdentityFlow(), N, DIM, solver="dopri5", seed=2, rtol=1e-6, atol=1e-6)
    assert relative_error(result, exact) < 1e-4
    assert result.nfe > 0
    assert result.solver == "dopri5"


@pytest.mark.parametrize("solver", SOLVERS)
def test_constant_velocity_is_integrated_exactly(solver):
    c = torch.linspace(-2.0, 3.0, DIM)
    result = sample(ConstantField(c), IdentityFlow(), N, DIM, solver=solver, steps=7, seed=11)
    torch.testing.assert_close(result.x, reference_x0(N, DIM, 11) + c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("solver", "evals_per_step"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_nfe_counts_model_calls(solver, evals_per_step):
    model = CountingMLP(DIM)
    result = sample(model, IdentityFlow(), N, DIM, solver=solver, steps=9, batch_size=N)
    assert result.nfe == evals_per_step * 9 == model.calls
    assert result.steps == 9 and result.solver == solver and result.seconds >= 0


def test_dopri5_nfe_is_the_number_of_model_calls():
    model = CountingMLP(DIM)
    result = sample(model, IdentityFlow(), N, DIM, solver="dopri5", batch_size=N)
    assert result.nfe == model.calls > 0


def test_output_is_cpu_float32_with_requested_shape():
    result = sample(CountingMLP(DIM), IdentityFlow(), 10, DIM, steps=3)
    assert result.x.shape == (10, DIM) and result.x.dtype == torch.float32 and result.x.device.type == "cpu"


def test_same_seed_identical_different_seed_different():
    model = CountingMLP(DIM)
    first = sample(model, IdentityFlow(), N, DIM, solver="midpoint", steps=5, seed=7).x
    again = sample(model, IdentityFlow(), N, DIM, solver="midpoint", steps=5, seed=7).x
    other = sample(model, IdentityFlow(), N, DIM, solver="midpoint", steps=5, seed=8).x
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 0.1


@pytest.mark.parametrize("solver", SOLVERS)
def test_flow_to_velocity_rescaling_is_applied(solver):
    scale = 4.0
    scaled = sample(TimeLinearField(0.5, 1.0, scale=scale), ScaledFlow(scale), N, DIM, solver, steps=6, seed=1)
    plain = sample(TimeLinearField(0.5, 1.0), IdentityFlow(), N, DIM, solver, steps=6, seed=1)
    torch.testing.assert_close(scaled.x, plain.x, atol=1e-5, rtol=1e-5)
    # Without the division the endpoint would be exp(4x) larger: make sure the two really differ.
    ignored = sample(TimeLinearField(0.5, 1.0, scale=scale), IdentityFlow(), N, DIM, solver, steps=6, seed=1)
    assert (ignored.x - plain.x).abs().max() > 1.0


def test_denormalize_is_applied_to_the_samples():
    mean, std = torch.linspace(-1.0, 1.0, DIM), torch.linspace(0.5, 2.0, DIM)
    model = CountingMLP(DIM)
    plain = sample(model, IdentityFlow(), N, DIM, steps=4, seed=3).x
    denorm = sample(model, IdentityFlow(), N, DIM, steps=4, seed=3, denormalize=lambda x: x * std + mean).x
    torch.testing.assert_close(denorm, plain * std + mean)


def test_unknown_solver_lists_valid_solvers():
    with pytest.raises(ValueError) as info:
        sample(CountingMLP(DIM), IdentityFlow(), N, DIM, solver="leapfrog")
    for name in SOLVERS:
        assert name in str(info.value)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_batching_gives_the_same_samples(solver):
    model = CountingMLP(DIM)
    whole = sample(model, IdentityFlow(), 50, DIM, solver=solver, steps=5, seed=4, batch_size=1024).x
    batched = sample(model, IdentityFlow(), 50, DIM, solver=solver, steps=5, seed=4, batch_size=7).x
    torch.testing.assert_close(batched, whole, atol=1e-6, rtol=1e-6)


def test_dopri5_batching_agrees_within_tolerance():
    field = TimeLinearField(a=0.75, b=1.5)
    whole = sample(field, IdentityFlow(), 50, DIM, solver="dopri5", seed=4, batch_size=1024).x
    batched = sample(field, IdentityFlow(), 50, DIM, solver="dopri5", seed=4, batch_size=7).x
    torch.testing.assert_close(batched, whole, atol=1e-4, rtol=1e-4)


def test_runs_in_eval_and_inference_mode_and_restores_training_mode():
    model = CountingMLP(DIM)
    model.train()
    first = sample(model, IdentityFlow(), N, DIM, steps=3, seed=0).x
    assert model.seen_training == {False}  # dropout off while sampling
    assert model.seen_inference == {True}
    assert model.training
    # Dropout would make two draws differ; eval mode makes them identical.
    assert torch.equal(first, sample(model, IdentityFlow(), N, DIM, steps=3, seed=0).x)
    model.eval()
    sample(model, IdentityFlow(), N, DIM, steps=3)
    assert not model.training
