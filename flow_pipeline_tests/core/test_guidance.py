"""Guidance of a skip-path model: the guided velocity, guided sampling, and the variance-matched choice of w."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flow_pipeline.core.flows import get_flow
from flow_pipeline.core.guidance import MAX_GUIDANCE, fit_guidance
from flow_pipeline.core.models import build_model
from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.models.subspace import PrincipalSubspace
from flow_pipeline.core.sampling import initial_noise, sample

DIM, K, N = 12, 4, 512


class ConstantGain(nn.Module):
    """net(x, t) = c x: with the skip path's exact solution, x(1) = s x(0) exp(w c) per coordinate."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.c * x


def gain_model(c: float, skip_variance: float) -> LinearSkip:
    model = LinearSkip(PrincipalSubspace(ConstantGain(c), DIM, K), DIM)
    model.start_at(torch.full((DIM,), skip_variance))
    return model


def test_the_guided_velocity_scales_only_the_network_part():
    torch.manual_seed(0)
    model = build_model("mlp", dim=DIM, size="tiny", linear_skip=True, principal_dims=K)
    x, t, w = torch.randn(8, DIM), torch.rand(8), 1.7
    var = model.variances().detach()
    tc = t[:, None]
    gaussian = (tc * var - (1 - tc)) / ((1 - tc) ** 2 + tc**2 * var) * x  # written out, not the module's helper
    with torch.no_grad():
        network = model(x, t) - gaussian
        torch.testing.assert_close(model(x, t, guidance=w), gaussian + w * network, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, t, guidance=0.0), gaussian, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w", [0.5, 1.0, 1.6])
def test_guided_sampling_matches_the_exact_solution(w):
    c, s2 = 0.3, 0.6
    model = gain_model(c, s2)
    drawn = sample(model, get_flow("icfm"), N, DIM, solver="dopri5", seed=3, rtol=1e-7, atol=1e-7, guidance=w).x
    x0 = initial_noise(N, DIM, seed=3)
    expected = x0 * math.sqrt(s2)
    expected[:, :K] *= math.exp(w * c)  # only the network's coordinates feel the guidance
    torch.testing.assert_close(drawn, expected, rtol=1e-4, atol=1e-4)


def test_guided_sampling_leaves_the_model_in_its_mode():
    model = gain_model(0.1, 1.0).eval()
    sample(model, get_flow("icfm"), 4, DIM, steps=2, guidance=1.5)
    assert not model.training


def test_guidance_on_a_model_without_a_skip_path_is_refused():
    model = build_model("mlp", dim=DIM, size="tiny")
    with pytest.raises(ValueError, match="linear_skip"):
        sample(model, get_flow("icfm"), 4, DIM, steps=2, guidance=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        sample(gain_model(0.1, 1.0), get_flow("icfm"), 4, DIM, steps=2, guidance=-1.0)


def training_rows(variance: float, rows: int = 4000) -> torch.Tensor:
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(11)) * math.sqrt(variance)


def test_fit_guidance_finds_the_w_that_matches_the_training_variance():
    c, s2 = 0.2, 0.5  # samples' variance s2 exp(2 w c) v0: 0.75 of the target's at w = 1
    rows = training_rows(1.0)
    fit = fit_guidance(gain_model(c, s2), get_flow("icfm"), rows, "dopri5", n=N, seed=5, rtol=1e-7, atol=1e-7)
    target = float(rows[:, :K].double().var(0).mean())
    noise_variance = float(initial_noise(N, DIM, seed=5)[:, :K].var(0).mean())
    exact_w = math.log(target / (s2 * noise_variance)) / (2 * c)
    assert fit.coordinates == K and fit.target_variance == pytest.approx(target)
    assert fit.guided_variance == pytest.approx(target, rel=0.01)
    assert fit.guidance == pytest.approx(exact_w, abs=0.03)  # 1% of variance is 0.025 of w at c = 0.2
    assert fit.unguided_variance == pytest.approx(s2 * math.exp(2 * c) * noise_variance, rel=1e-3)
    assert 2 <= fit.draws <= 5


def test_fit_guidance_leaves_a_dispersed_model_and_a_plain_model_at_one():
    rows = training_rows(1.0)
    wide = fit_guidance(gain_model(0.2, 2.0), get_flow("icfm"), rows, "euler", steps=20, n=N)
    assert (wide.guidance, wide.draws) == (1.0, 1) and "not under-dispersed" in wide.note
    plain = fit_guidance(build_model("mlp", dim=DIM, size="tiny"), get_flow("icfm"), rows, "euler", steps=20, n=N)
    assert plain.guidance == 1.0 and plain.draws == 0 and "no linear skip" in plain.note
    # No draw, no variance: None, so the evaluation's JSON stays strict JSON (no NaN).
    assert plain.unguided_variance is None and json.dumps(plain.as_dict(), allow_nan=False)


def test_fit_guidance_stops_at_the_cap_and_says_so():
    # c = 0.02: the variance grows with w, but at w = 3 it is still 0.5 exp(0.12) v0 ~ 0.56 of the target.
    fit = fit_guidance(gain_model(0.02, 0.5), get_flow("icfm"), training_rows(1.0), "dopri5", n=N)
    assert fit.guidance == MAX_GUIDANCE and fit.guided_variance < 0.6 * fit.target_variance
    assert f"the cap w = {MAX_GUIDANCE:g}" in fit.note


def test_fit_guidance_gives_up_when_guidance_does_not_spread_the_samples():
    # A network that shrinks (c < 0): more guidance only shrinks more, so w = 1 stays the closest.
    fit = fit_guidance(gain_model(-0.2, 0.5), get_flow("icfm"), training_rows(1.0), "euler", steps=20, n=N)
    assert (fit.guidance, fit.draws) == (1.0, 2)
    assert "does not grow with w" in fit.note


def test_fit_guidance_steps_back_from_a_diverged_draw(monkeypatch):
    import flow_pipeline.core.guidance as guidance

    real_sample = guidance.sample
    tried = []

    def sample_diverging_at_the_first_step(*args, guidance: float = 1.0, **kwargs):
        tried.append(guidance)
        result = real_sample(*args, guidance=guidance, **kwargs)
        if guidance == 1.25:  # the fit's first step out from w = 1 blows up
            result.x = torch.full_like(result.x, float("inf"))
        return result

    monkeypatch.setattr(guidance, "sample", sample_diverging_at_the_first_step)
    c, s2 = 0.2, 0.5
    rows = training_rows(1.0)
    fit = fit_guidance(gain_model(c, s2), get_flow("icfm"), rows, "dopri5", n=N, seed=5, rtol=1e-7, atol=1e-7)
    assert tried[:3] == [1.0, 1.25, 1.125]  # halfway back to w = 1, the last draw below the target
    target = float(rows[:, :K].double().var(0).mean())
    noise_variance = float(initial_noise(N, DIM, seed=5)[:, :K].var(0).mean())
    assert fit.guidance == pytest.approx(math.log(target / (s2 * noise_variance)) / (2 * c), abs=0.03)
    assert fit.guided_variance == pytest.approx(target, rel=0.01)
