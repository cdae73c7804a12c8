"""Recipe knobs: the training-time distribution of t and the linear skip path of the velocity field."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.flows import draw_path, get_flow
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.models.skip import LinearSkip, gaussian_velocity_gain
from flow_pipeline.core.time_sampling import sample_times


def test_uniform_times_are_uniform():
    t = sample_times(20_000, "uniform", torch.Generator().manual_seed(0)).numpy()
    assert scipy.stats.kstest(t, "uniform").pvalue > 1e-3


def test_logit_normal_times_have_normal_logits():
    t = sample_times(20_000, "logit_normal", torch.Generator().manual_seed(0), logit_mean=0.5, logit_std=0.8)
    t = t.double().numpy()
    assert ((t > 0) & (t < 1)).all()
    logits = np.log(t / (1 - t))
    assert scipy.stats.kstest(logits, scipy.stats.norm(0.5, 0.8).cdf).pvalue > 1e-3
    with pytest.raises(ValueError, match="time sampling"):
        sample_times(3, "beta", None)


def test_draw_path_uses_the_time_sampling():
    x_1 = torch.zeros(20_000, 2)
    t = draw_path(get_flow("icfm"), x_1, torch.Generator().manual_seed(1), "logit_normal").t.double().numpy()
    # logit-normal(0, 1) puts ~0.38 of its mass in the middle fifth of [0, 1], uniform 0.2
    middle = np.mean((t > 0.4) & (t < 0.6))
    expected = scipy.stats.norm.cdf(np.log(1.5)) - scipy.stats.norm.cdf(-np.log(1.5))
    assert middle == pytest.approx(expected, abs=0.02)


def test_linear_skip_adds_the_diagonal_gaussian_velocity():
    torch.manual_seed(0)
    net = build_model("mlp", dim=16, size="tiny")
    model = LinearSkip(net, 16)
    x, t = torch.randn(5, 16), torch.rand(5)
    with torch.no_grad():
        model.log_var.copy_(torch.randn(16))
    var = model.log_var.detach().exp()
    tc = t[:, None]
    expected = net(x, t) + (tc * var - (1 - tc)) / ((1 - tc) ** 2 + tc**2 * var) * x
    torch.testing.assert_close(model(x, t), expected)
    assert count_parameters(model) == count_parameters(net) + 16


def test_gaussian_gain_is_the_flow_matching_regression_for_gaussian_data():
    """E[x_1 - x_0 | x_t] estimated by least squares on samples equals g(t) x_t for x_1 ~ N(0, s^2)."""
    gen = torch.Generator().manual_seed(0)
    for s2, t in ((0.25, 0.3), (4.0, 0.8), (1e-3, 0.95)):
        x0 = torch.randn(200_000, generator=gen, dtype=torch.float64)
        x1 = torch.randn(200_000, generator=gen, dtype=torch.float64) * s2**0.5
        xt = (1 - t) * x0 + t * x1
        slope = float((xt * (x1 - x0)).sum() / (xt * xt).sum())
        gain = float(gaussian_velocity_gain(torch.tensor([[t]], dtype=torch.float64),
                                            torch.tensor([s2], dtype=torch.float64)))
        assert gain == pytest.approx(slope, rel=0.02, abs=0.02)


def test_config_builds_the_skip_path_and_rejects_unknown_sampling():
    config = TrainConfig(dim=16, model_size="tiny", linear_skip=True, time_sampling="logit_normal")
    assert isinstance(build_model(config.arch, config.dim, config.model_size, config.linear_skip), LinearSkip)
    with pytest.raises(ValueError, match="time_sampling"):
        TrainConfig(time_sampling="beta")


def test_run_name_carries_non_default_skip_and_time_sampling():
    base = TrainConfig()
    flipped = TrainConfig(linear_skip=not base.linear_skip,
                          time_sampling="uniform" if base.time_sampling == "logit_normal" else "logit_normal")
    assert flipped.run_name.startswith(base.run_name)
    assert ("-skip" if flipped.linear_skip else "-noskip") in flipped.run_name
    assert f"-t{flipped.time_sampling.replace('_', '')}" in flipped.run_name
