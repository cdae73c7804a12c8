"""Evaluate a trained ``best.pt``: EMA samples in raw embedding space against the held-out test split.

Pure (no Dagster): the ``evaluation`` asset and the research scripts call :func:`evaluate_checkpoint`.

    checkpoint (best.pt) ──► EMA model + flow + normaliser ──► ODE samples (n, dim), denormalised
        ──► metrics vs test (KID ± se, FD∞, dispersion, PRDC, memorisation vs the run's training rows), one set per
            sampler, beside the reference rows (held-out real, gaussian-full, gaussian-diag, gaussian-mixture) scored
            the same way
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import ValidationError

from flow_pipeline.config import TrainConfig, format_validation_error
from flow_pipeline.core.checkpoint import CheckpointError, EMAModel, load_ema_model
from flow_pipeline.core.data.split_store import first_training_rows
from flow_pipeline.core.data.splits import DATASET_SIZES
from flow_pipeline.core.guidance import GuidanceFit
from flow_pipeline.core.metrics.distances import TrainSpace
from flow_pipeline.core.data.truth import truth_of
from flow_pipeline.core.metrics.real_side import RealSide
from flow_pipeline.core.metrics.two_sample import two_sample_scores
from flow_pipeline.core.likelihood_guidance import LikelihoodGuidanceFit
from flow_pipeline.evaluation.guidance import fit_sampler_guidance
from flow_pipeline.evaluation.likelihood import TRUTH, LikelihoodEvaluation, evaluate_likelihood
from flow_pipeline.evaluation.mixture_reference import mixture_reference
from flow_pipeline.evaluation.references import (
    CachedReferences,
    ReferenceEvaluation,
    cached_references,
    read_cached,
    read_side_statistics,
    references_key,
    write_side_statistics,
)
from flow_pipeline.evaluation.results import (SAMPLES_PER_DIM, Evaluation, SamplerEvaluation, sample_count,
                                              sample_count_note)
from flow_pipeline.evaluation.samplers import SamplerSpec, draw_samples
from flow_pipeline.evaluation.sentences import nearest_sentences

# Test rows the likelihood integrates: per-row log-densities need no n >= 5 x dim, and the paired interval against
# a baseline at 1,024 rows is already a few nats wide (BENCHMARKS.md, "Held-out likelihood").
LIKELIHOOD_ROWS = 1024


@dataclass(frozen=True)
class EvaluationData:
    """The rows an evaluation compares with: raw embeddings, the splits on disk (possibly memory-mapped).

    train (n_train, dim): the train split; the run's own rows of it (:func:`run_training_rows`) are what
    memorisation, the train-normalised space and the Gaussian baselines use. test (n_test, dim): the held-out rows
    the samples are scored against. val (n_val, dim) or None: with it, the reference rows (held-out real val rows,
    gaussian-full, gaussian-diag, gaussian-mixture) are scored too, and they are the target of an "auto" guidance
    (:func:`~flow_pipeline.evaluation.guidance.fit_sampler_guidance`). sentences: (train split's, test split's)
    row-aligned sentences, or None. truth: the record of the distribution the rows were drawn from
    (``Splits.truth``: the built-in generator), or None (real data); with it the likelihood says how far each model
    and baseline is from the truth.
    """

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray | None = None
    sentences: tuple[list[str], list[str]] | None = None
    truth: dict | None = None


@dataclass(frozen=True)
class EvaluationSettings:
    """How a checkpoint is sampled and scored: the sampler settings (the first is the primary one); ``n =
    min(n_test, n_samples)`` samples per sampler, all from the same noise (``seed``); ``k`` nearest neighbours of
    PRDC; ``batch_size`` rows integrated at once; the first ``n_sentences`` samples of the primary sampler shown with
    their nearest training and test sentences (when the data carries sentences); the held-out log-likelihood of
    the first ``likelihood_rows`` scored test rows (0: none) under the model as the primary sampler draws from it
    (:mod:`flow_pipeline.evaluation.likelihood`; ``likelihood_options`` go to
    :func:`~flow_pipeline.core.likelihood.log_likelihood`)."""

    samplers: Sequence[SamplerSpec]
    n_samples: int = SAMPLES_PER_DIM * 1024
    seed: int = 0
    k: int = 5
    batch_size: int = 1024
    n_sentences: int = 5
    likelihood_rows: int = LIKELIHOOD_ROWS
    likelihood_options: dict = field(default_factory=dict)


def saved_train_config(saved: dict, path: Path) -> TrainConfig:
    """A checkpoint's saved config, validated; CheckpointError naming the file when it is not valid."""
    try:
        return TrainConfig(**saved)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: the checkpoint's config is not valid: {format_validation_error(exc)}") from exc


