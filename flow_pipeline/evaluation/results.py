"""What an evaluation returns: per-sampler metrics (:class:`SamplerEvaluation`) and the whole evaluation of one
checkpoint (:class:`Evaluation`), with the rule for how many samples it draws."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from flow_pipeline.evaluation.likelihood import LikelihoodEvaluation
from flow_pipeline.evaluation.references import ReferenceEvaluation

# Samples per evaluation as a multiple of the dimension: at n < dim FD is dominated by its bias and PRDC is noisy.
SAMPLES_PER_DIM = 5


@dataclass
class SamplerEvaluation:
    """Metrics of one sampler setting (see :func:`flow_pipeline.core.metrics.real_side.evaluate_samples` for their meaning)."""

    sampler: str
    solver: str
    steps: int
    nfe: int
    seconds: float
    metrics: dict[str, float]
    guidance: float = 1.0
    guidance_fit: dict | None = None  # an "auto" setting: fit_sampler_guidance().as_dict()


@dataclass
class Evaluation:
    """All sampler settings of one checkpoint, evaluated on the same ``n`` and the same starting noise."""

    checkpoint_path: str
    sha256: str
    run_name: str
    arch: str
    flow: str
    n: int
    seed: int
    k: int
    results: list[SamplerEvaluation]
    references: list[ReferenceEvaluation] = field(default_factory=list)
    dataset: str = ""
    n_training_rows: int = 0
    n_target: int = 0
    n_note: str = ""
    nearest_sentences: list[dict] = field(default_factory=list)
    likelihood: LikelihoodEvaluation | None = None  # held-out log-likelihood (settings.likelihood_rows > 0)
    # The first sampler's samples (n, dim), raw space, for the evaluation's figure; not part of as_dict().
    primary_samples: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def primary(self) -> SamplerEvaluation:
        """The first sampler: the one the pipeline reports as the partition's headline numbers."""
        return self.results[0]

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "primary_samples"}


def sample_count_note(n: int, dim: int, n_test: int) -> str:
    """Empty when n >= SAMPLES_PER_DIM x dim; otherwise says why the numbers come from fewer samples."""
    target = SAMPLES_PER_DIM * dim
    if n >= target:
        return ""
    limit = f"the test split has only {n_test} rows" if n == n_test else f"n_samples caps it at {n}"
    return f"n = {n} < {SAMPLES_PER_DIM} x dim = {target} ({limit}): distances are noisier and FD more biased"


def sample_count(n_test: int, cap: int) -> int:
    """Evaluate on as many samples as the test split has rows, at most ``cap``."""
    if cap < 2:
        raise ValueError(f"n_samples cap must be >= 2 (FD needs two samples), got {cap}")
    if n_test < 2:
        raise ValueError(f"the test split has {n_test} rows; evaluation needs at least 2")
    return min(n_test, cap)
