"""Evaluation of every trained partition and the cross-partition ablation report (thin wrappers over
:mod:`flow_pipeline.evaluation` and :mod:`flow_pipeline.evaluation.report`)."""

from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field

from flow_pipeline.core.metrics.ranking import LIKELIHOOD_RULE, METRIC_SPACES
from flow_pipeline.defs.assets import OWNERS, ablation_partitions, trained_checkpoint
from flow_pipeline.defs.checks import EVALUATION_CHECK_SPECS, beats_gaussian_full
from flow_pipeline.defs.failures import CONFIG, MISSING_INPUT, evaluation_failure_kind, tagged_failure
from flow_pipeline.defs.materializations import latest_metadata, plain_metadata
from flow_pipeline.defs.orphans import tag_run_host
from flow_pipeline.defs.resources import ArtifactsResource, ComputeResource
from flow_pipeline.core.likelihood import DEFAULT_PROBES, DEFAULT_STEPS, DIVERGENCES
from flow_pipeline.evaluation.evaluate import LIKELIHOOD_ROWS, EvaluationSettings
from flow_pipeline.evaluation.partition import PartitionEvaluation, evaluate_partition
from flow_pipeline.evaluation.results import SAMPLES_PER_DIM, Evaluation
from flow_pipeline.evaluation.samplers import ADAPTIVE_SOLVERS, DOPRI5_ATOL, DOPRI5_RTOL, SamplerSpec
from flow_pipeline.evaluation.report import PRIMARY_METRIC, REFERENCE_METRIC_KEYS, reference_table, sampler_table
from flow_pipeline.evaluation.sentences import sentences_markdown
from flow_pipeline.evaluation.summary import evaluation_summary, report_summary
from flow_pipeline.evaluation.study_report import DEFAULT_BASELINE

if TYPE_CHECKING:
    from flow_pipeline.evaluation.ablation_report import AblationReport


class EvaluationConfig(dg.Config):
    """How a partition's EMA model is sampled and scored."""

    solver: str = Field(default="dopri5", description=f"ODE solver of the headline numbers: dopri5 (adaptive, rtol "
                        f"{DOPRI5_RTOL:g}, atol {DOPRI5_ATOL:g}), euler, midpoint, rk4")
    steps: int = Field(default=50, description="fixed steps of that solver (ignored by the adaptive dopri5)")
    guidance: str = Field(default="likelihood", description="guidance of a linear_skip model's primary sampler, "
                          "which its likelihood is scored with too: 'likelihood' (the w in 0, 0.5, ..., 1.5 whose "
                          "model gives the val rows the highest likelihood; 0 is the model's own Gaussian), 'auto' "
                          "(w >= 1 matching the val rows' variance over the network's coordinates, the training "
                          "rows' below 100 val rows; w = 1 for a model that is not under-dispersed or has no skip "
                          "path), a number w (network part x w), or 1 for the model as trained")
    extra_samplers: list[str] = Field(
        default_factory=list, description="more settings to compare, each reported with its NFE, e.g. "
        "['euler:50', 'rk4:10', 'dopri5@1'] ('@W' / '@likelihood' / '@auto': that sampler's guidance; none: 1)"
    )
    n_samples: int = Field(default=SAMPLES_PER_DIM * 1024, description="cap on the number of samples: n = "
                           "min(test rows, n_samples); 5 x dim by default (FD and k-NN metrics are biased at n ~ dim)")
    references: bool = Field(default=True, description="also score held-out real val rows and the gaussian-full / "
                             "gaussian-diag / gaussian-mixture baselines with the same metrics, n and seed")
    reuse_references: bool = Field(default=True, description="read the reference rows from <root>/evaluation/"
                                   "references when an evaluation on the same rows, n, seed, k and metric code "
                                   "scored them already (they do not depend on the model); false: score them again")
    n_sentences: int = Field(default=5, ge=0, description="generated samples shown with their nearest train and "
                             "test sentences, when the splits carry sentences (<split>.jsonl)")
    seed: int = Field(default=0, description="seed of the starting noise and of the reference subsampling")
    k: int = Field(default=5, description="nearest neighbours of precision/recall/density/coverage")
    batch_size: int = Field(default=1024, description="rows integrated at once")
    likelihood_rows: int = Field(default=LIKELIHOOD_ROWS, ge=0, description="test rows whose held-out "
                                 "log-likelihood ranks the model (0: none); per-row scores need no n >= 5 x dim")
    likelihood_steps: int = Field(default=DEFAULT_STEPS, ge=1, description="RK4 steps of the probability-flow ODE")
    likelihood_divergence: str = Field(default="auto", description="'exact', 'hutchinson', or 'auto' (exact only "
                                       "where it costs no more than the probes)")
    likelihood_probes: int = Field(default=DEFAULT_PROBES, ge=2, description="Rademacher probes per row of the "
                                   "Hutchinson divergence (its standard error is reported as test_nll_se)")

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
            specs[0] = specs[0].with_guidance(self.guidance)
        except ValueError as exc:
            raise ValueError(f"guidance: {exc}") from exc
        return specs

    def settings(self) -> EvaluationSettings:
        """The sampling and scoring settings (:meth:`samplers` first; it raises ValueError naming the field)."""
        if self.likelihood_divergence not in DIVERGENCES:
            raise ValueError(f"likelihood_divergence: unknown value {self.likelihood_divergence!r}; valid: "
                             f"{', '.join(DIVERGENCES)}")
        options = {"steps": self.likelihood_steps, "divergence": self.likelihood_divergence,
                   "probes": self.likelihood_probes}
        return EvaluationSettings(self.samplers(), n_samples=self.n_samples, seed=self.seed, k=self.k,
                                  batch_size=self.batch_size, n_sentences=self.n_sentences,
                                  likelihood_rows=self.likelihood_rows, likelihood_options=options)


