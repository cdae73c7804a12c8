"""Recipe knobs: the training-time distribution of t, the linear skip path of the velocity field, and the network
on the top principal directions only."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from flow_pipeline.config import TrainConfig
from flow_pipeline.core.flows import draw_path, get_flow
from flow_pipeline.core.models import build_model, count_parameters
from flow_pipeline.core.models.skip import LinearSkip, gaussian_velocity_gain
from flow_pipeline.core.models.subspace import PrincipalSubspace
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


def test_principal_dims_network_sees_and_moves_only_the_top_coordinates():
    """With principal_dims k the velocity is net_k(x[:, :k], t) on the first k coordinates and the Gaussian skip gain
    alone on the others, whatever the other coordinates hold."""
    torch.manual_seed(0)
    model = build_model("mlp", dim=16, size="tiny", linear_skip=True, principal_dims=5)
    net = model.net.net  # LinearSkip(PrincipalSubspace(ResidualMLP on 5 coordinates))
    with torch.no_grad():
        model.log_var.copy_(torch.randn(16))
    x, t = torch.randn(7, 16), torch.rand(7)
    tc, var = t[:, None], model.log_var.detach().exp()
    gain = (tc * var - (1 - tc)) / ((1 - tc) ** 2 + tc**2 * var)
    expected = gain * x
    expected[:, :5] += net(x[:, :5], t)
    torch.testing.assert_close(model(x, t), expected)
    changed = x.clone()
    changed[:, 5:] = torch.randn(7, 11)  # the network's part of the first 5 coordinates ignores the others
    torch.testing.assert_close((model(changed, t) - gain * changed)[:, :5], (model(x, t) - gain * x)[:, :5])
    assert count_parameters(model) < count_parameters(build_model("mlp", dim=16, size="tiny", linear_skip=True))
    with pytest.raises(ValueError, match="principal_dims"):
        PrincipalSubspace(net, 16, 17)


def test_config_requires_whitening_and_skip_for_principal_dims():
    good = TrainConfig(normalization="whiten", linear_skip=True, principal_dims=64)
    assert good.run_name.endswith("-pd64")
    for bad in ({"normalization": "zscore", "linear_skip": True}, {"normalization": "whiten", "linear_skip": False}):
        with pytest.raises(ValueError, match="principal_dims: needs normalization 'whiten'"):
            TrainConfig(principal_dims=64, **bad)
    with pytest.raises(ValueError, match="principal_dims: 2000 > dim 1024"):
        TrainConfig(normalization="whiten", linear_skip=True, principal_dims=2000)
    with pytest.raises(ValueError, match="principal_dims"):
        TrainConfig(principal_dims=-1)


def test_trainer_and_evaluation_build_the_principal_subspace_model(tmp_path, one_torch_thread):
    from dataclasses import replace

    from flow_pipeline.core.data.normalization import Normalizer
    from flow_pipeline.core.trainer import train
    from flow_pipeline.core.checkpoint import load_ema_model
    from flow_pipeline.evaluation.evaluate import saved_train_config
    from flow_pipeline_tests.core.mixture_data import mixture_train_data

    data = mixture_train_data(128, 32, 32, seed=3)
    data = replace(data, normalizer=Normalizer.fit(data.train.numpy(), "whiten"))
    config = TrainConfig(model_size="tiny", dim=32, batch_size=32, max_epochs=1, warmup_steps=1, device="cpu",
                         normalization="whiten", linear_skip=True, principal_dims=6)
    result = train(config, data, tmp_path / config.run_name)
    loaded = load_ema_model(result.checkpoint_path, saved_train_config)
    assert isinstance(loaded.model.net, PrincipalSubspace) and loaded.model.net.k == 6
    assert loaded.config.principal_dims == 6


@pytest.mark.parametrize("rows", [95, 128])
def test_the_trainer_sizes_the_unset_network_from_its_training_rows(tmp_path, one_torch_thread, rows):
    """Unset principal dims and prototypes: one per 12 and one per 30 training rows the trainer has (the knobs'
    descriptions), stored with the rows in the checkpoint; a config set up for other rows is refused before anything is written."""
    from dataclasses import replace

    from flow_pipeline.core.checkpoint import load_ema_model
    from flow_pipeline.core.data.normalization import Normalizer
    from flow_pipeline.core.trainer import train
    from flow_pipeline.evaluation.evaluate import saved_train_config
    from flow_pipeline_tests.core.mixture_data import mixture_train_data

    data = mixture_train_data(rows, 32, 32, seed=3)
    data = replace(data, normalizer=Normalizer.fit(data.train.numpy(), "whiten"))
    config = TrainConfig(model_size="tiny", dim=32, batch_size=32, max_epochs=1, warmup_steps=1, device="cpu")
    result = train(config, data, tmp_path / config.run_name)
    loaded = load_ema_model(result.checkpoint_path, saved_train_config)
    assert (loaded.config.train_rows, loaded.config.principal_dims, loaded.config.prototypes) == (
        rows, rows // 12, rows // 30)
    assert loaded.model.net.k == rows // 12
    assert loaded.model.net.features.n == rows // 30
    assert TrainConfig(**loaded.config.model_dump()).run_name == config.run_name  # the stored copy keeps its name
    other = TrainConfig(**{**config.model_dump(), "train_rows": rows + 1})
    with pytest.raises(ValueError, match=f"train_rows: the config was set up for {rows + 1} training rows, the "
                                         f"data has {rows}"):
        train(other, data, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_linear_skip_starts_at_the_variances_of_the_normalised_training_rows(tmp_path, one_torch_thread):
    """The skip path starts as the diagonal Gaussian fit of the normalised rows, so a direction with little variance
    (here: z-scoring floors a near-constant column's std) is not left at variance 1 for Adam to crawl from."""
    from dataclasses import replace

    from flow_pipeline.core.checkpoint import load_checkpoint
    from flow_pipeline.core.data.normalization import Normalizer
    from flow_pipeline.core.sampling import sample
    from flow_pipeline.core.trainer import train
    from flow_pipeline_tests.core.mixture_data import mixture_train_data

    data = mixture_train_data(512, 32, 32, seed=4)
    train_rows = data.train.clone()
    train_rows[:, 7] = train_rows[:, 7] * 1e-3 + 0.5  # std far below the floor: normalised variance ~1e-4
    data = replace(data, train=train_rows, normalizer=Normalizer.fit(train_rows.numpy(), "zscore"))
    expected_var = data.normalizer.normalize(train_rows).var(dim=0)
    assert expected_var[7] < 1e-3 and expected_var.max() > 0.9
    config = TrainConfig(model_size="tiny", dim=32, batch_size=32, max_steps=2, warmup_steps=1, lr=1e-8,
                         device="cpu", normalization="zscore", linear_skip=True)
    result = train(config, data, tmp_path / config.run_name)
    log_var = load_checkpoint(result.checkpoint_path)["model_state_dict"]["log_var"]
    torch.testing.assert_close(log_var, expected_var.log(), atol=1e-4, rtol=0)

    model = build_model("mlp", dim=32, size="tiny", linear_skip=True)
    model.load_state_dict(load_checkpoint(result.checkpoint_path)["model_state_dict"])
    for p in model.net.parameters():
        p.data.zero_()  # the skip path alone: x(1) = s * x(0) per coordinate
    drawn = sample(model, get_flow("icfm"), n=4000, dim=32, solver="dopri5", seed=0).x
    ratio = drawn.var(dim=0) / expected_var
    assert (ratio - 1).abs().max() < 0.1, ratio
    with pytest.raises(ValueError, match=r"variance has shape \(31,\), expected \(32,\)"):
        model.start_at(expected_var[:31])
