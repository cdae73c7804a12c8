"""Prototype features: the cluster posterior on the path, their start from training rows, their place in the model
(checkpoint round trip, likelihood traces) and the config that asks for them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.checkpoint import model_from_config
from flow_pipeline.core.likelihood import log_likelihood
from flow_pipeline.core.models import build_model, start_prototypes
from flow_pipeline.core.models.prototypes import PrototypeFeatures
from flow_pipeline_tests.core.test_likelihood import _reverse_mode_log_density


def _posterior(x: np.ndarray, t: float, centres: np.ndarray, spread: float) -> np.ndarray:
    """Written out: x_t | prototype j ~ N(t c_j, ((1 - t)^2 + t^2 s^2) I), equal priors; the posterior (n_rows, n)."""
    variance = (1 - t) ** 2 + t**2 * spread
    log_density = np.stack([-0.5 * ((x - t * c) ** 2).sum(1) / variance - 0.5 * x.shape[1] * math.log(2 * math.pi * variance)
                            for c in centres], axis=1)
    return np.exp(log_density - scipy.special.logsumexp(log_density, axis=1, keepdims=True))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8, 1.0])
def test_features_are_the_prototypes_posterior_on_the_path_times_sqrt_n(t):
    rng = np.random.default_rng(int(t * 10) + 3)
    features = PrototypeFeatures(k=12, n=7)
    with torch.no_grad():
        features.prototypes.copy_(torch.from_numpy(rng.normal(size=(7, 12)) * 2))
        features.log_spread.fill_(math.log(0.4))
    x = rng.normal(size=(9, 12)) * 1.5
    got = features(torch.from_numpy(x).float(), torch.full((9,), t)).detach().double().numpy()
    expected = _posterior(x, t, features.prototypes.detach().double().numpy(), 0.4) * math.sqrt(7)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_features_stay_float32_accurate_under_bfloat16_autocast():
    """The squared distances are differences of terms of order k: in bfloat16 they would be noise."""
    torch.manual_seed(4)
    features = PrototypeFeatures(k=256, n=32)
    with torch.no_grad():
        features.prototypes.normal_()
        features.log_spread.fill_(math.log(0.3))
    # Points on the path halfway between two prototypes: posteriors near 1/2 for both, so rounding shows.
    centres = features.prototypes.detach()
    t = torch.full((8,), 0.5)
    x = 0.5 * (centres[:8] + centres[8:16]) * 0.5 + 0.01 * torch.randn(8, 256)
    reference = _posterior(x.double().numpy(), 0.5, centres.double().numpy(), 0.3) * 32**0.5
    assert reference.max(axis=1).min() < 0.9 * 32**0.5  # shared between prototypes, not one-hot
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = features(x, t)
    np.testing.assert_allclose(under_autocast.detach().double().numpy(), reference, atol=1e-4)


def test_start_at_takes_distinct_training_rows_and_half_the_nearest_squared_distance_per_coordinate():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 6, generator=generator) * 10
    rows = centres.repeat(40, 1) + 0.5 * torch.randn(200, 6, generator=generator)  # spread 0.25 per coordinate
    features = PrototypeFeatures(k=6, n=20)
    features.start_at(rows, torch.Generator().manual_seed(1))
    chosen = features.prototypes.detach()
    matches = (chosen[:, None, :] == rows[None]).all(-1)
    assert bool(matches.any(1).all()) and len({tuple(r.tolist()) for r in chosen}) == 20
    # A row's nearest prototype is a draw of its own cluster: squared distance ~ 2 * 0.25 per coordinate, minus the
    # nearest-of-several shrinkage; it must land near 0.25 and far from the between-cluster scale (~100).
    assert 0.1 < features.log_spread.exp().item() < 0.3


def test_start_at_with_fewer_rows_than_prototypes_takes_every_row_then_repeats():
    rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    features = PrototypeFeatures(k=3, n=8)
    features.start_at(rows, torch.Generator().manual_seed(0))
    chosen = features.prototypes.detach()
    index = [int(torch.nonzero((rows == prototype).all(-1))[0]) for prototype in chosen]  # each is a training row
    assert sorted(set(index)) == list(range(5)) and len(index) == 8
    assert torch.isfinite(features.log_spread).all()


def test_start_at_refuses_rows_of_another_width():
    with pytest.raises(ValueError, match="need rows of 3 coordinates"):
        PrototypeFeatures(k=3, n=8).start_at(torch.randn(5, 4), torch.Generator().manual_seed(0))


def test_a_model_with_prototypes_round_trips_through_its_saved_config():
    config = TrainConfig(arch="mlp", model_size="tiny", dim=16, normalization="whiten", linear_skip=True,
                         principal_dims=6, prototypes=5).model_dump()
    model = model_from_config(config)
    start_prototypes(model, torch.randn(50, 16, generator=torch.Generator().manual_seed(2)), seed=3)
    rebuilt = model_from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x, t = torch.randn(4, 16), torch.rand(4)
    assert torch.equal(rebuilt(x, t), model(x, t))
    assert torch.equal(rebuilt.net.features.prototypes, model.net.features.prototypes)


def test_start_prototypes_is_seeded_and_leaves_other_models_alone():
    rows = torch.randn(40, 10, generator=torch.Generator().manual_seed(5))
    a, b = (build_model("mlp", 10, "tiny", True, 4, prototypes=6) for _ in range(2))
    start_prototypes(a, rows, seed=7)
    start_prototypes(b, rows, seed=7)
    assert torch.equal(a.net.features.prototypes, b.net.features.prototypes)
    chosen = a.net.features.prototypes.detach()
    assert bool((chosen[:, None, :] == rows[None, :, :4]).all(-1).any(1).all())  # each one a training row's k coords
    assert len({tuple(row.tolist()) for row in chosen}) == 6
    other = build_model("mlp", 10, "tiny", True, 4, prototypes=6)
    start_prototypes(other, rows, seed=8)
    assert not torch.equal(other.net.features.prototypes, chosen)
    plain = build_model("mlp", 10, "tiny", True, 4)
    before = [p.clone() for p in plain.parameters()]
    start_prototypes(plain, rows, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(before, plain.parameters()))


@pytest.mark.parametrize("arch", ["mlp", "dit", "unet"])
def test_every_architecture_reads_the_features_and_the_likelihood_traces_them(arch):
    """The field's divergence includes the features' dependence on x: exact forward-mode traces match reverse-mode
    Jacobian traces of the whole field."""
    torch.manual_seed(8)
    model = build_model(arch, 8, "tiny", linear_skip=False, principal_dims=8, prototypes=8).eval()
    start_prototypes(model, torch.randn(30, 8, generator=torch.Generator().manual_seed(9)), seed=1)
    with torch.no_grad():
        model.features.log_spread.fill_(math.log(0.2))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(10))
    exact = log_likelihood(model, x, divergence="exact", steps=4)
    expected = _reverse_mode_log_density(model, x, steps=4)
    assert torch.allclose(exact.log_prob, expected, rtol=0, atol=1e-3)


def test_the_config_refuses_prototypes_without_principal_dims():
    with pytest.raises(ValueError, match="prototypes: needs principal_dims"):
        TrainConfig(arch="mlp", principal_dims=0, prototypes=16)
    with pytest.raises(ValueError, match="prototypes: needs principal_dims"):
        TrainConfig(arch="mlp", normalization="zscore", prototypes=16)  # there principal_dims is 0 when unset
    with pytest.raises(ValueError, match="prototypes: needs principal_dims"):
        build_model("mlp", 8, "tiny", prototypes=3)
