"""Evaluation of every trained partition and the cross-partition ablation report (thin wrappers over
:mod:`flow_pipeline.evaluation` and :mod:`flow_pipeline.report`)."""

import dagster as dg
from pydantic import Field

from flow_pipeline.ablations import ablation_for
from flow_pipeline.artifacts import write_json
from flow_pipeline.core.checkpoint import CheckpointError, load_checkpoint
from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.split_set import load_saved_splits
from flow_pipeline.core.data.split_store import RunSplits, load_run_splits
from flow_pipeline.core.metrics import METRIC_SPACES, RANKING_RULE
from flow_pipeline.core.run_identity import identity_key
from flow_pipeline.defs.assets import OWNERS, ablation_partitions, trained_checkpoint
from flow_pipeline.defs.checks import EVALUATION_CHECK_SPECS, beats_gaussian_full
from flow_pipeline.defs.materializations import latest_metadata, plain_metadata
from flow_pipeline.defs.resources import ArtifactsResource, ComputeResource
from flow_pipeline.evaluation import (ADAPTIVE_SOLVERS, DOPRI5_ATOL, DOPRI5_RTOL, SAMPLES_PER_DIM, Evaluation,
                                      SamplerSpec, evaluate_checkpoint, parse_guidance)
from flow_pipeline.replicates import replicates_from_metadata
from flow_pipeline.report import (LOSES_TO_BASELINE, PRIMARY_METRIC, REFERENCE_METRIC_KEYS, build_row, reference_rows,
                                  reference_table, sampler_table, sort_rows, write_report)
from flow_pipeline.sentences import read_split_sentences, sentences_markdown
from flow_pipeline.study_report import (DEFAULT_BASELINE, add_comparisons, evaluation_study_metadata, pick_baseline,
                                        statistics_markdown, study_rows)

EVALUATION_JSON = "evaluation.json"
EVALUATION_PNG = "samples.png"


class EvaluationConfig(dg.Config):
    """How a partition's EMA model is sampled and scored."""

    solver: str = Field(default="dopri5", description=f"ODE solver of the headline numbers: dopri5 (adaptive, rtol "
                        f"{DOPRI5_RTOL:g}, atol {DOPRI5_ATOL:g}), euler, midpoint, rk4")
    steps: int = Field(default=50, description="fixed steps of that solver (ignored by the adaptive dopri5)")
    guidance: str = Field(default="auto", description="guidance of a linear_skip model's primary sampler: 'auto' "
                          "(w >= 1 matching the val rows' variance over the network's coordinates, the training "
                          "rows' below 100 val rows; w = 1 for a model that is not under-dispersed or has no skip "
                          "path), a number w (network part x w), or 1 for the model as trained")
    extra_samplers: list[str] = Field(
        default_factory=list, description="more settings to compare, each reported with its NFE, e.g. "
        "['euler:50', 'rk4:10', 'dopri5@1'] ('@W' / '@auto': that sampler's guidance; none: 1)"
    )
    n_samples: int = Field(default=SAMPLES_PER_DIM * 1024, description="cap on the number of samples: n = "
                           "min(test rows, n_samples); 5 x dim by default (FD and k-NN metrics are biased at n ~ dim)")
    references: bool = Field(default=True, description="also score held-out real val rows and the gaussian-full / "
                             "gaussian-diag baselines with the same metrics, n and seed")
    reuse_references: bool = Field(default=True, description="read the reference rows from <root>/evaluation/"
                                   "references when an evaluation on the same rows, n, seed, k and metric code "
                                   "scored them already (they do not depend on the model); false: score them again")
    n_sentences: int = Field(default=5, ge=0, description="generated samples shown with their nearest train and "
                             "test sentences, when the splits carry sentences (<split>.jsonl)")
    seed: int = Field(default=0, description="seed of the starting noise and of the reference subsampling")
    k: int = Field(default=5, description="nearest neighbours of precision/recall/density/coverage")
    batch_size: int = Field(default=1024, description="rows integrated at once")

    def samplers(self) -> list[SamplerSpec]:
        """The primary sampler, then the extra ones; a bad one raises ValueError naming its config field."""
        primary = self.solver if self.solver in ADAPTIVE_SOLVERS else f"{self.solver}:{self.steps}"
        fields = [("solver", primary), *((f"extra_samplers[{i}]", text) for i, text in enumerate(self.extra_samplers))]
        specs = []
        for field, text in fields:
            try:
                specs.append(SamplerSpec.parse(text))
            except ValueError as exc:
                raise ValueError(f"{field}: {exc}") from exc
        try:
            specs[0] = specs[0].resolved(parse_guidance(self.guidance))
        except ValueError as exc:
            raise ValueError(f"guidance: {exc}") from exc
        return specs


