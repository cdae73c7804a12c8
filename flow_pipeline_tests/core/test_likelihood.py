"""Held-out log-likelihood by the probability-flow ODE against closed forms: Gaussian fields (diagonal, full
covariance, through the split LinearSkip / PrincipalSubspace model) at dim 1,024, a Gaussian mixture's nonlinear
field, Hutchinson's estimate and its standard error, and the raw-space Jacobian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core import likelihood
from flow_pipeline.core.flows import ICFM
from flow_pipeline.core.likelihood import log_likelihood, model_log_likelihood
from flow_pipeline.core.models.dit import DiT, DiTConfig
from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.models.subspace import PrincipalSubspace
from flow_pipeline_tests.core.likelihood_fields import (diagonal_gaussian_velocity, gaussian_log_density,
                                                        gaussian_velocity, mixture_log_density, mixture_velocity,
                                                        random_rotation, random_spectrum)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gaussian(dim: int, low: float, high: float, seed: int, rotate: bool = True):
    """(mean, eigenvalues, eigenvectors, covariance) of a random Gaussian, float64."""
    g = torch.Generator().manual_seed(seed)
    eigenvalues = random_spectrum(dim, low, high, g)
    eigenvectors = random_rotation(dim, g) if rotate else torch.eye(dim, dtype=torch.float64)
    mean = 0.5 * torch.randn(dim, dtype=torch.float64, generator=g)
    return mean, eigenvalues, eigenvectors, (eigenvectors * eigenvalues) @ eigenvectors.T


def _draw(n: int, mean, eigenvalues, eigenvectors, seed: int) -> torch.Tensor:
    z = torch.randn(n, mean.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return mean + (z * eigenvalues.sqrt()) @ eigenvectors.T


def test_diagonal_gaussian_field_gives_its_log_density_at_dim_1024():
    mean, lam, vecs, cov = _gaussian(1024, 0.1, 10.0, seed=0, rotate=False)
    x = _draw(3, mean, lam, vecs, seed=1)
    result = log_likelihood(diagonal_gaussian_velocity(mean, lam), x, divergence="exact", steps=12)
    truth = gaussian_log_density(x, mean, cov)
    assert result.divergence == "exact" and result.integrated_dims == 1024 and result.nfe == 48
    assert torch.allclose(result.log_prob, truth, rtol=0, atol=2e-3)
    assert torch.equal(result.std_error, torch.zeros(3))


def test_full_covariance_gaussian_field_gives_its_log_density(monkeypatch):
    mean, lam, vecs, cov = _gaussian(96, 0.1, 10.0, seed=2)
    x = _draw(10, mean, lam, vecs, seed=3)
    truth = gaussian_log_density(x, mean, cov)
    field = gaussian_velocity(mean, lam, vecs)
    monkeypatch.setattr(likelihood, "PRODUCTS_PER_PASS", 160)  # the trace in passes of 40 coordinates
    result = log_likelihood(field, x, divergence="exact", steps=16, batch_size=4)
    assert torch.allclose(result.log_prob, truth, rtol=0, atol=3e-4)
    errors = [(log_likelihood(field, x, divergence="exact", steps=s).log_prob - truth).abs().max() for s in (4, 8)]
    assert errors[0] > 8 * errors[1] > 0  # RK4: the error falls like steps^-4


class _GaussianResidual(nn.Module):
    """On k coordinates: the velocity of N(mean, cov) minus the skip path's g(t) x for variances ``skip_var``, so
    that LinearSkip(PrincipalSubspace(this)) is exactly that Gaussian on the first k coordinates."""

    def __init__(self, mean, eigenvalues, eigenvectors, skip_var):
        super().__init__()
        self.field = gaussian_velocity(mean, eigenvalues, eigenvectors)
        self.skip_var = skip_var

    def forward(self, x, t):
        tc = t.reshape(-1, 1).double()
        gain = (tc * self.skip_var - (1 - tc)) / ((1 - tc) ** 2 + tc**2 * self.skip_var)
        return self.field(x, t) - (gain * x.double()).to(x.dtype)


def _split_gaussian_model(dim: int, k: int, seed: int):
    """(model, mean_k, cov_k, skip variances (dim,) float64): a LinearSkip model exactly equal to
    N(mean_k, cov_k) x N(0, diag(var[k:]))."""
    mean, lam, vecs, cov = _gaussian(k, 0.1, 10.0, seed=seed)
    model = LinearSkip(PrincipalSubspace(nn.Identity(), dim, k), dim)
    model.start_at(random_spectrum(dim, 0.05, 5.0, torch.Generator().manual_seed(seed + 1)).float())
    variances = model.variances().detach().double()
    model.net.net = _GaussianResidual(mean, lam, vecs, variances[:k])
    return model, mean, cov, variances


def test_linear_skip_around_a_principal_subspace_integrates_k_coordinates_and_solves_the_rest():
    dim, k = 1024, 64
    model, mean, cov, variances = _split_gaussian_model(dim, k, seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, dim, dtype=torch.float64, generator=g) * variances.sqrt()
    x[:, :k] = mean + torch.randn(12, k, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(cov).T
    result = log_likelihood(model, x, divergence="exact", steps=16)
    head = gaussian_log_density(x[:, :k], mean, cov)
    rest = gaussian_log_density(x[:, k:], torch.zeros(dim - k, dtype=torch.float64), torch.diag(variances[k:]))
    assert result.integrated_dims == k and result.divergence == "exact"
    assert torch.allclose(result.integrated_log_prob, head, rtol=0, atol=3e-4)
    assert torch.allclose(result.closed_form_log_prob, rest, rtol=0, atol=1e-9)
    assert torch.allclose(result.log_prob, head + rest, rtol=0, atol=3e-4)
    assert result.bits_per_dim == pytest.approx(-(head + rest).mean().item() / (dim * math.log(2)), abs=1e-6)
    # guidance 0 leaves the skip path's Gaussian N(0, diag(var)) on every coordinate
    unguided = log_likelihood(model, x, divergence="exact", steps=16, guidance=0.0)
    skip_only = gaussian_log_density(x, torch.zeros(dim, dtype=torch.float64), torch.diag(variances))
    assert torch.allclose(unguided.log_prob, skip_only, rtol=0, atol=1e-3)


class _TimeMLP(nn.Module):
    """A small nonlinear field: tanh MLP of (x, t)."""

    def __init__(self, dim: int, seed: int, width: int = 32):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.Sequential(nn.Linear(dim + 1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                    nn.Linear(width, dim))

    def forward(self, x, t):
        return self.layers(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], dim=1))


def test_split_model_matches_integrating_every_coordinate_of_the_same_field():
    dim, k = 12, 4
    model = LinearSkip(PrincipalSubspace(_TimeMLP(k, seed=0).double(), dim, k), dim).double()
    model.start_at(random_spectrum(dim, 0.3, 3.0, torch.Generator().manual_seed(1)))
    x = torch.randn(16, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    split = log_likelihood(model, x, steps=32, guidance=1.5)  # auto: k = 4 <= 4 probes, exact
    whole = log_likelihood(lambda z, t: model(z, t, guidance=1.5), x, divergence="exact", steps=32)
    assert split.integrated_dims == k and whole.integrated_dims == dim and split.divergence == "exact"
    assert torch.allclose(split.log_prob, whole.log_prob, rtol=0, atol=1e-4)


def test_exact_and_hutchinson_agree_on_a_small_nonlinear_network_and_its_standard_error_is_honest():
    field = _TimeMLP(8, seed=3).double()
    x = torch.randn(200, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exact = log_likelihood(field, x, divergence="exact", steps=8)
    estimate = log_likelihood(field, x, divergence="hutchinson", probes=8, steps=8, seed=5)
    assert estimate.divergence == "hutchinson" and estimate.probes == 8
    z = (estimate.log_prob - exact.log_prob) / estimate.std_error
    assert bool((estimate.std_error > 0).all())
    assert z.abs().max() < 5 and 0.6 < z.std() < 1.6  # standard errors neither too small nor too large
    assert abs(z.mean()) < 3 / math.sqrt(len(z))  # unbiased: the mean error within 3 se of 0
    again = log_likelihood(field, x, divergence="hutchinson", probes=8, steps=8, seed=5, batch_size=64)
    assert torch.allclose(again.log_prob, estimate.log_prob, rtol=0, atol=1e-9)  # probes follow the seed only


def test_hutchinson_on_a_full_covariance_gaussian_at_dim_1024_has_the_truth_within_its_error():
    mean, lam, vecs, cov = _gaussian(1024, 0.2, 5.0, seed=6)
    x = _draw(8, mean, lam, vecs, seed=7)
    result = log_likelihood(gaussian_velocity(mean, lam, vecs), x, divergence="auto", probes=4, steps=12)
    assert result.divergence == "hutchinson" and result.probes == 4  # auto: 1,024 coordinates is too many
    z = (result.log_prob - gaussian_log_density(x, mean, cov)) / result.std_error
    assert z.abs().max() < 4.5 and bool((result.std_error > 0).all())


def test_a_gaussian_mixtures_nonlinear_field_gives_the_mixture_density():
    g = torch.Generator().manual_seed(8)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    means = 1.5 * torch.randn(3, 4, dtype=torch.float64, generator=g)
    covariances = torch.stack([(v * random_spectrum(4, 0.3, 2.0, g)) @ v.T for v in
                               (random_rotation(4, g) for _ in range(3))])
    labels = torch.multinomial(weights, 64, replacement=True, generator=g)
    x = means[labels] + (torch.linalg.cholesky(covariances[labels]) @ torch.randn(64, 4, 1, dtype=torch.float64,
                                                                                    generator=g)).squeeze(-1)
    result = log_likelihood(mixture_velocity(weights, means, covariances), x, divergence="exact", steps=32)
    assert torch.allclose(result.log_prob, mixture_log_density(x, weights, means, covariances), rtol=0, atol=2e-3)


@pytest.mark.parametrize("method", ["zscore", "whiten"])
def test_normalizer_log_abs_det_jacobian_matches_autograd(method):
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(50, 6, generator=g) @ torch.randn(6, 6, generator=g) * 0.01 + 0.3
    normalizer = Normalizer.fit(rows, method)
    jacobian = torch.autograd.functional.jacobian(normalizer.normalize, rows[:1])[0, :, 0, :]
    expected = torch.linalg.slogdet(jacobian.double()).logabsdet.item()
    assert normalizer.log_abs_det_jacobian() == pytest.approx(expected, abs=1e-4)


def test_model_log_likelihood_in_raw_space_is_the_raw_gaussian_density():
    """A LinearSkip model with a zero network is N(0, diag(var)) in the whitened space, so N(mean + A^-T ..) in raw
    space: its raw density is a Gaussian's, whose covariance is written out here."""
    dim, k = 16, 4
    g = torch.Generator().manual_seed(10)
    rows = (torch.randn(400, dim, generator=g) @ torch.randn(dim, dim, generator=g)) * 0.005 + 0.02
    normalizer = Normalizer.fit(rows, "whiten")
    zero = _TimeMLP(k, seed=11)
    nn.init.zeros_(zero.layers[-1].weight), nn.init.zeros_(zero.layers[-1].bias)
    model = LinearSkip(PrincipalSubspace(zero, dim, k), dim)
    model.start_at(random_spectrum(dim, 0.5, 2.0, g).float())
    model.train()
    x = rows[:20]
    result = model_log_likelihood(model, ICFM(), normalizer, x, divergence="exact", steps=8)
    # z = (x - m) U / s, so x = m + z diag(s) U^T and Cov(x) = U diag(s^2 var) U^T
    u, s = normalizer.components.double(), normalizer.std.double()
    cov = (u * (s**2 * model.variances().detach().double())) @ u.T
    expected = gaussian_log_density(x.double(), normalizer.mean.double(), cov)
    assert model.training  # its mode is restored
    assert result.log_abs_det_jacobian == pytest.approx(-s.log().sum().item(), abs=1e-4)
    assert torch.allclose(result.log_prob, expected, rtol=1e-6, atol=5e-3)