def run_training_rows(train_split, config: TrainConfig):
    """The rows the run was trained on (its ``dataset`` subset of the train split): the one place that decides
    which rows both memorisation measures, the train-normalised space and the baselines use. Rows that are already
    the run's (``core.data.split_store.load_run_splits``: a size's own train split, or the first N rows) are kept whole;
    a longer train split is cut to its first N rows."""
    limit = DATASET_SIZES.get(config.dataset)
    if limit is None or train_split.shape[0] <= limit:
        return train_split
    return first_training_rows(train_split, config.dataset)


def _check_shapes(data: EvaluationData, dim: int, checkpoint_path) -> None:
    splits = {"train": data.train, "test": data.test, **({"val": data.val} if data.val is not None else {})}
    for name, split in splits.items():
        if split.ndim != 2 or split.shape[1] != dim:
            raise ValueError(f"{name} split has shape {split.shape}; the checkpoint {checkpoint_path} "
                             f"was trained on dim={dim}")


@dataclass
class _PreparedReal:
    """The real side of one evaluation, and the reference cache's entry for its inputs (key None: no cache)."""

    side: RealSide
    key: str | None
    cached: CachedReferences | None


def _prepare_real_side(train_rows, test: np.ndarray, val, n: int, settings: EvaluationSettings,
                       reference_cache) -> _PreparedReal:
    # Everything on the real side (subsamples, copy threshold, FD roots, K_yy, k-NN radii) depends only on the rows,
    # n, k and seed: prepared once, then every sample set (each sampler, each reference) pays only its own work.
    # A reference cache hit also carries the copy threshold of these inputs (the side's scan of the training rows).
    seed, k = settings.seed, settings.k
    key = None if val is None or reference_cache is None else references_key(train_rows, test, val, n, seed, k)
    cached = None if key is None else read_cached(reference_cache, key)
    statistics = None if key is None else read_side_statistics(reference_cache, key)
    side = RealSide.prepare(train_rows, test, n, k=k, seed=seed, train_space=TrainSpace.fit(train_rows),
                            train_copy_threshold=None if cached is None else cached.copy_threshold,
                            statistics=statistics)
    if key is not None and statistics is None:
        write_side_statistics(reference_cache, key, side)
    return _PreparedReal(side, key, cached)


def _score_sampler(ema: EMAModel, spec: SamplerSpec, fit: GuidanceFit | None, side: RealSide, n: int,
                   settings: EvaluationSettings) -> tuple[SamplerEvaluation, np.ndarray]:
    """One sampler setting's metrics (its guidance already resolved), and its samples (n, dim)."""
    drawn = draw_samples(ema, spec, n, settings.seed, settings.batch_size)
    samples = drawn.x.numpy()
    # A fitted setting shows the w it chose; on a model without a skip path it is the plain sampler.
    guided = fit is not None and fit.draws > 0
    label = f"{spec.resolved(1.0).label}@{spec.rule}={spec.guidance:g}" if guided else spec.label
    metrics = {**side.score(samples), **two_sample_scores(samples, side.test_n, side.space, settings.seed)}
    return SamplerEvaluation(sampler=label, solver=spec.solver, steps=spec.steps, nfe=drawn.nfe,
                             seconds=drawn.seconds, metrics=metrics, guidance=float(spec.guidance),
                             guidance_fit=None if fit is None else fit.as_dict()), samples


