"""Recipe knobs: the training-time distribution of t and the linear skip path of the velocity field."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.flows import get_flow
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.time_sampling import sample_times
from flow_pipeline.core.trainer import draw_path


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


def test_linear_skip_adds_a_quadratic_in_t_gain_times_x():
    torch.manual_seed(0)
    net = build_model("mlp", dim=16, size="tiny")
    model = LinearSkip(net, 16)
    x, t = torch.randn(5, 16), torch.rand(5)
    torch.testing.assert_close(model(x, t), net(x, t))  # zero at initialisation
    with torch.no_grad():
        model.skip_coefficients.copy_(torch.randn(3, 16))
    a, b, c = (model.skip_coefficients[i].detach() for i in range(3))
    expected = net(x, t) + (a + b * t[:, None] + c * t[:, None] ** 2) * x
    torch.testing.assert_close(model(x, t), expected)
    assert count_parameters(model) == count_parameters(net) + 48


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
