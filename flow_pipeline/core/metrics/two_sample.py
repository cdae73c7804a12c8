"""The two-sample tests every sample set gets beside :class:`~flow_pipeline.core.metrics.real_side.RealSide`'s
distances: a classifier two-sample test (:mod:`~flow_pipeline.core.metrics.c2st`) and KID with a characteristic
kernel (:mod:`~flow_pipeline.core.metrics.rbf_kid`), both against the same held-out rows, and the note that says
whether precision/recall/density/coverage may be judged at this n (:mod:`~flow_pipeline.core.metrics.verdicts`).

The cubic-kernel KID compares only the first three moment tensors, so a Gaussian with the data's mean and covariance
ties it by construction; the classifier and the RBF kernel see every difference a finite sample can show.
"""

from __future__ import annotations

import numpy as np

from flow_pipeline.core.metrics.c2st import c2st
from flow_pipeline.core.metrics.distances import TrainSpace
from flow_pipeline.core.metrics.rbf_kid import rbf_kid
from flow_pipeline.core.metrics.verdicts import prdc_note


def two_sample_scores(generated: np.ndarray, real: np.ndarray, space: TrainSpace, seed: int) -> dict:
    """C2ST accuracy (with its interval and p-value) and RBF KID (with its se, interval and bandwidth) of generated
    (n_g, dim) against held-out real rows (n_r, dim), both in ``space`` (the train-normalised space of the cubic KID),
    and ``prdc_note`` ("" when n >= 5 x dim, else why PRDC is too small to judge)."""
    z_generated, z_real = space.transform(generated), space.transform(real)
    n = min(generated.shape[0], real.shape[0])
    return {**c2st(z_real, z_generated, seed=seed).as_metrics(),
            **rbf_kid(z_generated, z_real, seed=seed).as_metrics(),
            "prdc_note": prdc_note(n, generated.shape[1])}
