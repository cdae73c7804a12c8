"""ODE sampler against velocity fields whose flow has a closed-form solution."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torchdiffeq import odeint

from flow_pipeline.core.flows import get_flow
from flow_pipeline.core.models import build_model
from flow_pipeline.core.sampling import SOLVERS, SampleResult, integrate_dopri5, sample, velocity_field

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


def subspace_model(dim: int = 16, k: int = 5) -> nn.Module:
    """LinearSkip(PrincipalSubspace(tiny MLP on k coordinates)) with random network weights and variances."""
    torch.manual_seed(7)
    model = build_model("mlp", dim=dim, size="tiny", linear_skip=True, principal_dims=k)
    with torch.no_grad():
        for parameter in model.net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        model.log_var.copy_(torch.randn(dim))  # variances from ~0.1 to ~10: a stiff skip path near t = 1
    return model


def euler_on_all_coordinates(model: nn.Module, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """Plain Euler on the whole model, written out independently of the sampler."""
    x = x0.clone()
    with torch.no_grad():
        for i in range(steps):
            x = x + model(x, torch.full((x.shape[0],), i / steps)) / steps
    return x


def test_a_principal_subspace_model_is_stepped_on_its_k_coordinates_and_solved_exactly_on_the_rest():
    model, k = subspace_model(), 5
    x0 = reference_x0(N, 16, seed=4)
    drawn = sample(model, get_flow("icfm"), N, 16, solver="euler", steps=20, seed=4).x
    stepped = euler_on_all_coordinates(model, x0, steps=20)
    # The network reads only the first k coordinates, so Euler on them alone is Euler on the whole model there.
    torch.testing.assert_close(drawn[:, :k], stepped[:, :k], atol=1e-5, rtol=1e-5)
    # The others: x(1) = s x(0) exactly, where whole-model Euler is off by its step error.
    exact_rest = x0[:, k:] * model.log_var[k:].exp().sqrt().detach()
    torch.testing.assert_close(drawn[:, k:], exact_rest, atol=1e-6, rtol=1e-6)
    assert (stepped[:, k:] - exact_rest).abs().max() > 1e-2


def test_a_principal_subspace_model_under_dopri5_is_as_accurate_as_integrating_every_coordinate():
    model, flow = subspace_model(), get_flow("icfm")
    x0 = reference_x0(N, 16, seed=9)
    whole = copy.deepcopy(model).double()  # float64, so that its 1e-10 tolerance means something
    with torch.no_grad():
        reference = odeint(lambda t, x: whole(x, t.expand(x.shape[0])), x0.double(),
                           torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-10, atol=1e-10,
                           method="dopri5")[-1].float()
    errors = []
    for tolerance in (1e-4, 1e-6):
        split = sample(model, flow, N, 16, solver="dopri5", seed=9, rtol=tolerance, atol=tolerance)
        with torch.inference_mode():
            every, calls = integrate_dopri5(velocity_field(model, flow), x0, tolerance, tolerance)
        split_error, every_error = (float((x - reference).abs().max()) for x in (split.x, every))
        assert split_error < 2 * every_error, (tolerance, split_error, every_error)
        assert split.nfe < 1.5 * calls
        errors.append(split_error)
    assert errors[1] < errors[0] / 10 and errors[1] < 2e-3
    # The step control counts all 16 coordinates: an RMS over the 5 integrated ones alone is stricter.
    with torch.inference_mode():
        _, calls_k_only = integrate_dopri5(velocity_field(model.subspace_velocity().velocity, flow), x0[:, :5],
                                           1e-4, 1e-4)
    assert sample(model, flow, N, 16, solver="dopri5", seed=9, rtol=1e-4, atol=1e-4).nfe < calls_k_only


def test_a_flow_that_rescales_the_output_integrates_every_coordinate():
    model = subspace_model()
    flow = get_flow("icfm", target_scale=2.0)  # velocity = output / 2: the skip path's closed form no longer holds
    drawn = sample(model, flow, N, 16, solver="euler", steps=20, seed=4).x
    x = reference_x0(N, 16, seed=4)
    with torch.no_grad():
        for i in range(20):
            x = x + model(x, torch.full((N,), i / 20)) / 2.0 / 20
    torch.testing.assert_close(drawn, x, atol=1e-5, rtol=1e-5)


def test_dopri5_error_dims_below_the_integrated_coordinates_is_refused():
    with pytest.raises(ValueError, match="error_dims must be >= the 12 integrated coordinates, got 5"):
        integrate_dopri5(lambda x, t: -x, reference_x0(N, DIM, seed=0), 1e-4, 1e-4, error_dims=5)
