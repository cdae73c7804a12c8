"""The "auto" guidance of a sampler: the w that matches held-out rows' variance, fitted per checkpoint
(:func:`flow_pipeline.core.guidance.fit_guidance` on the rows this module picks as the target)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from flow_pipeline.core.checkpoint import EMAModel
from flow_pipeline.core.guidance import GuidanceFit, fit_guidance
from flow_pipeline.evaluation.samplers import DOPRI5_ATOL, DOPRI5_RTOL, SamplerSpec

# Rows the guidance target is measured on: the mean variance over 64 coordinates of 8,192 rows is known to ~0.2%,
# and the whole-split normalisation a larger dataset would need is not.
GUIDANCE_TARGET_ROWS = 8_192
# Fewer val rows than this, and the target is the training rows' variance (the mean over k = 64 coordinates of
# 100 rows' variances is known to ~2%).
GUIDANCE_MIN_VAL_ROWS = 100


def fit_sampler_guidance(ema: EMAModel, spec: SamplerSpec, train_rows: np.ndarray, val: np.ndarray | None,
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