def test_a_rescaled_training_target_is_undone_as_the_sampler_does():
    dim = 6
    g = torch.Generator().manual_seed(12)
    normalizer = Normalizer.fit(torch.randn(100, dim, generator=g) * 0.01 + 0.1, "zscore")
    model = LinearSkip(_TimeMLP(dim, seed=13), dim)
    x = torch.randn(8, dim, generator=g) * 0.01 + 0.1
    scaled = model_log_likelihood(model, ICFM(target_scale=2.0), normalizer, x, divergence="exact", steps=8,
                                  guidance=1.5)
    halved = log_likelihood(lambda z, t: model(z, t, guidance=1.5) / 2.0, normalizer.normalize(x),
                            divergence="exact", steps=8)
    assert scaled.integrated_dims == dim and scaled.closed_form_log_prob.abs().max() == 0
    assert torch.allclose(scaled.log_prob, halved.log_prob + normalizer.log_abs_det_jacobian(), rtol=0, atol=1e-6)


def _reverse_mode_log_density(velocity, x: torch.Tensor, steps: int) -> torch.Tensor:
    """log N(x_0; 0, I) - int_0^1 div v dt per row of x (n, dim), by RK4 from t = 1 to 0 on a float64 state, the
    field evaluated in float32, its divergence the trace of the Jacobian from reverse-mode autograd, row by row."""
    def derivative(z: torch.Tensor, t: float) -> tuple[torch.Tensor, float]:
        def field(y: torch.Tensor) -> torch.Tensor:
            return velocity(y[None], torch.full((1,), t))[0]

        jacobian = torch.autograd.functional.jacobian(field, z.float())
        return field(z.float()).detach().double(), float(torch.trace(jacobian))

    h, densities = 1.0 / steps, []
    for z in x.double():
        integral = 0.0
        for i in range(steps):
            t = 1.0 - i * h
            v1, d1 = derivative(z, t)
            v2, d2 = derivative(z - 0.5 * h * v1, t - 0.5 * h)
            v3, d3 = derivative(z - 0.5 * h * v2, t - 0.5 * h)
            v4, d4 = derivative(z - h * v3, t - h)
            z = z - h / 6 * (v1 + 2 * v2 + 2 * v3 + v4)
            integral += h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
        densities.append(-0.5 * float(z @ z) - 0.5 * z.numel() * math.log(2 * math.pi) - integral)
    return torch.tensor(densities, dtype=torch.float64)