def evaluation_metadata(result: Evaluation, results_path) -> dict:
    """The materialization's metadata: the primary sampler's metrics (flat), where each metric is computed, the
    ranking rule, the sample-size note next to the numbers, and the reference rows (held-out real, baselines)."""
    primary = result.primary
    references = {ref.name: {key: ref.metrics.get(key) for key in REFERENCE_METRIC_KEYS} | {"n": ref.n}
                  | ({"note": ref.note} if ref.note else {}) for ref in result.references}
    metadata = {
        **{name: value if isinstance(value, str) else float(value) for name, value in primary.metrics.items()
           if name != "n"},
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
        "ranking_rule": LIKELIHOOD_RULE,
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
    metrics for held-out real val rows and the gaussian-full / gaussian-diag / gaussian-mixture baselines, and, when
    the splits carry sentences, the nearest train and test sentence of a few samples. Results also saved as JSON."""
    partition = context.partition_key
    tag_run_host(context)
    try:
        settings = config.settings()
    except ValueError as exc:
        raise tagged_failure(context, CONFIG, f"evaluation of {partition}: config: {exc}") from exc
    training = latest_metadata(context.instance, trained_checkpoint.key, partition)
    if training is None or "checkpoint_path" not in training:
        raise tagged_failure(context, MISSING_INPUT, f"evaluation of {partition}: no trained_checkpoint "
                             f"materialization with a checkpoint_path for this partition; materialize "
                             f"trained_checkpoint[{partition}] first")
    try:
        outcome = evaluate_partition(partition, training, artifacts.layout, settings, config.references,
                                     config.reuse_references, compute.resolve_device(context.log))
    except Exception as exc:  # every failure tagged with its kind, for the retry schedule
        raise tagged_failure(context, evaluation_failure_kind(exc), f"evaluation of {partition}: {exc}") from exc
    context.log.info(outcome.summary_line(partition))
    return dg.MaterializeResult(metadata=partition_metadata(partition, outcome),
                                check_results=[beats_gaussian_full(outcome.first.primary.metrics)])


def partition_metadata(partition: str, outcome: PartitionEvaluation) -> dict:
    """The evaluation materialization's metadata, the answer first: the summary (verdicts with intervals) and the
    samples figure, then the first replicate's keys (:func:`evaluation_metadata`) and the study values over every
    replicate, for scripts."""
    first = outcome.replicates[0]
    study_values = {key: dg.MetadataValue.json(value) if isinstance(value, (dict, list)) else value
                    for key, value in outcome.study.items()}
    return {
        "summary": dg.MetadataValue.md(evaluation_summary(partition, first.evaluation)),
        "samples_figure": dg.MetadataValue.md(outcome.figure.markdown(f"generated vs real samples of {partition}")),
        **evaluation_metadata(first.evaluation, first.results_path), **study_values,
        "samples_figure_png": dg.MetadataValue.path(str(outcome.figure_path)),
        **({"failed_replicates": dg.MetadataValue.json(outcome.failures)} if outcome.failures else {}),
    }


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
    gaussian-diag, gaussian-mixture): a Markdown table (arch, flow, data, size, params, FLOPs, steps, best val loss
    and its ratio to the zero predictor, ranking KID, KID ± se and CI, FD∞, variance and norm ratios, precision,
    recall, density, coverage, memorisation, train copies, train time) sorted by the ranking metric, with models that
    do not beat gaussian-full marked; a statistics section comparing every row with the baseline row (paired or Welch
    t, Holm-corrected); the same rows as CSV, and a PNG with every row's validation-loss curve (on the
    zero-predictor scale) and a bar chart of the ranking metric."""
    from flow_pipeline.evaluation.ablation_report import NothingToReport, build_ablation_report  # matplotlib

    tag_run_host(context)
    records = context.instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=evaluation.key),
                                                      limit=10_000).records  # newest first
    evaluations = [(record.partition_key, plain_metadata(record)) for record in records]
    try:
        report = build_ablation_report(
            evaluations, lambda partition: latest_metadata(context.instance, trained_checkpoint.key, partition),
            ablation_partitions.get_partition_keys(), config.baseline, artifacts.layout.reports_dir)
    except NothingToReport as exc:
        raise dg.Failure(description=f"ablation_report: {exc}") from exc
    except OSError as exc:  # a file that cannot be written (a full disk: disk_full), named in the message
        raise tagged_failure(context, evaluation_failure_kind(exc), f"ablation_report: {exc}") from exc
    context.log.info(f"ablation report over {len(report.rows)} run identities in {artifacts.layout.reports_dir}")
    return dg.MaterializeResult(metadata=report_metadata(report))


