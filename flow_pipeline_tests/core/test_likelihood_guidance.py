"""Guidance chosen by val likelihood: on rows drawn from the model at a known w, it recovers that w; a model
without a skip path is left as trained."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.flows import ICFM
from flow_pipeline.core.likelihood_guidance import GUIDANCE_GRID, LikelihoodGuidanceFit, fit_likelihood_guidance
from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.sampling import sample


class _Swirl(nn.Module):
    """A strong smooth non-Gaussian residual: rotates pairs of coordinates by an amount that depends on |x|."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        radius = x.pow(2).sum(1, keepdim=True).sqrt()
        turned = torch.stack([-x[:, 1::2], x[:, ::2]], dim=2).reshape_as(x)
        return 1.5 * torch.tanh(radius - 1.0) * turned + 0.8 * torch.sin(2 * x)


def _identity(dim: int) -> Normalizer:
    return Normalizer(torch.zeros(dim), torch.ones(dim))


@pytest.mark.parametrize("true_w", [0.5, 1.25])
def test_rows_drawn_at_a_known_guidance_are_most_likely_at_that_guidance(true_w):
    torch.manual_seed(0)
    dim = 6
    model = LinearSkip(_Swirl(), dim)
    rows = sample(model, ICFM(), n=600, dim=dim, solver="rk4", steps=40, seed=3, guidance=true_w).x
    fit = fit_likelihood_guidance(model, ICFM(), _identity(dim), rows, divergence="exact", steps=16)
    assert fit.guidance == true_w
    assert fit.draws == len(GUIDANCE_GRID) and fit.rows == 600
    scores = dict(zip(fit.grid, fit.val_log_likelihood))
    assert scores[true_w] == max(scores.values())
    assert "highest mean log-likelihood" in fit.note


def test_a_model_without_a_skip_path_is_scored_as_trained():
    fit = fit_likelihood_guidance(_Swirl(), ICFM(), _identity(4), torch.randn(10, 4))
    assert (fit.guidance, fit.draws) == (1.0, 0)
    assert "no linear skip path" in fit.note


def test_a_network_that_only_hurts_gets_w_zero_the_models_own_gaussian():
    class Exploding(nn.Module):
        def forward(self, x, t):
            return x * 0 + 1e30 * (x.abs() > 0).float()

    model = LinearSkip(Exploding(), 3)
    fit = fit_likelihood_guidance(model, ICFM(), _identity(3), torch.randn(20, 3), divergence="exact", steps=2)
    assert fit.guidance == 0.0
    assert all(score < fit.val_log_likelihood[0] - 1e6 for score in fit.val_log_likelihood[1:])


def test_non_finite_scores_are_written_as_strict_json_strings():
    fit = LikelihoodGuidanceFit(0.0, (0.0, 1.0), (-3.5, -math.inf), 5, 2, "note")
    assert json.loads(json.dumps(fit.as_dict()))["val_log_likelihood"] == [-3.5, "-inf"]
