"""Evaluate a trained ``best.pt``: EMA samples in raw embedding space against the held-out test split.

Pure (no Dagster): the ``evaluation`` asset and the benchmark scripts call :func:`evaluate_checkpoint`.

    checkpoint (best.pt) ──► EMA model + flow + normaliser ──► ODE samples (n, dim), denormalised
        ──► metrics vs test (KID ± se, FD∞, dispersion, PRDC, memorisation vs the run's training rows), one set per
            sampler, beside the reference rows (held-out real, gaussian-full, gaussian-diag) scored the same way
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from flow_pipeline.config import TrainConfig, format_validation_error
from flow_pipeline.core.checkpoint import CheckpointError, load_checkpoint, sha256_file
from flow_pipeline.core.data.normalization import Normalizer
from flow_pipeline.core.data.split_store import first_training_rows
from flow_pipeline.core.data.splits import DATASET_SIZES
from flow_pipeline.core.distances import TrainSpace
from flow_pipeline.core.flows import Flow, get_flow
from flow_pipeline.core.guidance import GuidanceFit, fit_guidance
from flow_pipeline.core.models import build_model
from flow_pipeline.core.real_side import RealSide
from flow_pipeline.core.sampling import SOLVERS, SampleResult, sample
from flow_pipeline.evaluation_references import (
    ReferenceEvaluation,
    cached_references,
    read_cached,
    read_side_statistics,
    references_key,
    write_side_statistics,
)
from flow_pipeline.sentences import nearest_sentences

ADAPTIVE_SOLVERS = ("dopri5",)
# Tolerances of the adaptive solver (the primary sampler by default): errors well below the sampling noise of the
# metrics, so no architecture or flow is ranked by a fixed-step solver's discretisation error. 1e-4 rather than 1e-5
# (BENCHMARKS.md, "Evaluation cost"): on the quickstart model it halves the function evaluations (104 -> 50) and moves
# ranking KID by 0.03 of its standard error at n = 5,120 (0.01 on a second model); 1e-3 moved it by 0.7.
DOPRI5_RTOL, DOPRI5_ATOL = 1e-4, 1e-4
# Samples per evaluation as a multiple of the dimension: at n < dim FD is dominated by its bias and PRDC is noisy.
SAMPLES_PER_DIM = 5


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler setting: a fixed-step solver with its number of steps, or an adaptive one (steps 0), and the
    guidance of a skip-path model (:mod:`flow_pipeline.core.guidance`): a number w, 1 for the model as trained, or
    None for "auto" (the w that matches held-out rows' variance, fitted per checkpoint by
    :func:`fit_sampler_guidance`)."""

    solver: str
    steps: int = 0
    guidance: float | None = 1.0

    @classmethod
    def parse(cls, text: str) -> "SamplerSpec":
        """``"euler:50"``, ``"midpoint:25"``, ``"rk4:10"`` or ``"dopri5"``, optionally with ``@W`` (a guidance
        number >= 0) or ``@auto``: ``"dopri5@auto"``, ``"euler:50@1.3"``. Bad text raises ValueError naming it."""
        sampler_text, at, guidance_text = text.strip().partition("@")
        try:
            guidance = parse_guidance(guidance_text) if at else 1.0
        except ValueError as exc:
            raise ValueError(f"sampler {text!r}: {exc}") from None
        solver, _, steps_text = sampler_text.strip().partition(":")
        if solver not in SOLVERS:
            raise ValueError(f"sampler {text!r}: unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
        if solver in ADAPTIVE_SOLVERS:
            if steps_text:
                raise ValueError(f"sampler {text!r}: {solver} is adaptive and takes no step count; write {solver!r}")
            return cls(solver, 0, guidance)
        try:
            steps = int(steps_text)
        except ValueError:
            raise ValueError(f"sampler {text!r}: expected '{solver}:STEPS' with an integer STEPS >= 1") from None
        if steps < 1:
            raise ValueError(f"sampler {text!r}: steps must be >= 1")
        return cls(solver, steps, guidance)

    @property
    def label(self) -> str:
        solver = self.solver if self.solver in ADAPTIVE_SOLVERS else f"{self.solver}:{self.steps}"
        return solver + ("@auto" if self.guidance is None else "" if self.guidance == 1.0 else f"@{self.guidance:g}")

    def resolved(self, guidance: float | None) -> "SamplerSpec":
        """This setting with its guidance fixed at ``guidance`` (an "auto" one once fitted)."""
        return SamplerSpec(self.solver, self.steps, guidance)


def parse_guidance(text: str) -> float | None:
    """``"auto"`` -> None (fitted per checkpoint), a number >= 0 -> that float; anything else raises ValueError."""
    if text.strip() == "auto":
        return None
    try:
        guidance = float(text)
    except ValueError:
        guidance = float("nan")
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be 'auto' or a number >= 0 (1: the model as trained), got {text!r}")
    return guidance


@dataclass
class EMAModel:
    """Everything needed to sample from one checkpoint.

    model: the architecture with the checkpoint's EMA weights, in eval mode on the requested device.
    flow: the flow method of the run (its ``to_velocity`` turns model output into dx/dt).
    normalizer: the run's z-scoring, whose ``denormalize`` maps samples back to raw embedding space.
    history: per-epoch dicts (epoch, train_loss, val_loss, ema_val_loss, ...) of the run.
    """

    model: nn.Module
    flow: Flow
    normalizer: Normalizer
    config: TrainConfig
    checkpoint_path: Path
    sha256: str
    best_loss: float
    history: list[dict] = field(default_factory=list)


def _train_config(saved: dict, path: Path) -> TrainConfig:
    try:
        return TrainConfig(**saved)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: the checkpoint's config is not valid: {format_validation_error(exc)}") from exc


def _load_ema_weights(model: nn.Module, state: dict, path: Path) -> None:
    """Raw weights first (they carry any buffers), then every trainable parameter from the EMA shadow."""
    model.load_state_dict(state["model_state_dict"])
    shadow = state["ema_shadow"]
    params = dict(model.named_parameters())
    missing = sorted(name for name, p in params.items() if p.requires_grad and name not in shadow)
    unknown = sorted(set(shadow) - set(params))
    if missing or unknown:
        raise CheckpointError(f"{path}: ema_shadow does not match the {type(model).__name__} model "
                              f"(missing {missing[:5]}, unexpected {unknown[:5]})")
    with torch.no_grad():
        for name, tensor in shadow.items():
            params[name].copy_(tensor)


def load_ema_model(checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu",
                   expected_sha256: str | None = None) -> EMAModel:
    """Rebuild the run's model from ``best.pt`` with the EMA weights; raises CheckpointError naming the file, also
    when the file's sha256 differs from ``expected_sha256`` (it was replaced since it was recorded)."""
    path = Path(checkpoint_path)
    sha256 = sha256_file(path) if path.is_file() else ""
    if expected_sha256 is not None and sha256 and sha256 != expected_sha256:
        raise CheckpointError(f"{path} has changed since it was recorded (sha256 {sha256[:12]}..., expected "
                              f"{expected_sha256[:12]}...): re-materialize trained_checkpoint or wait for its run")
    state = load_checkpoint(path, map_location="cpu")
    config = _train_config(state["config"], path)
    model = build_model(config.arch, dim=config.dim, size=config.model_size, linear_skip=config.linear_skip,
                        principal_dims=config.principal_dims)
    _load_ema_weights(model, state, path)
    return EMAModel(
        model=model.to(device).eval(),
        flow=get_flow(config.flow, **config.flow_params()),
        normalizer=Normalizer.from_state_dict(state["normalization_stats"]),
        config=config,
        checkpoint_path=path,
        sha256=sha256,
        best_loss=float(state["best_loss"]),
        history=list(state.get("history", [])),
    )


def draw_samples(ema: EMAModel, spec: SamplerSpec, n: int, seed: int, batch_size: int = 1024) -> SampleResult:
    """n samples (n, dim) on the CPU in raw embedding space (denormalised), from noise seeded with ``seed``,
    integrated on the device the model lives on, with the spec's guidance (an "auto" one must be resolved first)."""
    if spec.guidance is None:
        raise ValueError(f"sampler {spec.label}: resolve its guidance with fit_sampler_guidance first")
    device = next(ema.model.parameters()).device
    return sample(ema.model, ema.flow, n=n, dim=ema.config.dim, solver=spec.solver, steps=spec.steps, seed=seed,
                  device=device, batch_size=batch_size, rtol=DOPRI5_RTOL, atol=DOPRI5_ATOL,
                  denormalize=ema.normalizer.denormalize, guidance=spec.guidance)


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


@dataclass
class SamplerEvaluation:
    """Metrics of one sampler setting (see :func:`flow_pipeline.core.metrics.evaluate_samples` for their meaning)."""

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
    # The first sampler's samples (n, dim), raw space, for the evaluation's figure; not part of as_dict().
    primary_samples: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def primary(self) -> SamplerEvaluation:
        """The first sampler: the one the pipeline reports as the partition's headline numbers."""
        return self.results[0]

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "primary_samples"}