def _sentences(run: RunSplits, n_sentences: int) -> tuple[list[str], list[str]] | None:
    """(train, test) sentences when both splits carry them and any are asked for; else None. Train: the sentences
    of the run's own training rows (the first rows of its set's train split)."""
    if n_sentences == 0:
        return None
    whole = load_saved_splits(run.set_dir)  # the .jsonl files are row-aligned with the whole saved splits
    train = read_split_sentences(run.set_dir, "train", whole.train.shape[0])
    test = read_split_sentences(run.set_dir, "test", whole.test.shape[0])
    train = None if train is None else train[: run.splits.train.shape[0]]
    return (train, test) if train is not None and test is not None else None


def evaluation_metadata(result: Evaluation, results_path) -> dict:
    """The materialization's metadata: the primary sampler's metrics (flat), where each metric is computed, the
    ranking rule, the sample-size note next to the numbers, and the reference rows (held-out real, baselines)."""
    primary = result.primary
    references = {ref.name: {key: ref.metrics.get(key) for key in REFERENCE_METRIC_KEYS} | {"n": ref.n}
                  for ref in result.references}
    metadata = {
        **{name: float(value) for name, value in primary.metrics.items() if name != "n"},
        "sampler": primary.sampler,
        "guidance": primary.guidance,
        **({"guidance_fit": dg.MetadataValue.json(primary.guidance_fit)} if primary.guidance_fit else {}),
        "dopri5_tolerance": f"rtol {DOPRI5_RTOL:g}, atol {DOPRI5_ATOL:g}",
        "nfe": primary.nfe,
        "seconds": round(primary.seconds, 3),
        "n": result.n,
        "n_target": result.n_target,
        "seed": result.seed,
        "n_note": result.n_note or "n >= 5 x dim",
        "dataset": result.dataset,
        "n_training_rows": result.n_training_rows,
        "ranking_rule": RANKING_RULE,
        "metric_spaces": dg.MetadataValue.json({space: list(keys) for space, keys in METRIC_SPACES.items()}),
        "samplers": dg.MetadataValue.md(sampler_table(result.as_dict()["results"])),
        "references": dg.MetadataValue.json(references),
        "reference_table": dg.MetadataValue.md(reference_table(result, PRIMARY_METRIC)),
        "run_name": result.run_name,
        "checkpoint_path": dg.MetadataValue.path(result.checkpoint_path),
        "checkpoint_sha256": result.sha256,
        "results_path": dg.MetadataValue.path(str(results_path)),
    }
    if result.nearest_sentences:
        metadata["nearest_sentences"] = dg.MetadataValue.md(sentences_markdown(result.nearest_sentences))
    return metadata


