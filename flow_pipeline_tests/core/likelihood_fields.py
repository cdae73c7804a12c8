"""Velocity fields with known log-densities, written independently of flow_pipeline.core.likelihood.

On the path x_t = (1 - t) x_0 + t x_1 with x_0 ~ N(0, I), data x_1 ~ N(mu, Sigma) gives x_t ~ N(t mu, S_t),
S_t = (1 - t)^2 I + t^2 Sigma, and the flow-matching velocity E[x_1 - x_0 | x_t = x] is the regression of
x_1 - x_0 on x_t: mu + Cov(x_1 - x_0, x_t) S_t^-1 (x - t mu) = mu + (t Sigma - (1 - t) I) S_t^-1 (x - t mu).
A mixture's velocity is its components' weighted by their posterior given x_t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def random_spectrum(dim: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """(dim,) float64 eigenvalues log-uniform in [low, high]."""
    u = torch.rand(dim, dtype=torch.float64, generator=generator)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def random_rotation(dim: int, generator: torch.Generator) -> Tensor:
    """(dim, dim) float64 orthogonal matrix."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    return q


def gaussian_velocity(mean: Tensor, eigenvalues: Tensor, eigenvectors: Tensor):
    """v(x (batch, dim), t (batch,)) of data N(mean, U diag(eigenvalues) U^T), in x's dtype."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        tc = t.reshape(-1, 1).to(torch.float64)
        y = (x.double() - tc * mean) @ eigenvectors
        y = y * (tc * eigenvalues - (1 - tc)) / ((1 - tc) ** 2 + tc**2 * eigenvalues)
        return (mean + y @ eigenvectors.T).to(x.dtype)

    return velocity


def diagonal_gaussian_velocity(mean: Tensor, variances: Tensor):
    """v(x, t) of data N(mean, diag(variances)), coordinate by coordinate."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        tc = t.reshape(-1, 1).to(torch.float64)
        gain = (tc * variances - (1 - tc)) / ((1 - tc) ** 2 + tc**2 * variances)
        return (mean + gain * (x.double() - tc * mean)).to(x.dtype)

    return velocity


def gaussian_log_density(x: Tensor, mean: Tensor, covariance: Tensor) -> Tensor:
    """(n,) float64 log N(x; mean, covariance) by Cholesky."""
    lower = torch.linalg.cholesky(covariance)
    u = torch.linalg.solve_triangular(lower, (x.double() - mean).T, upper=False)
    return -0.5 * (u.pow(2).sum(0) + 2 * lower.diagonal().log().sum() + x.shape[1] * math.log(2 * math.pi))


def mixture_velocity(weights: Tensor, means: Tensor, covariances: Tensor):
    """v(x, t) of data sum_k w_k N(means[k], covariances[k]) (K, dim), (K, dim, dim); float64 throughout."""
    dim = means.shape[1]
    eye = torch.eye(dim, dtype=torch.float64)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        tc = t.double().reshape(-1, 1, 1)  # (batch, 1, 1)
        s_t = (1 - tc) ** 2 * eye + tc**2 * covariances[:, None]  # (K, batch, dim, dim)
        centred = x.double()[None] - t.double().reshape(1, -1, 1) * means[:, None]  # (K, batch, dim)
        solved = torch.linalg.solve(s_t, centred.unsqueeze(-1)).squeeze(-1)
        gain = tc * covariances[:, None] - (1 - tc) * eye
        v_k = means[:, None] + (gain @ solved.unsqueeze(-1)).squeeze(-1)
        log_post = weights.log()[:, None] - 0.5 * ((centred * solved).sum(-1) + torch.logdet(s_t))
        return (torch.softmax(log_post, dim=0).unsqueeze(-1) * v_k).sum(0).to(x.dtype)

    return velocity


def mixture_log_density(x: Tensor, weights: Tensor, means: Tensor, covariances: Tensor) -> Tensor:
    """(n,) float64 log sum_k w_k N(x; means[k], covariances[k])."""
    parts = [weights[k].log() + gaussian_log_density(x, means[k], covariances[k]) for k in range(len(weights))]
    return torch.logsumexp(torch.stack(parts), dim=0)