def run_training_rows(train_split, config: TrainConfig):
    """The rows the run was trained on (its ``dataset`` subset of the train split): the one place that decides
    which rows both memorisation measures, the train-normalised space and the baselines use. Rows that are already
    the run's (``core.data.split_store.load_run_splits``: a size's own train split, or the first N rows) are kept whole;
    a longer train split is cut to its first N rows."""
    limit = DATASET_SIZES.get(config.dataset)
    if limit is None or train_split.shape[0] <= limit:
        return train_split
    return first_training_rows(train_split, config.dataset)


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


def evaluate_checkpoint(
    checkpoint_path: str | os.PathLike,
    train: np.ndarray,
    test: np.ndarray,
    samplers: Sequence[SamplerSpec],
    n_samples: int = SAMPLES_PER_DIM * 1024,
    seed: int = 0,
    k: int = 5,
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    expected_sha256: str | None = None,
    val: np.ndarray | None = None,
    sentences: tuple[list[str], list[str]] | None = None,
    n_sentences: int = 5,
    reference_cache: str | os.PathLike | None = None,
) -> Evaluation:
    """Sample the checkpoint's EMA model with each sampler and score the samples, beside the reference rows.

    train (n_train, dim), val, test (n_test, dim): raw embeddings (the splits on disk, possibly memory-mapped).
    The run's own training rows (:func:`run_training_rows`) are what memorisation, the train-normalised space and
    the Gaussian baselines use. ``n = min(n_test, n_samples)`` samples per sampler, all starting from the same noise
    (``seed``); the metrics compare them with test, subsampled to n rows with ``seed``. With ``val`` given, the
    references (held-out real val rows, gaussian-full, gaussian-diag) are scored with the same n, seed and k, and
    they are the target of an "auto" guidance (:func:`fit_sampler_guidance`).
    Raises CheckpointError for a bad file, ValueError for a dimension mismatch, an empty sampler list or too few
    rows. ``expected_sha256``: see :func:`load_ema_model`. ``sentences``: (train split's, test split's) row-aligned
    sentences; when given, the first ``n_sentences`` samples of the primary sampler are shown with their nearest
    training and test sentences (:func:`flow_pipeline.sentences.nearest_sentences`). ``reference_cache``: a
    directory where the reference rows are kept and reused across evaluations on the same inputs
    (:func:`flow_pipeline.evaluation_references.cached_references`); None scores them every time.
    """
    if not samplers:
        raise ValueError("at least one sampler is needed (e.g. 'dopri5')")
    ema = load_ema_model(checkpoint_path, device, expected_sha256)
    splits = {"train": train, "test": test, **({"val": val} if val is not None else {})}
    for name, split in splits.items():
        if split.ndim != 2 or split.shape[1] != ema.config.dim:
            raise ValueError(f"{name} split has shape {split.shape}; the checkpoint {checkpoint_path} "
                             f"was trained on dim={ema.config.dim}")
    n = sample_count(test.shape[0], n_samples)
    if not 1 <= k < n:
        raise ValueError(f"k={k} nearest neighbours needs more than k samples; n={n}")
    # Sliced, not copied: a memory-mapped split is scanned chunk by chunk for copies, never loaded whole.
    train_rows, test = run_training_rows(train, ema.config), np.asarray(test)
    # Everything on the real side (subsamples, copy threshold, FD roots, K_yy, k-NN radii) depends only on the rows,
    # n, k and seed: prepared once, then every sample set (each sampler, each reference) pays only its own work.
    # A reference cache hit also carries the copy threshold of these inputs (the side's scan of the training rows).
    key = None if val is None or reference_cache is None else references_key(train_rows, test, val, n, seed, k)
    cached = None if key is None else read_cached(reference_cache, key)
    statistics = None if key is None else read_side_statistics(reference_cache, key)
    side = RealSide.prepare(train_rows, test, n, k=k, seed=seed, train_space=TrainSpace.fit(train_rows),
                            train_copy_threshold=None if cached is None else cached.copy_threshold,
                            statistics=statistics)
    if key is not None and statistics is None:
        write_side_statistics(reference_cache, key, side)
    results, shown, primary_samples = [], [], None
    fits: dict[tuple[str, int], GuidanceFit] = {}
    for spec in samplers:
        fit = None
        if spec.guidance is None:
            # Its own noise (seed + 1): the choice of w never sees the draw it is scored on.
            if (spec.solver, spec.steps) not in fits:
                fits[spec.solver, spec.steps] = fit_sampler_guidance(ema, spec, train_rows, val, seed + 1)
            fit = fits[spec.solver, spec.steps]
            spec = spec.resolved(fit.guidance)
        drawn = draw_samples(ema, spec, n, seed, batch_size)
        primary_samples = drawn.x.numpy() if primary_samples is None else primary_samples
        metrics = side.score(drawn.x.numpy())
        if sentences is not None and not results:
            # The run's rows are the first rows of the split (run_training_rows), so their sentences are too.
            shown = nearest_sentences(drawn.x.numpy()[:n_sentences], train_rows,
                                      sentences[0][: train_rows.shape[0]], test, sentences[1], side.threshold)
        # An "auto" setting shows the w it chose; on a model without a skip path it is the plain sampler.
        guided = fit is not None and fit.draws > 0
        label = f"{spec.resolved(1.0).label}@auto={spec.guidance:g}" if guided else spec.label
        results.append(SamplerEvaluation(sampler=label, solver=spec.solver, steps=spec.steps, nfe=drawn.nfe,
                                         seconds=drawn.seconds, metrics=metrics, guidance=float(spec.guidance),
                                         guidance_fit=None if fit is None else fit.as_dict()))
    if val is None:
        references = []
    else:
        references = cached.rows if cached is not None else cached_references(side, val, reference_cache, key)
    return Evaluation(checkpoint_path=str(ema.checkpoint_path), sha256=ema.sha256, run_name=ema.config.run_name,
                      arch=ema.config.arch, flow=ema.config.flow, n=n, seed=seed, k=k, results=results,
                      references=references, dataset=ema.config.dataset, n_training_rows=int(train_rows.shape[0]),
                      n_target=SAMPLES_PER_DIM * ema.config.dim,
                      n_note=sample_count_note(n, ema.config.dim, test.shape[0]), nearest_sentences=shown,
                      primary_samples=primary_samples)
