"""Training-time distributions of the flow time t in (0, 1).

``uniform``: t ~ U(0, 1), the plain flow-matching objective. ``logit_normal``: t = sigmoid(m + s * eps) with
eps ~ N(0, 1) (Esser et al. 2024, "Scaling rectified flow transformers"): more training signal in the middle of the
path, where the velocity is hardest to predict, less at the ends, where it is nearly the data mean or nearly linear.
"""

from __future__ import annotations

import torch
from torch import Tensor

TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_times(n: int, how: str, generator: torch.Generator | None, device: torch.device | str = "cpu",
                 logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """(n,) float32 times drawn by ``how`` (one of :data:`TIME_SAMPLINGS`) from ``generator`` on ``device``."""
    if how == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if how == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        # The normal by the inverse CDF of a uniform draw: with randn here the SIGKILL resume test
        # (test_recovery.py) found a resumed run no longer bit-identical to an uninterrupted one (the cause inside
        # randn was not found); with the uniform draw it is.
        normal = torch.special.ndtri(torch.rand(n, generator=generator, device=device))
        return torch.sigmoid(logit_mean + logit_std * normal)
    raise ValueError(f"unknown time sampling {how!r}; valid: {', '.join(TIME_SAMPLINGS)}")
