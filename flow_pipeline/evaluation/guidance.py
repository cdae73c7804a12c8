"""A sampler's fitted guidance, per checkpoint: "likelihood", the w whose model gives held-out val rows the highest
likelihood (:func:`flow_pipeline.core.likelihood_guidance.fit_likelihood_guidance`), or "auto", the w that matches
held-out rows' variance (:func:`flow_pipeline.core.guidance.fit_guidance` on the rows this module picks as the
target). The test rows take no part in either."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from flow_pipeline.core.checkpoint import EMAModel
from flow_pipeline.core.guidance import GuidanceFit, fit_guidance
from flow_pipeline.core.likelihood_guidance import LikelihoodGuidanceFit, fit_likelihood_guidance
from flow_pipeline.evaluation.samplers import DOPRI5_ATOL, DOPRI5_RTOL, SamplerSpec

# Rows the guidance target is measured on: the mean variance over 64 coordinates of 8,192 rows is known to ~0.2%,
# and the whole-split normalisation a larger dataset would need is not.
GUIDANCE_TARGET_ROWS = 8_192
# Fewer val rows than this, and the target is the training rows' variance (the mean over k = 64 coordinates of
# 100 rows' variances is known to ~2%).
GUIDANCE_MIN_VAL_ROWS = 100
# Val rows whose likelihood chooses a "likelihood" guidance: the mean log-density of 512 rows is known to a few
# tenths of a nat (a per-row spread of ~10 nats), and each w costs half a test-set likelihood pass.
LIKELIHOOD_GUIDANCE_ROWS = 512


def fit_sampler_guidance(ema: EMAModel, spec: SamplerSpec, train_rows: np.ndarray, val: np.ndarray | None,
                         seed: int, likelihood_options: dict | None = None) -> GuidanceFit | LikelihoodGuidanceFit:
    """Fit the spec's guidance rule: "likelihood" (:func:`fit_val_likelihood_guidance`, with the evaluation's
    ``likelihood_options``) or "auto" (:func:`fit_variance_guidance`, drawing from noise seeded with ``seed``)."""
    if spec.rule == "likelihood":
        return fit_val_likelihood_guidance(ema, val, likelihood_options or {})
    return fit_variance_guidance(ema, spec, train_rows, val, seed)


def fit_val_likelihood_guidance(ema: EMAModel, val: np.ndarray | None, options: dict) -> LikelihoodGuidanceFit:
    """The w whose model gives the first LIKELIHOOD_GUIDANCE_ROWS val rows (raw) the highest mean log-likelihood;
    w = 1 (the model as trained) with fewer than GUIDANCE_MIN_VAL_ROWS val rows: a choice on the training rows would
    reward memorising them."""
    if val is None or val.shape[0] < GUIDANCE_MIN_VAL_ROWS:
        rows = 0 if val is None else int(val.shape[0])
        return LikelihoodGuidanceFit(1.0, (1.0,), (), rows, 0, f"{rows} val rows (fewer than "
                                     f"{GUIDANCE_MIN_VAL_ROWS}): w = 1, the model as trained")
    rows = torch.from_numpy(np.array(val[:LIKELIHOOD_GUIDANCE_ROWS], dtype=np.float32))  # copied: read-only mmap
    return fit_likelihood_guidance(ema.model, ema.flow, ema.normalizer, rows, **options)


def fit_variance_guidance(ema: EMAModel, spec: SamplerSpec, train_rows: np.ndarray, val: np.ndarray | None,
                          seed: int) -> GuidanceFit:
    """Fit an "auto" guidance for this model and sampler (see :func:`fit_guidance`), drawing from noise seeded with
    ``seed``. The target is the variance of held-out val rows (raw space; the first GUIDANCE_TARGET_ROWS) over the
    network's coordinates, or of the run's training rows when there are fewer than GUIDANCE_MIN_VAL_ROWS val rows.
    Held-out rows, because the leading principal directions of a small training set overstate its variance along
    them: on 500 real vectors the training rows' variance there is 1.10 in the whitened space, held-out rows' 0.91
    (RESULTS.md, section 7), and matching the former spreads the samples beyond new data. The test rows take no
    part."""
    use_val = val is not None and val.shape[0] >= GUIDANCE_MIN_VAL_ROWS
    source = val if use_val else train_rows
    rows = torch.from_numpy(np.array(source[:GUIDANCE_TARGET_ROWS], dtype=np.float32))  # copied: read-only mmap
    fit = fit_guidance(ema.model, ema.flow, ema.normalizer.normalize(rows), spec.solver, spec.steps, seed=seed,
                       rtol=DOPRI5_RTOL, atol=DOPRI5_ATOL)
    target = f"{rows.shape[0]} val rows" if use_val else f"{rows.shape[0]} training rows (fewer than " \
        f"{GUIDANCE_MIN_VAL_ROWS} val rows)"
    return replace(fit, note=f"{fit.note}; target: {target}")
