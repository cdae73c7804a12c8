"""Nearest-neighbour distances between generated and real embeddings, precision/recall/density/coverage
(Naeem et al. 2020), and the norm / nearest-neighbour cosine diagnostics.

All inputs are numpy arrays (n, dim), converted to float64. Distances are Euclidean, computed in row chunks with
``torch.cdist`` so that memory stays at (chunk, m) whatever n is. The whole set of sample metrics, and why they are
chosen, is :func:`flow_pipeline.core.metrics.real_side.evaluate_samples`.
"""

from __future__ import annotations

import numpy as np
import torch

from flow_pipeline.core.metrics.distances import _as_float64

# Rows of the left operand per distance chunk: the (chunk, m) float64 block is 80 MB for m = 10k reference rows.
_CHUNK = 1024


def _torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))


def _distance_chunks(a: np.ndarray, b: np.ndarray):
    """Yield (row_slice, distances (chunk, n_b)) of Euclidean distances from row chunks of a (n_a, dim) to b."""
    ta, tb = _torch(a), _torch(b)
    for start in range(0, ta.shape[0], _CHUNK):
        rows = slice(start, min(start + _CHUNK, ta.shape[0]))
        yield rows, torch.cdist(ta[rows], tb)


def kth_neighbour_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of x (n, dim) to its k-th nearest other row, excluding itself: (n,).

    The self-distance is the smallest entry of each row, so this is the (k+1)-th smallest distance (as in the
    reference PRDC code); exact duplicates of a row count as neighbours at distance 0.
    """
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be in [1, n-1] = [1, {x.shape[0] - 1}], got {k}")
    radii = np.empty(x.shape[0])
    for rows, dist in _distance_chunks(x, x):
        radii[rows] = torch.topk(dist, k + 1, dim=1, largest=False).values[:, -1].numpy()
    return radii


def nearest_distance(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distance from each row of x (n, dim) to its nearest row of reference (m, dim): (n,)."""
    out = np.empty(x.shape[0])
    for rows, dist in _distance_chunks(x, reference):
        out[rows] = dist.min(dim=1).values.numpy()
    return out


# --------------------------------------------------------------------------------------------- PRDC


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of fake (M, dim) against real (N, dim), Naeem et al. 2020.

    With r_i the distance from real_i to its k-th nearest other real point, s_j the same for fake_j within fake,
    and B(c, r) the open ball {x : ||x - c|| < r}:

    * precision = (1/M) sum_j 1[exists i: fake_j in B(real_i, r_i)]
    * recall    = (1/N) sum_i 1[exists j: real_i in B(fake_j, s_j)]
    * density   = (1/(kM)) sum_j sum_i 1[fake_j in B(real_i, r_i)]   (can exceed 1)
    * coverage  = (1/N) sum_i 1[exists j: fake_j in B(real_i, r_i)]
    """
    real, fake = _as_float64(real), _as_float64(fake)
    real_radii = kth_neighbour_distance(real, k)
    fake_radii = torch.from_numpy(kth_neighbour_distance(fake, k))
    fake_in_some_real_ball = torch.zeros(fake.shape[0], dtype=torch.bool)
    fake_ball_count = torch.zeros(fake.shape[0], dtype=torch.float64)
    real_in_some_fake_ball = np.empty(real.shape[0], dtype=bool)
    real_ball_has_fake = np.empty(real.shape[0], dtype=bool)
    for rows, dist in _distance_chunks(real, fake):  # dist: (chunk of real, M)
        inside_real_ball = dist < torch.from_numpy(real_radii[rows])[:, None]
        fake_in_some_real_ball |= inside_real_ball.any(dim=0)
        fake_ball_count += inside_real_ball.sum(dim=0)
        real_ball_has_fake[rows] = inside_real_ball.any(dim=1).numpy()
        real_in_some_fake_ball[rows] = (dist < fake_radii[None, :]).any(dim=1).numpy()
    return {
        "precision": float(fake_in_some_real_ball.double().mean()),
        "recall": float(real_in_some_fake_ball.mean()),
        "density": float(fake_ball_count.mean()) / k,
        "coverage": float(real_ball_has_fake.mean()),
    }


# --------------------------------------------------------------------------------------------- diagnostics


def norm_stats(x: np.ndarray) -> dict[str, float]:
    """Mean and (population) standard deviation of the L2 norms of the rows of x (n, dim)."""
    norms = np.linalg.norm(_as_float64(x), axis=1)
    return {"mean": float(norms.mean()), "std": float(norms.std())}


def _unit_rows(x: np.ndarray) -> torch.Tensor:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return _torch(x / np.maximum(norms, 1e-12))  # zero rows stay zero (cosine 0) instead of NaN


def nn_cosine(generated: np.ndarray, test: np.ndarray) -> float:
    """Mean over generated rows (n, dim) of the largest cosine similarity to any test row (m, dim)."""
    g, t = _unit_rows(_as_float64(generated)), _unit_rows(_as_float64(test))
    best = torch.cat([(g[s : s + _CHUNK] @ t.T).max(dim=1).values for s in range(0, g.shape[0], _CHUNK)])
    return float(best.mean())
