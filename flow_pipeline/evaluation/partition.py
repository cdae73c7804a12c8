"""One partition's evaluation: every replicate of its latest training evaluated on the run's own data, each result
saved as ``evaluation.json``, the first replicate's samples drawn as a figure."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from flow_pipeline.artifacts import EVALUATION_JSON, EVALUATION_PNG, STALE_TEMP_AGE_S, ArtifactLayout, write_json
from flow_pipeline.core.atomic import remove_stale_temp_files
from flow_pipeline.core.checkpoint import CheckpointError
from flow_pipeline.core.data.split_set import load_saved_splits
from flow_pipeline.core.data.split_store import RunSplits, load_run_splits
from flow_pipeline.evaluation.evaluate import EvaluationData, EvaluationSettings, evaluate_checkpoint
from flow_pipeline.evaluation.results import Evaluation
from flow_pipeline.evaluation.sentences import read_split_sentences
from flow_pipeline.evaluation.study_report import EVALUATION_ERROR, evaluation_study_metadata
from flow_pipeline.replicates import replicates_from_metadata


@dataclass
class ReplicateEvaluation:
    """One replicate of the training (its entry in the training's metadata), its evaluation and where it is saved."""

    entry: dict
    evaluation: Evaluation
    results_path: Path


@dataclass
class PartitionEvaluation:
    """Every replicate's evaluation (the first one's numbers are the headline ones), the study metadata over them
    (:func:`~flow_pipeline.evaluation.study_report.evaluation_study_metadata`) and the first one's figure."""

    replicates: list[ReplicateEvaluation]
    study: dict
    figure: object  # flow_pipeline.evaluation.plots.InlineFigure
    figure_path: Path
    failures: list[str] = field(default_factory=list)  # why the replicates that failed did

    @property
    def first(self) -> Evaluation:
        return self.replicates[0].evaluation

    def summary_line(self, partition: str) -> str:
        """The headline numbers of the first replicate's primary sampler, for the run's log."""
        result, primary = self.first, self.first.primary.metrics
        likelihood = ""
        if "test_nll" in primary:
            versus = [f"vs {name.replace('_', '-')} {primary[key]:+.2f} [{primary[f'{key}_ci_low']:+.2f}, "
                      f"{primary[f'{key}_ci_high']:+.2f}]" for name in ("gaussian_full", "gaussian_mixture")
                      if (key := f"loglik_vs_{name}") in primary]
            likelihood = f"test_nll={primary['test_nll']:.2f} ({', '.join(versus)} nats/row) "
        return (f"{partition} ({result.primary.sampler}, n={result.n}): {likelihood}kid={primary['kid']:.4g} ± "
                f"{primary['kid_se']:.2g} fd_inf={primary['fd_inf']:.4g} "
                f"variance_ratio={primary['variance_ratio']:.3f} coverage={primary['coverage']:.3f}"
                + (f" [{result.n_note}]" if result.n_note else ""))


def run_sentences(run: RunSplits, n_sentences: int) -> tuple[list[str], list[str]] | None:
    """(train, test) sentences when both splits carry them and any are asked for; else None. Train: the sentences
    of the run's own training rows (the first rows of its set's train split)."""
    if n_sentences == 0:
        return None
    whole = load_saved_splits(run.set_dir)  # the .jsonl files are row-aligned with the whole saved splits
    train = read_split_sentences(run.set_dir, "train", whole.train.shape[0])
    test = read_split_sentences(run.set_dir, "test", whole.test.shape[0])
    train = None if train is None else train[: run.splits.train.shape[0]]
    return (train, test) if train is not None and test is not None else None


def _figure(partition: str, result: Evaluation, test: np.ndarray, seed: int, path: Path):
    from flow_pipeline.evaluation.plots import plot_evaluation  # matplotlib costs ~0.7 s: only in the process that draws

    figure = plot_evaluation(result.primary_samples, test, result.primary.metrics,
                             f"{partition} ({result.primary.sampler})", seed)
    figure.save(path)
    return figure


def evaluate_partition(partition: str, training: dict, layout: ArtifactLayout, settings: EvaluationSettings,
                       references: bool, reuse_references: bool, device) -> PartitionEvaluation:
    """Evaluate every replicate of ``training`` (the partition's latest trained_checkpoint metadata, plain values)
    on the run's data: its training rows, and for a per-size store the val/test splits of its size. ``references``:
    score the reference rows too (the val split); ``reuse_references``: through the layout's reference cache.

    Replicate i samples with seed ``settings.seed + i``, so the intervals over replicates include the sampling
    noise. A replicate whose evaluation fails (a checkpoint that no longer reads or verifies) stays in the study
    with its error, and ranks its row worst; when every replicate fails, or the data cannot be read, this raises
    CheckpointError, DataError or ValueError naming what is wrong."""
    entries = replicates_from_metadata(training)
    run_dirs = [layout.evaluation_dir(entry["run_name"]) for entry in entries if entry.get("run_name")]
    for directory in [layout.reference_cache_dir, *run_dirs]:
        remove_stale_temp_files(directory, older_than_s=STALE_TEMP_AGE_S)  # what killed evaluations left
    run = load_run_splits(layout.splits_dir, (training.get("config") or {}).get("dataset", "full"))
    splits = run.splits
    data = EvaluationData(splits.train, splits.test, val=splits.val if references else None,
                          sentences=run_sentences(run, settings.n_sentences), truth=splits.truth)
    evaluated, failed = [], []
    for index, entry in enumerate(entries):
        try:
            result = evaluate_checkpoint(entry["checkpoint_path"], data, replace(settings, seed=settings.seed + index),
                                         device=device, expected_sha256=entry.get("sha256"),
                                         reference_cache=layout.reference_cache_dir if reuse_references else None)
        except CheckpointError as exc:
            failed.append((entry, exc))
            continue
        results_path = layout.evaluation_dir(result.run_name) / EVALUATION_JSON
        write_json(results_path, {"partition": partition, **result.as_dict()})
        evaluated.append(ReplicateEvaluation(entry, result, results_path))
    if not evaluated:
        raise failed[0][1]
    scored = [(r.entry, {key: value for key, value in r.evaluation.primary.metrics.items() if key != "n"})
              for r in evaluated]
    study = evaluation_study_metadata(training["config"], scored + [
        ({**entry, EVALUATION_ERROR: str(exc)}, {}) for entry, exc in failed])
    figure_path = evaluated[0].results_path.with_name(EVALUATION_PNG)
    figure = _figure(partition, evaluated[0].evaluation, splits.test, evaluated[0].evaluation.seed, figure_path)
    return PartitionEvaluation(evaluated, study, figure, figure_path, [str(exc) for _, exc in failed])
