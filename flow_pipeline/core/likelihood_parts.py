"""Where a model's held-out log-likelihood is won and lost against ``gaussian-full``: the network's coordinates
and the rest.

A LinearSkip model around a PrincipalSubspace network is, in its normalised space z, a product density
p(z) = p_net(z_1..k) N(z_k+1..dim; 0, diag s^2): the first k coordinates follow the network, the others the skip
path's Gaussian alone (:mod:`flow_pipeline.core.likelihood` returns the two factors). The Gaussian baseline q,
mapped into the same z (an affine map of a Gaussian is Gaussian), does not factorise, so the chain rule splits it
in the same order: q(z) = q(z_1..k) q(z_k+1..dim | z_1..k). The per-row difference then splits exactly as

    log p(x) - log q(x) = [log p_net(z_1..k) - log q(z_1..k)]              (network coordinates)
                        + [log N(z_k+1..; 0, s^2) - log q(z_k+1.. | z_1..k)] (the rest)

(the normalisation's Jacobian is common to both sides and cancels). A third, model-internal view:
log p_net(z_1..k) - log N(z_1..k; 0, diag s_1..k^2), what the network adds over the model's own Gaussian part there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from torch import Tensor

from flow_pipeline.core.baselines import GaussianBaseline
from flow_pipeline.core.likelihood import LogLikelihood


@dataclass(frozen=True)
class SubspaceParts:
    """Per-row (n,) float64 nats; ``network_coordinates + other_coordinates`` is log p_model - log p_baseline.

    k: the network's coordinates. network_over_own_gaussian: log p_net(z_1..k) - log N(z_1..k; 0, diag s^2) (None
    when the skip variances were not given)."""

    k: int
    network_coordinates: np.ndarray
    other_coordinates: np.ndarray
    network_over_own_gaussian: np.ndarray | None


def _affine_map(normalizer) -> tuple[np.ndarray, np.ndarray]:
    """(mean (dim,), A (dim, dim)) float64 with normalize(x) = (x - mean) @ A."""
    scale = 1.0 / normalizer.std.double().numpy()
    if normalizer.components is None:
        return normalizer.mean.double().numpy(), np.diag(scale)
    return normalizer.mean.double().numpy(), normalizer.components.double().numpy() * scale[None, :]


def _gaussian_log_prob(z: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """log N(z; mean, covariance) (n,) for z (n, m), by Cholesky."""
    lower = np.linalg.cholesky(covariance)
    u = scipy.linalg.solve_triangular(lower, (z - mean).T, lower=True)
    log_det = 2 * np.log(np.diag(lower)).sum()
    return -0.5 * (np.einsum("ij,ij->j", u, u) + log_det + z.shape[1] * math.log(2 * math.pi))


def subspace_parts(model: LogLikelihood, x_raw, normalizer, baseline: GaussianBaseline,
                   skip_variances: Tensor | None = None) -> SubspaceParts:
    """Split log p_model - log p_baseline on raw rows x_raw (n, dim) into the network's coordinates and the rest
    (module docstring). ``model``: the result of :func:`~flow_pipeline.core.likelihood.model_log_likelihood` on
    these rows (its ``integrated_dims`` first coordinates are the network's); ``normalizer``: the model's;
    ``baseline``: a fitted Gaussian (raw space); ``skip_variances``: the model's ``variances()`` (dim,), for the
    network's gain over its own Gaussian part."""
    x = np.asarray(x_raw, dtype=np.float64)
    k = model.integrated_dims
    if x.shape != (model.log_prob.shape[0], model.dim):
        raise ValueError(f"x_raw must be the ({model.log_prob.shape[0]}, {model.dim}) rows the model scored, "
                         f"got {x.shape}")
    mean, a = _affine_map(normalizer)
    z_k = (x - mean) @ a[:, :k]
    factor = np.diag(baseline.factor) if baseline.factor.ndim == 1 else baseline.factor
    root_k = factor.T @ a[:, :k]  # covariance of z_1..k under the baseline: root_k^T root_k
    marginal = _gaussian_log_prob(z_k, (baseline.mean - mean) @ a[:, :k], root_k.T @ root_k)
    joint_z = baseline.log_prob(x) - normalizer.log_abs_det_jacobian()
    integrated = model.integrated_log_prob.double().numpy()
    own = None
    if skip_variances is not None:
        variances = skip_variances.detach().double().numpy()[:k]
        own = integrated - _gaussian_log_prob(z_k, np.zeros(k), np.diag(variances))
    return SubspaceParts(k=k, network_coordinates=integrated - marginal,
                         other_coordinates=model.closed_form_log_prob.double().numpy() - (joint_z - marginal),
                         network_over_own_gaussian=own)