def report_metadata(report: "AblationReport") -> dict:
    """The ablation_report materialization's metadata (``report``: an
    :class:`~flow_pipeline.evaluation.ablation_report.AblationReport`)."""
    rows, files, baseline = report.rows, report.files, report.baseline
    return {
        "summary": dg.MetadataValue.md(report_summary(rows, baseline) + "\n\n"
                                       + files.figure.markdown("ablation report figure")),
        "report": dg.MetadataValue.md(files.markdown),
        "primary_metric": PRIMARY_METRIC,
        "best_partition": next(row["partition"] for row in files.rows if not row["partition"].startswith("reference")),
        "n_partitions": len({row["partition"] for row in rows}),
        "n_rows": len(rows),
        "identities": dg.MetadataValue.json([row["identity"] for row in files.rows if "identity" in row]),
        "baseline": baseline["identity"] if baseline else "none",
        "verdicts": dg.MetadataValue.json({row["identity"]: row["vs_baseline"] for row in rows}),
        "not_beating_gaussian_full": dg.MetadataValue.json(report.losing),
        "partitions": dg.MetadataValue.json([row["partition"] for row in files.rows
                                             if not row["partition"].startswith("reference")]),
        "figure_png": dg.MetadataValue.path(str(files.png_path)),
        "csv_path": dg.MetadataValue.path(str(files.csv_path)),
        "markdown_path": dg.MetadataValue.path(str(files.markdown_path)),
    }