def test_an_attention_network_is_traced_like_any_other():
    """A DiT's field goes through scaled-dot-product attention, whose fused CPU kernel has no forward-mode
    derivative: its exact and Hutchinson divergences still come out, and match reverse-mode Jacobian traces."""
    torch.manual_seed(6)
    model = DiT(8, DiTConfig(num_tokens=4, hidden_size=16, depth=1, num_heads=2, mlp_ratio=2)).eval()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))
    exact = log_likelihood(model, x, divergence="exact", steps=4)
    expected = _reverse_mode_log_density(model, x, steps=4)
    assert torch.allclose(exact.log_prob, expected, rtol=0, atol=1e-3)
    estimate = log_likelihood(model, x, divergence="hutchinson", probes=16, steps=4)
    assert bool(((estimate.log_prob - expected).abs() < 5 * estimate.std_error + 1e-3).all())


def test_bad_input_is_named():
    field = _TimeMLP(3, seed=0)
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(field, torch.randn(2, 3), divergence="trace")
    with pytest.raises(ValueError, match="probes"):
        log_likelihood(field, torch.randn(2, 3), divergence="hutchinson", probes=1)
    with pytest.raises(ValueError, match="non-finite"):
        log_likelihood(field, torch.tensor([[0.0, math.nan, 1.0]]))
    with pytest.raises(ValueError, match="guidance"):
        log_likelihood(field, torch.randn(2, 3), guidance=2.0)
    with pytest.raises(ValueError, match="built for 5"):
        log_likelihood(LinearSkip(nn.Identity(), 5), torch.randn(2, 3))