def evaluate_checkpoint(checkpoint_path: str | os.PathLike, data: EvaluationData, settings: EvaluationSettings,
                        device: str | torch.device = "cpu", expected_sha256: str | None = None,
                        reference_cache: str | os.PathLike | None = None) -> Evaluation:
    """Sample the checkpoint's EMA model with each sampler of ``settings`` and score the samples against ``data``'s
    test rows (subsampled to n rows with the seed), beside the reference rows when ``data.val`` is given (scored
    with the same n, seed and k).

    Raises CheckpointError for a bad file (also when its sha256 differs from ``expected_sha256``: it was replaced
    since it was recorded), ValueError for a dimension mismatch, an empty sampler list or too few rows.
    ``reference_cache``: a directory where the reference rows are kept and reused across evaluations on the same
    inputs (:func:`flow_pipeline.evaluation.references.cached_references`); None scores them every time.
    """
    if not settings.samplers:
        raise ValueError("at least one sampler is needed (e.g. 'dopri5')")
    ema = load_ema_model(checkpoint_path, saved_train_config, device, expected_sha256)
    _check_shapes(data, ema.config.dim, checkpoint_path)
    n = sample_count(data.test.shape[0], settings.n_samples)
    if not 1 <= settings.k < n:
        raise ValueError(f"k={settings.k} nearest neighbours needs more than k samples; n={n}")
    # Sliced, not copied: a memory-mapped split is scanned chunk by chunk for copies, never loaded whole.
    train_rows, test = run_training_rows(data.train, ema.config), np.asarray(data.test)
    real = _prepare_real_side(train_rows, test, data.val, n, settings, reference_cache)
    results, shown, primary_samples = [], [], None
    fits: dict[tuple, GuidanceFit | LikelihoodGuidanceFit] = {}
    for spec in settings.samplers:
        fit = None
        if spec.guidance is None:
            # Its own noise (seed + 1): the choice of w never sees the draw it is scored on.
            # A likelihood-chosen w is the same for every solver; a variance-matched one is the solver's own.
            key = (spec.rule,) if spec.rule == "likelihood" else (spec.rule, spec.solver, spec.steps)
            if key not in fits:
                fits[key] = fit_sampler_guidance(ema, spec, train_rows, data.val, settings.seed + 1,
                                                 settings.likelihood_options)
            fit = fits[key]
            spec = spec.resolved(fit.guidance)
        result, samples = _score_sampler(ema, spec, fit, real.side, n, settings)
        if primary_samples is None:
            primary_samples = samples
            if data.sentences is not None:
                # The run's rows are the first rows of the split (run_training_rows), so their sentences are too.
                shown = nearest_sentences(samples[: settings.n_sentences], train_rows,
                                          data.sentences[0][: train_rows.shape[0]], test, data.sentences[1],
                                          real.side.threshold)
        results.append(result)
    references: list[ReferenceEvaluation] = []
    # The mixture's EM fit is the costly reference: fitted (or read from the cache) once, for both its rows.
    mixture = mixture_reference(train_rows, data.val, reference_cache, real.key)
    if data.val is not None:
        references = (real.cached.rows if real.cached is not None
                      else cached_references(real.side, data.val, reference_cache, real.key, mixture))
    likelihood = None
    if settings.likelihood_rows > 0:
        likelihood = evaluate_likelihood(ema, real.side.test_n[: settings.likelihood_rows], train_rows,
                                         truth_of(data.truth), guidance=results[0].guidance, val=data.val,
                                         mixture=mixture, **settings.likelihood_options)
        results[0].metrics.update(likelihood.metrics())
        references = _with_likelihood(references, likelihood)
    return Evaluation(checkpoint_path=str(ema.checkpoint_path), sha256=ema.sha256, run_name=ema.config.run_name,
                      arch=ema.config.arch, flow=ema.config.flow, n=n, seed=settings.seed, k=settings.k,
                      results=results, references=references, dataset=ema.config.dataset,
                      n_training_rows=int(train_rows.shape[0]), n_target=SAMPLES_PER_DIM * ema.config.dim,
                      n_note=sample_count_note(n, ema.config.dim, test.shape[0]), nearest_sentences=shown,
                      likelihood=likelihood, primary_samples=primary_samples)


def _with_likelihood(references: list[ReferenceEvaluation], likelihood: LikelihoodEvaluation,
                     ) -> list[ReferenceEvaluation]:
    """The reference rows with the likelihood of each one that has a density (the baselines), and a row for the
    truth when it is known (its KL to itself is 0 by definition: the floor every model is measured against)."""
    rows = [replace(row, metrics={**row.metrics, **likelihood.reference_metrics(row.name)})
            if row.name in likelihood.reference_nll else row for row in references]
    if TRUTH in likelihood.reference_nll:
        rows.append(ReferenceEvaluation(TRUTH, likelihood.n, 0.0, likelihood.reference_metrics(TRUTH),
                                        note="the distribution the built-in rows were drawn from"))
    return rows
