"""Guidance of a skip-path model, set by the data's variance.

A :class:`~flow_pipeline.core.models.skip.LinearSkip` model is the exact velocity of a Gaussian fit plus a
network's residual. Fitted short of convergence, that residual is shrunk towards zero, and so are the samples:
on the quickstart's model the network's 64 coordinates sample at 0.77 of the training rows' variance (RESULTS.md,
section 6), which the ranking KID punishes more than the Gaussian fit's missing structure. Scaling the network's
part by w > 1 (``model(x, t, guidance=w)``) extrapolates from the Gaussian the model starts as through the trained
model, the way guidance extrapolates from a weaker model to a stronger one.

:func:`fit_guidance` picks the w >= 1 at which the samples' variance over the network's coordinates (the model's
normalised space, averaged over those coordinates) equals that of given rows: the evaluation passes held-out val
rows (the leading principal directions of a small training set overstate its variance along them), never the
test rows that score the samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flow_pipeline.core.models.skip import LinearSkip
from flow_pipeline.core.models.subspace import PrincipalSubspace
from flow_pipeline.core.sampling import sample

MAX_GUIDANCE = 3.0
# Samples per draw: the variance averaged over k = 64 coordinates of 1,024 samples has a relative standard error
# near 0.6%, well inside the tolerance below.
FIT_SAMPLES = 1024
FIT_TOLERANCE = 0.01  # stop when the samples' variance is within 1% of the rows'
MAX_DRAWS = 8


@dataclass(frozen=True)
class GuidanceFit:
    """guidance: the chosen w (1 when the model is not under-dispersed or has no skip path).
    target_variance: the target rows' mean variance over the network's coordinates (normalised space).
    unguided_variance / guided_variance: the samples' at w = 1 and at the chosen w (None without a skip path: no
    draw, and no NaN in the evaluation's JSON).
    coordinates: how many coordinates the network moves (the variance is averaged over them).
    draws: sample sets drawn. note: why w is what it is, in words."""

    guidance: float
    target_variance: float
    unguided_variance: float | None
    guided_variance: float | None
    coordinates: int
    draws: int
    note: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def network_coordinates(model: nn.Module, dim: int) -> int:
    """How many leading coordinates the model's network moves: k of a PrincipalSubspace, else all ``dim``."""
    net = model.net if isinstance(model, LinearSkip) else model
    return net.k if isinstance(net, PrincipalSubspace) else dim


def fit_guidance(model: nn.Module, flow, normalized_rows: Tensor, solver: str, steps: int = 0, seed: int = 1,
                 n: int = FIT_SAMPLES, rtol: float = 1e-5, atol: float = 1e-5) -> GuidanceFit:
    """The w in [1, MAX_GUIDANCE] whose samples match the rows' variance over the network's coordinates.

    normalized_rows: (rows, dim) data rows (held-out ones, or the run's training rows) in the model's normalised
    space. The draws use the sampler that will be scored (``solver``, ``steps``, ``rtol``, ``atol``: a coarser one
    misjudges the variance by a few percent) and all start from the same noise (``seed``), so the variance is a
    smooth function of w: secant steps from w = 1 reach the target in a few draws. A model without a skip path gets
    w = 1 (nothing to guide), and so does one whose samples are not under-dispersed (guidance only undoes
    shrinkage); otherwise the w whose variance came closest, with ``note`` saying why when the tolerance was not
    reached (the cap, or a variance that does not grow with w)."""
    dim = normalized_rows.shape[1]
    k = network_coordinates(model, dim)
    target = float(normalized_rows[:, :k].double().var(dim=0).mean())
    if not isinstance(model, LinearSkip):
        return GuidanceFit(1.0, target, None, None, k, 0, "no linear skip path: the model is sampled as trained")
    device = next(model.parameters()).device

    def variance(w: float) -> float:
        x = sample(model, flow, n=n, dim=dim, solver=solver, steps=steps, seed=seed, device=device, rtol=rtol,
                   atol=atol, guidance=w).x
        value = float(x[:, :k].var(dim=0).mean())
        return value if math.isfinite(value) else math.inf  # diverged: far too dispersed

    tried = [(1.0, variance(1.0))]
    if tried[0][1] >= target:
        return GuidanceFit(1.0, target, tried[0][1], tried[0][1], k, 1, "samples not under-dispersed: w = 1")
    w, stalled = 1.25, False
    while len(tried) < MAX_DRAWS:
        tried.append((w, variance(w)))
        w_b, v_b = tried[-1]
        w_a, v_a = [wv for wv in tried[:-1] if math.isfinite(wv[1])][-1]  # the draw at w = 1 always is
        if abs(v_b - target) <= FIT_TOLERANCE * target:
            break
        if not math.isfinite(v_b):  # diverged: halfway back to the largest w still below the target
            w_next = (max(seen for seen, v in tried if v < target) + w_b) / 2
        elif v_b <= v_a:  # more guidance does not spread the samples: nothing to gain
            stalled = True
            break
        else:  # a secant step
            w_next = w_b + (target - v_b) * (w_b - w_a) / (v_b - v_a)
        w = min(MAX_GUIDANCE, max(1.0, w_next))
        if any(abs(w - seen) < 1e-4 for seen, _ in tried):  # at the cap (or the floor) again
            break
    best_w, best_v = min(tried, key=lambda wv: abs(wv[1] - target))
    if abs(best_v - target) <= FIT_TOLERANCE * target:
        note = f"variance over the network's {k} coordinates matched to the rows' (within 1%)"
    else:
        why = "the variance does not grow with w" if stalled else f"the cap w = {MAX_GUIDANCE:g} or {MAX_DRAWS} draws"
        note = f"closest variance {best_v:.3f} for a target of {target:.3f} after {len(tried)} draws ({why})"
    return GuidanceFit(round(best_w, 4), target, tried[0][1], best_v, k, len(tried), note)
