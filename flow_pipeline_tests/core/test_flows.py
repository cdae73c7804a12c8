"""Flow paths against hand-written formulas, finite differences and an independently solved assignment problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from flow_pipeline.core.flows import FLOWS, PathSample, get_flow

BATCH, DIM = 24, 40
# Times include both edges; the rest are random so the test does not only see "nice" values.
EDGE_TIMES = (0.0, 1.0)


def _batch(seed: int, dtype=torch.float32, batch: int = BATCH, dim: int = DIM):
    g = torch.Generator().manual_seed(seed)
    x_0 = torch.randn(batch, dim, generator=g, dtype=dtype)
    x_1 = torch.randn(batch, dim, generator=g, dtype=dtype) * 1.7 + 0.3
    return x_0, x_1


def _times(seed: int, dtype=torch.float32, batch: int = BATCH) -> torch.Tensor:
    """(batch,) times: the first rows at 0 and 1 exactly, the others uniform in (0, 1)."""
    t = torch.rand(batch, generator=torch.Generator().manual_seed(seed + 1000), dtype=dtype)
    t[0], t[1] = EDGE_TIMES
    return t


def _constant_times(value: float, dtype=torch.float32) -> torch.Tensor:
    return torch.full((BATCH,), value, dtype=dtype)


# --- hand-written paths (x_t, u_t) per flow; eps is the path noise (ignored by noiseless flows) ------------------

def _icfm_path(x_0, x_1, t, sigma, eps):
    tc = t[:, None]
    return (1 - tc) * x_0 + tc * x_1 + sigma * eps, x_1 - x_0


def _fm_path(x_0, x_1, t, sigma_min):
    tc = t[:, None]
    mu_t = tc * x_1
    sigma_t = 1 - (1 - sigma_min) * tc
    return mu_t + sigma_t * x_0, x_1 - (1 - sigma_min) * x_0


def _vp_path(x_0, x_1, t):
    a = math.pi / 2 * t[:, None]
    return torch.cos(a) * x_0 + torch.sin(a) * x_1, math.pi / 2 * (torch.cos(a) * x_1 - torch.sin(a) * x_0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_icfm_without_noise_matches_formula(seed):
    x_0, x_1 = _batch(seed)
    t = _times(seed)
    path = get_flow("icfm", sigma=0.0).sample(x_0, x_1, t)
    want_x_t, want_u_t = _icfm_path(x_0, x_1, t, 0.0, 0.0)
    torch.testing.assert_close(path.x_t, want_x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(path.u_t, want_u_t, rtol=0, atol=0)
    # Edges: x_t is exactly the noise at t=0 and exactly the data at t=1.
    torch.testing.assert_close(path.x_t[0], x_0[0], rtol=0, atol=0)
    torch.testing.assert_close(path.x_t[1], x_1[1], rtol=0, atol=0)
    torch.testing.assert_close(path.target, path.u_t, rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [0.05, 0.5])
def test_icfm_with_noise_matches_formula_with_reproduced_eps(sigma):
    x_0, x_1 = _batch(3)
    t = _times(3)
    path = get_flow("icfm", sigma=sigma).sample(x_0, x_1, t, generator=torch.Generator().manual_seed(77))
    eps = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(77))
    want_x_t, want_u_t = _icfm_path(x_0, x_1, t, sigma, eps)
    torch.testing.assert_close(path.x_t, want_x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(path.u_t, want_u_t, rtol=0, atol=0)
    # The noise really is there (the noiseless path differs by sigma * eps, which is not small).
    noiseless, _ = _icfm_path(x_0, x_1, t, 0.0, 0.0)
    assert (path.x_t - noiseless).abs().max() > sigma
    # A differently seeded generator gives a different x_t.
    other = get_flow("icfm", sigma=sigma).sample(x_0, x_1, t, generator=torch.Generator().manual_seed(78))
    assert not torch.equal(other.x_t, path.x_t)


@pytest.mark.parametrize("sigma_min", [1e-4, 0.1, 0.0])
def test_fm_matches_formula(sigma_min):
    x_0, x_1 = _batch(4)
    t = _times(4)
    path = get_flow("fm", sigma_min=sigma_min).sample(x_0, x_1, t)
    want_x_t, want_u_t = _fm_path(x_0, x_1, t, sigma_min)
    torch.testing.assert_close(path.x_t, want_x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(path.u_t, want_u_t, rtol=1e-6, atol=1e-6)
    # t=1: x_1 + sigma_min x_0 (the minimum std around the data); t=0: pure noise.
    torch.testing.assert_close(path.x_t[1], x_1[1] + sigma_min * x_0[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(path.x_t[0], x_0[0], rtol=0, atol=0)


def test_vp_matches_formula():
    x_0, x_1 = _batch(5)
    t = _times(5)
    path = get_flow("vp").sample(x_0, x_1, t)
    want_x_t, want_u_t = _vp_path(x_0, x_1, t)
    torch.testing.assert_close(path.x_t, want_x_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(path.u_t, want_u_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(path.x_t[0], x_0[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(path.x_t[1], x_1[1], rtol=0, atol=1e-6)
    # Edge velocities: (pi/2) x_1 at t=0, -(pi/2) x_0 at t=1.
    torch.testing.assert_close(path.u_t[0], math.pi / 2 * x_1[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(path.u_t[1], -math.pi / 2 * x_0[1], rtol=1e-6, atol=1e-6)


FD_CASES = [
    ("icfm", {"sigma": 0.0}),
    ("icfm", {"sigma": 0.3}),
    ("otcfm", {"sigma": 0.2}),
    ("fm", {"sigma_min": 1e-4}),
    ("fm", {"sigma_min": 0.2}),
    ("vp", {}),
]


@pytest.mark.parametrize("name,params", FD_CASES, ids=[f"{n}-{p}" for n, p in FD_CASES])
@pytest.mark.parametrize("t_value", [0.0, 0.13, 0.5, 0.87, 1.0])
def test_u_t_is_the_time_derivative_of_x_t(name, params, t_value):
    """Central finite difference of x_t in float64 (the same path noise on both sides) equals u_t."""
    flow = get_flow(name, **params)
    x_0, x_1 = _batch(6, dtype=torch.float64)
    h = 1e-5

    def x_at(value):
        return flow.sample(x_0, x_1, _constant_times(value, torch.float64), generator=torch.Generator().manual_seed(5))

    fd = (x_at(t_value + h).x_t - x_at(t_value - h).x_t) / (2 * h)
    path = x_at(t_value)
    assert path.u_t.dtype == torch.float64
    torch.testing.assert_close(path.u_t, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_shapes_and_types(name):
    x_0, x_1 = _batch(7)
    t = _times(7)
    path = get_flow(name).sample(x_0, x_1, t, generator=torch.Generator().manual_seed(0))
    assert isinstance(path, PathSample)
    for tensor in (path.x_0, path.x_1, path.x_t, path.u_t, path.target):
        assert tensor.shape == (BATCH, DIM)
        assert tensor.dtype == torch.float32
    assert path.t.shape == (BATCH,)
    assert torch.isfinite(path.x_t).all() and torch.isfinite(path.u_t).all()


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.detach().double().numpy()
    return a[np.lexsort(a.T[::-1])]


def _pair_cost(x_0: torch.Tensor, x_1: torch.Tensor) -> float:
    return float(((x_0.double() - x_1.double()) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_otcfm_pairs_by_an_optimal_permutation(seed):
    x_0, x_1 = _batch(10 + seed, batch=48, dim=16)
    t = _times(10 + seed, batch=48)
    path = get_flow("otcfm", sigma=0.0).sample(x_0, x_1, t)
    # Noise rows stay in place; data rows are a permutation: none duplicated, none dropped.
    assert torch.equal(path.x_0, x_0)
    np.testing.assert_array_equal(_sorted_rows(path.x_1), _sorted_rows(x_1))
    assert len({tuple(r) for r in path.x_1.tolist()}) == x_1.shape[0]
    # The assignment is optimal: the same total squared cost as an independently solved Hungarian problem.
    a, b = x_0.double().numpy(), x_1.double().numpy()
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    optimum = float(cost[rows, cols].sum())
    got = _pair_cost(path.x_0, path.x_1)
    assert got == pytest.approx(optimum, rel=1e-9)
    identity = _pair_cost(x_0, x_1)
    assert got <= identity
    assert got < identity  # random batches of 48 are never already optimally paired
    # The path is the ICFM path on the re-paired data.
    want_x_t, want_u_t = _icfm_path(x_0, path.x_1, t, 0.0, 0.0)
    torch.testing.assert_close(path.x_t, want_x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(path.u_t, want_u_t, rtol=0, atol=0)


def test_otcfm_recovers_a_hidden_permutation():
    """Data = a shuffled copy of the noise plus a tiny perturbation: the optimal pairing undoes the shuffle."""
    g = torch.Generator().manual_seed(21)
    x_0 = torch.randn(32, 8, generator=g)
    perm = torch.randperm(32, generator=g)
    x_1 = x_0[perm] + 1e-3 * torch.randn(32, 8, generator=g)
    path = get_flow("otcfm").sample(x_0, x_1, torch.rand(32, generator=g))
    torch.testing.assert_close(path.x_1, x_0, rtol=0, atol=1e-2)


@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("scale", [4.0, 2.5, 0.3])
def test_target_scale_multiplies_target_and_to_velocity_undoes_it(name, scale):
    x_0, x_1 = _batch(8)
    t = _times(8)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    plain = get_flow(name).sample(x_0, x_1, t, generator=gen())
    flow = get_flow(name, target_scale=scale)
    scaled = flow.sample(x_0, x_1, t, generator=gen())
    assert torch.equal(scaled.u_t, plain.u_t)
    torch.testing.assert_close(scaled.target, plain.u_t * scale, rtol=0, atol=0)
    back = flow.to_velocity(scaled.target, t)
    if scale == 4.0:  # a power of two: multiply then divide is exact in floating point
        assert torch.equal(back, plain.u_t)
    else:
        torch.testing.assert_close(back, plain.u_t, rtol=1e-6, atol=0)
    # Unscaled flows hand the output through untouched.
    out = torch.randn(BATCH, DIM)
    assert torch.equal(get_flow(name).to_velocity(out, t), out)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_target_scale_must_be_positive(bad):
    with pytest.raises(ValueError, match="target_scale"):
        get_flow("icfm", target_scale=bad)


def test_invalid_flow_parameters_raise():
    with pytest.raises(ValueError, match="sigma"):
        get_flow("icfm", sigma=-0.1)
    with pytest.raises(ValueError, match="sigma_min"):
        get_flow("fm", sigma_min=1.0)


@pytest.mark.parametrize("bad", ["foo", "ICFM", ""])
def test_unknown_flow_raises_listing_valid_names(bad):
    with pytest.raises(ValueError) as info:
        get_flow(bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in ("icfm", "otcfm", "fm", "vp"):
        assert name in message


@pytest.mark.parametrize("name, params, expected", [
    ("icfm", {}, 2.0),
    ("icfm", {"sigma": 0.3}, 2.0),  # path noise moves x_t, not the target
    ("otcfm", {}, 2.0),
    ("fm", {"sigma_min": 0.1}, 1.0 + 0.9**2),
    ("vp", {}, math.pi**2 / 4),
    ("vp", {"target_scale": 2.0}, math.pi**2),
])
def test_zero_predictor_loss_matches_closed_form_and_monte_carlo(name, params, expected):
    flow = get_flow(name, **params)
    assert flow.zero_predictor_loss() == pytest.approx(expected, rel=1e-9)
    # Monte Carlo: the mean squared target of unit-variance data and noise, independently paired (rows of x_1
    # shuffled for otcfm would re-pair: the reference is the independent coupling, so use the ICFM path there).
    generator = torch.Generator().manual_seed(7)
    x_0 = torch.randn(20_000, 64, generator=generator, dtype=torch.float64)
    x_1 = torch.randn(20_000, 64, generator=generator, dtype=torch.float64)
    t = torch.rand(20_000, generator=generator, dtype=torch.float64)
    mc_flow = get_flow("icfm", **params) if name == "otcfm" else flow
    x_t, u_t = mc_flow.interpolate(x_0, x_1, t, generator)
    monte_carlo = float((u_t * mc_flow.target_scale).pow(2).mean())
    assert monte_carlo == pytest.approx(expected, rel=0.01)
