"""The whitening's shrinkage chosen on val rows, and the skip path keeping that Gaussian outside a principal_dims
network: with fewer training rows than dimensions, held-out rows get a finite density, the whitening's."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.stats import SHRINKAGE_GRID, ledoit_wolf_shrinkage, streaming_scatter
from flow_pipeline.core.flows import ICFM
from flow_pipeline.core.likelihood import model_log_likelihood
from flow_pipeline.core.models import build_model


def _rows(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * np.geomspace(3.0, 0.05, dim)
    return (rng.normal(size=(n, dim)) @ mixing.T + rng.normal(size=dim)).astype(np.float32)


def _val_log_likelihood(train: np.ndarray, val: np.ndarray, a: float) -> float:
    """Written out with scipy: mean log N(val; train mean, (1 - a) S + a mean-eigenvalue I), S unbiased."""
    covariance = np.cov(train.astype(np.float64), rowvar=False)
    shrunk = (1 - a) * covariance + a * np.trace(covariance) / covariance.shape[0] * np.eye(covariance.shape[0])
    return float(scipy.stats.multivariate_normal(train.mean(0), shrunk, allow_singular=False).logpdf(val).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitening_takes_the_intensity_whose_gaussian_scores_val_best(seed):
    data = _rows(70, 24, seed)
    train, val = data[:30], data[30:]
    fitted = Normalizer.fit(train, "whiten", val=val)
    mean = train.mean(0).astype(np.float64)
    scatter, fourth, n = streaming_scatter(train, mean)
    candidates = np.unique(np.append(SHRINKAGE_GRID, ledoit_wolf_shrinkage(scatter, fourth, n)))
    scores = [_val_log_likelihood(train, val, a) if a > 0 else -np.inf for a in candidates]
    assert fitted.details["shrinkage"] == pytest.approx(candidates[int(np.argmax(scores))])
    assert fitted.details["shrinkage_from"] == "val rows' likelihood"
    # Its scales are that Gaussian's: the whitened val rows' log-density is the scipy one above.
    assert _val_log_likelihood(train, val, fitted.details["shrinkage"]) >= _val_log_likelihood(
        train, val, Normalizer.fit(train, "whiten").details["shrinkage"]) - 1e-9


def test_without_val_the_whitening_keeps_ledoit_wolf_and_zscore_ignores_val():
    data = _rows(60, 16, 3)
    plain = Normalizer.fit(data[:40], "whiten")
    scatter, fourth, n = streaming_scatter(data[:40], data[:40].mean(0).astype(np.float64))
    assert plain.details["shrinkage"] == pytest.approx(ledoit_wolf_shrinkage(scatter, fourth, n))
    assert plain.details["shrinkage_from"] == "Ledoit-Wolf"
    z_with, z_without = Normalizer.fit(data[:40], "zscore", val=data[40:]), Normalizer.fit(data[:40], "zscore")
    assert torch.equal(z_with.std, z_without.std)


def test_bad_val_rows_are_named():
    data = _rows(40, 8, 4)
    with pytest.raises(DataError, match="val rows: need finite rows of 8 columns"):
        Normalizer.fit(data, "whiten", val=data[:, :5])
    broken = data[:5].copy()
    broken[2, 3] = np.nan
    with pytest.raises(DataError, match="NaN or inf"):
        Normalizer.fit(data, "whiten", val=broken)


def test_skip_variances_outside_the_network_stay_one_and_held_out_rows_keep_a_finite_density():
    """Fewer training rows than dimensions: the training rows have no variance in most whitened directions. With
    rest_variance 'learned' the skip path takes that 0 (floored at e^-12) and a held-out row costs thousands of nats;
    with 'whitening' the model outside its network is the whitening's Gaussian, N(0, 1) per whitened coordinate."""
    dim, k = 32, 4
    data = _rows(60, dim, 5)
    train, held_out = data[:12], data[12:20]
    normalizer = Normalizer.fit(train, "whiten", val=data[20:])
    train_z = normalizer.normalize(torch.from_numpy(train))
    log_densities = {}
    for rest in ("whitening", "learned"):
        torch.manual_seed(0)
        model = build_model("mlp", dim, "tiny", linear_skip=True, principal_dims=k, rest_variance=rest)
        model.start_at(train_z.var(dim=0))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(20):  # training pulls a learned variance towards the training rows' (0 off their span)
            x_0, t = torch.randn_like(train_z), torch.rand(train_z.shape[0])
            x_t = (1 - t[:, None]) * x_0 + t[:, None] * train_z
            optimizer.zero_grad()
            ((model(x_t, t) - (train_z - x_0)) ** 2).mean().backward()
            optimizer.step()
        variances = model.variances().detach()
        if rest == "whitening":
            assert torch.equal(variances[k:], torch.ones(dim - k))
            assert not torch.allclose(variances[:k], torch.ones(k))
        log_densities[rest] = model_log_likelihood(model, ICFM(), normalizer, torch.from_numpy(held_out),
                                                   divergence="exact", steps=4).log_prob
    # The closed-form part, written out: sum over the other coordinates of log N(z_i; 0, 1), plus the Jacobian.
    z_rest = normalizer.normalize(torch.from_numpy(held_out)).double()[:, k:]
    rest_part = torch.distributions.Normal(0.0, 1.0).log_prob(z_rest).sum(1)
    assert bool(torch.isfinite(log_densities["whitening"]).all())
    assert bool((log_densities["learned"] < log_densities["whitening"] - 1000).all())
    network_part = log_densities["whitening"] - rest_part - normalizer.log_abs_det_jacobian()
    assert bool((network_part.abs() < 50).all())  # k = 4 coordinates: a few nats each, not the rest's thousands
