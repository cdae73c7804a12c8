"""The split of model - gaussian-full into the network's coordinates and the rest: exact by construction, and zero
in both parts for a model whose factors are the baseline's own marginal and conditional (computed here with scipy)."""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch
from torch import nn

from flow_pipeline.core.baselines import fit_baseline
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.synthetic import synthetic_sonar_mixture
from flow_pipeline.core.flows import ICFM
from flow_pipeline.core.likelihood import LogLikelihood, model_log_likelihood
from flow_pipeline.core.likelihood_parts import subspace_parts
from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.models.subspace import PrincipalSubspace

DIM, K = 16, 5


def _setup():
    train = synthetic_sonar_mixture(600, dim=DIM, seed=0)
    x = synthetic_sonar_mixture(40, dim=DIM, seed=1)
    return Normalizer.fit(train, "whiten"), fit_baseline("gaussian-full", train), x


def _whitened(normalizer: Normalizer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z (n, dim), A (dim, dim)) float64 with z = (x - mean) A, the whitening map written out."""
    a = normalizer.components.double().numpy() / normalizer.std.double().numpy()
    return (x.astype(np.float64) - normalizer.mean.double().numpy()) @ a, a


def _result(integrated: np.ndarray, closed: np.ndarray) -> LogLikelihood:
    n = len(integrated)
    return LogLikelihood(log_prob=torch.from_numpy(integrated + closed), std_error=torch.zeros(n, dtype=torch.float64),
                         integrated_log_prob=torch.from_numpy(integrated), closed_form_log_prob=torch.from_numpy(closed),
                         log_abs_det_jacobian=0.0, dim=DIM, integrated_dims=K, divergence="exact", probes=0,
                         solver="rk4", steps=1, nfe=4, seconds=0.0)


def test_a_model_made_of_the_baselines_marginal_and_conditional_differs_by_zero_in_both_parts():
    normalizer, baseline, x = _setup()
    z, a = _whitened(normalizer, x)
    mean_z = (baseline.mean - normalizer.mean.double().numpy()) @ a
    cov_z = a.T @ baseline.factor @ baseline.factor.T @ a
    joint = scipy.stats.multivariate_normal(mean_z, cov_z).logpdf(z)
    marginal = scipy.stats.multivariate_normal(mean_z[:K], cov_z[:K, :K]).logpdf(z[:, :K])
    parts = subspace_parts(_result(marginal, joint - marginal), x, normalizer, baseline)
    assert parts.k == K and parts.network_over_own_gaussian is None
    np.testing.assert_allclose(parts.network_coordinates, 0.0, atol=1e-6)
    np.testing.assert_allclose(parts.other_coordinates, 0.0, atol=1e-4)


def test_parts_of_a_real_model_add_up_to_its_paired_difference():
    normalizer, baseline, x = _setup()
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(K, 16), nn.Tanh(), nn.Linear(16, K))
    model = LinearSkip(PrincipalSubspace(_IgnoresTime(net), DIM, K), DIM)
    model.start_at(torch.linspace(0.5, 1.5, DIM))
    result = model_log_likelihood(model, ICFM(), normalizer, torch.from_numpy(x), divergence="exact")
    parts = subspace_parts(result, x, normalizer, baseline, skip_variances=model.variances())
    total = result.log_prob.numpy() - baseline.log_prob(x)
    np.testing.assert_allclose(parts.network_coordinates + parts.other_coordinates, total, rtol=1e-7, atol=1e-3)
    z, _ = _whitened(normalizer, x)
    own = scipy.stats.multivariate_normal(np.zeros(K), np.diag(np.linspace(0.5, 1.5, DIM)[:K])).logpdf(z[:, :K])
    np.testing.assert_allclose(parts.network_over_own_gaussian, result.integrated_log_prob.numpy() - own, atol=1e-4)


class _IgnoresTime(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x)
