"""A model whose ODE cannot score some test row ranks last instead of failing the evaluation."""

from __future__ import annotations

import math

import numpy as np
import torch

from flow_pipeline.core.data.synthetic import sonar_mixture
from flow_pipeline.core.likelihood import LogLikelihood
from flow_pipeline.evaluation import likelihood as likelihood_module


def test_a_row_without_density_makes_the_model_worst_not_an_error(monkeypatch):
    truth = sonar_mixture(dim=16, seed=2)
    rng = np.random.default_rng(4)
    train, val, rows = (truth.sample(n, rng)[0].astype(np.float64) for n in (400, 200, 50))
    log_prob = torch.from_numpy(truth.log_prob(rows))
    log_prob[7] = math.nan  # one diverged trajectory
    scored = LogLikelihood(log_prob=log_prob, std_error=torch.zeros(50), integrated_log_prob=log_prob,
                           closed_form_log_prob=torch.zeros(50), log_abs_det_jacobian=0.0, dim=16,
                           integrated_dims=16, divergence="exact", probes=0, solver="rk4", steps=8, nfe=32,
                           seconds=0.0)
    monkeypatch.setattr(likelihood_module, "_model_log_prob", lambda *args: scored)
    result = likelihood_module.evaluate_likelihood(object(), rows, train, truth, val=val)
    metrics = result.metrics()
    assert metrics["test_nll"] == math.inf
    assert metrics["loglik_vs_gaussian_full"] == -math.inf and metrics["loglik_vs_gaussian_full_verdict"] == "worse"
    assert metrics["kl_to_truth"] == math.inf and metrics["kl_closed_fraction"] == -math.inf
    # The baselines are scored as usual on the same rows.
    assert math.isfinite(result.reference_nll["gaussian-full"]) and result.reference_metrics("truth")["kl_to_truth"] == 0