@dg.asset(
    partitions_def=ablation_partitions,
    deps=[trained_checkpoint],
    group_name="evaluation",
    owners=OWNERS,
    kinds={"pytorch"},
    check_specs=EVALUATION_CHECK_SPECS,
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    artifacts: ArtifactsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """Sample quality of one partition's EMA model: ODE samples (dopri5 by default) in raw embedding space against
    the held-out test split: KID ± se with a bootstrap CI and FD∞ in train-normalised space, variance and norm
    ratios, precision/recall/density/coverage, memorisation against the rows the run trained on; beside the same
    metrics for held-out real val rows and the gaussian-full / gaussian-diag baselines, and, when the splits carry
    sentences, the nearest train and test sentence of a few samples. Results also saved as JSON."""
    partition = context.partition_key
    try:
        samplers = config.samplers()
    except ValueError as exc:
        raise dg.Failure(description=f"evaluation of {partition}: config: {exc}") from exc
    training = latest_metadata(context.instance, trained_checkpoint.key, partition)
    if training is None or "checkpoint_path" not in training:
        raise dg.Failure(description=f"evaluation of {partition}: no trained_checkpoint materialization with a "
                         f"checkpoint_path for this partition; materialize trained_checkpoint[{partition}] first")
    layout = artifacts.layout
    evaluated = []  # every replicate of the training; the first one's numbers are the headline ones
    try:
        # The run's own data: its training rows, and for a per-size store the val/test splits of its size.
        run = load_run_splits(layout.splits_dir, (training.get("config") or {}).get("dataset", "full"))
        splits = run.splits
        for entry in replicates_from_metadata(training):
            result = evaluate_checkpoint(
                entry["checkpoint_path"], splits.train, splits.test, samplers, n_samples=config.n_samples,
                seed=config.seed, k=config.k, device=compute.resolve_device(context.log),
                batch_size=config.batch_size, expected_sha256=entry.get("sha256"),
                val=splits.val if config.references else None,
                sentences=_sentences(run, config.n_sentences), n_sentences=config.n_sentences,
                reference_cache=layout.reference_cache_dir if config.reuse_references else None,
            )
            results_path = layout.evaluation_dir(result.run_name) / EVALUATION_JSON
            write_json(results_path, {"partition": partition, **result.as_dict()})
            evaluated.append((entry, result, results_path))
    except (CheckpointError, DataError, ValueError) as exc:
        raise dg.Failure(description=f"evaluation of {partition}: {exc}") from exc

    _, result, results_path = evaluated[0]
    study = evaluation_study_metadata(training["config"], [
        (entry, {key: value for key, value in r.primary.metrics.items() if key != "n"}) for entry, r, _ in evaluated])
    from flow_pipeline.plots import plot_evaluation  # matplotlib costs ~0.7 s: only in the process that draws

    figure = plot_evaluation(result.primary_samples, splits.test, result.primary.metrics,
                             f"{partition} ({result.primary.sampler})", config.seed)
    figure_path = results_path.with_name(EVALUATION_PNG)
    figure.save(figure_path)
    primary = result.primary.metrics
    context.log.info(f"{partition} ({result.primary.sampler}, n={result.n}): kid={primary['kid']:.4g} ± "
                     f"{primary['kid_se']:.2g} fd_inf={primary['fd_inf']:.4g} "
                     f"variance_ratio={primary['variance_ratio']:.3f} coverage={primary['coverage']:.3f}"
                     + (f" [{result.n_note}]" if result.n_note else ""))
    gaussian_full = next((ref.metrics for ref in result.references if ref.name == "gaussian-full"), None)
    study_values = {key: dg.MetadataValue.json(value) if isinstance(value, (dict, list)) else value
                    for key, value in study.items()}
    figure_metadata = {
        "samples_figure": dg.MetadataValue.md(figure.markdown(f"generated vs real samples of {partition}")),
        "samples_figure_png": dg.MetadataValue.path(str(figure_path)),
    }
    return dg.MaterializeResult(metadata={**evaluation_metadata(result, results_path), **study_values,
                                          **figure_metadata},
                                check_results=[beats_gaussian_full(primary, gaussian_full, PRIMARY_METRIC)])


def _history(checkpoint_path: str | None) -> tuple[list[dict], str]:
    """(per-epoch history, note): a checkpoint that no longer reads gives no curve and says why in the note."""
    if not checkpoint_path:
        return [], "no checkpoint path in the evaluation metadata"
    try:
        return list(load_checkpoint(checkpoint_path).get("history", [])), ""
    except CheckpointError as exc:
        return [], f"no loss curve: {exc}"


class ReportConfig(dg.Config):
    baseline: str = Field(default=DEFAULT_BASELINE, description="the row every other row is compared with: a run "
                          "identity as printed in the report, or a partition key (then its row with the default "
                          "training config, else its newest)")


@dg.asset(
    deps=[dg.AssetDep(evaluation, partition_mapping=dg.AllPartitionMapping())],
    group_name="evaluation",
    owners=OWNERS,
    kinds={"pytorch"},
)
def ablation_report(context: dg.AssetExecutionContext, config: ReportConfig,
                    artifacts: ArtifactsResource) -> dg.MaterializeResult:
    """All evaluated run identities side by side, one row per identity (config minus seed; replicates pooled as
    mean and 95% t-interval, never across identities), with the reference rows (held-out real, gaussian-full,
    gaussian-diag): a Markdown table (arch, flow, data, size, params, FLOPs, steps, best val loss and its ratio to
    the zero predictor, ranking KID, KID ± se and CI, FD∞, variance and norm ratios, precision, recall, density,
    coverage, memorisation, train copies, train time) sorted by the ranking metric, with models that do not beat
    gaussian-full marked; a statistics section comparing every row with the baseline row (paired or Welch t,
    Holm-corrected); the same rows as CSV, and a PNG with every row's validation-loss curve (on the zero-predictor
    scale) and a bar chart of the ranking metric."""
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=evaluation.key),
                                                      limit=10_000).records  # newest first
    evaluations = [(record.partition_key, plain_metadata(record)) for record in records]
    rows, curves, newest = [], {}, {}
    for study in study_rows(evaluations):
        partition = study["partition"]
        newest.setdefault(partition, study["evaluation"])
        training = latest_metadata(context.instance, trained_checkpoint.key, partition) or {}
        notes = [] if training else ["no trained_checkpoint materialization"]
        # The partition's newest training, if it is of this identity (or says nothing of it), must be the one
        # evaluated; a newer one of another identity is another row's business.
        same_identity = "config" not in training or identity_key(training["config"]) == study["identity"]
        shas = {entry["sha256"] for entry in study["replicates"]}
        if training and same_identity and {e.get("sha256") for e in replicates_from_metadata(training)} != shas:
            notes.append("trained again since this evaluation: re-materialize evaluation")
        history, curve_note = _history(study["replicates"][0]["checkpoint_path"])
        zero_loss = study["zero_predictor_loss"]
        curves.setdefault(study["identity"], [{**entry, "val_loss": entry["val_loss"] / zero_loss,
                                               "ema_val_loss": entry["ema_val_loss"] / zero_loss} for entry in history])
        notes += [curve_note] if curve_note else []
        ablation = ablation_for(partition)
        pooled = {key: study[key] for key in study["per_seed"]}  # means over replicates replace the first's values
        rows.append(build_row(partition, ablation.arch, ablation.flow, {**study["evaluation"], **pooled}, study,
                              note="; ".join(notes), study=study))
    if not rows:
        raise dg.Failure(description="ablation_report: no partition of evaluation is materialized yet; "
                         "materialize evaluation for at least one partition first")
    order = ablation_partitions.get_partition_keys()
    rows.sort(key=lambda row: (order.index(row["partition"]), row["identity"]))  # registry order, then identity
    losing = [row["partition"] for row in rows if row["note"].startswith(LOSES_TO_BASELINE)]
    baseline = pick_baseline(rows, config.baseline)
    add_comparisons(rows, baseline, PRIMARY_METRIC)
    statistics = statistics_markdown(sort_rows(rows), baseline, PRIMARY_METRIC)
    files = write_report(rows + reference_rows(newest), curves, artifacts.layout.reports_dir, statistics=statistics)
    context.log.info(f"ablation report over {len(rows)} run identities in {artifacts.layout.reports_dir}")
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(files.markdown + "\n\n" + files.figure.markdown("ablation report figure")),
        "primary_metric": PRIMARY_METRIC,
        "best_partition": next(row["partition"] for row in files.rows if not row["partition"].startswith("reference")),
        "n_partitions": len({row["partition"] for row in rows}),
        "n_rows": len(rows),
        "identities": dg.MetadataValue.json([row["identity"] for row in files.rows if "identity" in row]),
        "baseline": baseline["identity"] if baseline else "none",
        "verdicts": dg.MetadataValue.json({row["identity"]: row["vs_baseline"] for row in rows}),
        "not_beating_gaussian_full": dg.MetadataValue.json(losing),
        "partitions": dg.MetadataValue.json([row["partition"] for row in files.rows
                                             if not row["partition"].startswith("reference")]),
        "figure_png": dg.MetadataValue.path(str(files.png_path)),
        "csv_path": dg.MetadataValue.path(str(files.csv_path)),
        "markdown_path": dg.MetadataValue.path(str(files.markdown_path)),
    })
