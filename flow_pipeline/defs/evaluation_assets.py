"""Evaluation of every trained partition and the cross-partition ablation report (thin wrappers over
:mod:`flow_pipeline.evaluation` and :mod:`flow_pipeline.report`)."""

import dagster as dg
from pydantic import Field

from flow_pipeline.ablations import ablation_for
from flow_pipeline.artifacts import write_json
from flow_pipeline.core.checkpoint import CheckpointError, load_checkpoint
from flow_pipeline.core.sources import DataError, load_saved_splits
from flow_pipeline.defs.assets import OWNERS, ablation_partitions, trained_checkpoint
from flow_pipeline.defs.resources import ArtifactsResource, ComputeResource
from flow_pipeline.evaluation import ADAPTIVE_SOLVERS, SamplerSpec, evaluate_checkpoint
from flow_pipeline.report import PRIMARY_METRIC, build_row, sampler_table, write_report

EVALUATION_JSON = "evaluation.json"


class EvaluationConfig(dg.Config):
    """How a partition's EMA model is sampled and scored."""

    solver: str = Field(default="euler", description="ODE solver of the headline numbers: euler, midpoint, rk4, dopri5")
    steps: int = Field(default=50, description="fixed steps of that solver (ignored by the adaptive dopri5)")
    extra_samplers: list[str] = Field(
        default_factory=list, description="more settings to compare, e.g. ['midpoint:25', 'rk4:10', 'dopri5']"
    )
    n_samples: int = Field(default=1000, description="cap on the number of samples: n = min(test rows, n_samples)")
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
        return specs


def latest_metadata(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None = None) -> dict | None:
    """Plain values of the latest materialization's metadata of one partition (``None``: an unpartitioned asset),
    or None if it was never materialized."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition is not None else None),
        limit=1,
    ).records
    if not records:
        return None
    return {key: value.value for key, value in records[0].asset_materialization.metadata.items()}


@dg.asset(
    partitions_def=ablation_partitions,
    deps=[trained_checkpoint],
    group_name="evaluation",
    owners=OWNERS,
    kinds={"pytorch"},
)
def evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    artifacts: ArtifactsResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """Sample quality of one partition's EMA model: ODE samples in raw embedding space against the held-out test
    split (FD beside the real-vs-real FD floor, precision/recall/density/coverage, memorisation of train and copies of any train row, norms),
    for the configured sampler and any extra sampler settings; results also saved as JSON."""
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
    try:
        splits = load_saved_splits(layout.splits_dir)
        result = evaluate_checkpoint(
            training["checkpoint_path"], splits.train, splits.test, samplers, n_samples=config.n_samples,
            seed=config.seed, k=config.k, device=compute.resolve_device(context.log), batch_size=config.batch_size,
            expected_sha256=training.get("sha256"),
        )
    except (CheckpointError, DataError, ValueError) as exc:
        raise dg.Failure(description=f"evaluation of {partition}: {exc}") from exc

    results_path = layout.evaluation_dir(result.run_name) / EVALUATION_JSON
    write_json(results_path, {"partition": partition, **result.as_dict()})
    primary = result.primary
    context.log.info(f"{partition} ({primary.sampler}): fd={primary.metrics['fd']:.4g} "
                     f"floor={primary.metrics['fd_floor']:.4g} precision={primary.metrics['precision']:.3f} "
                     f"recall={primary.metrics['recall']:.3f}")
    return dg.MaterializeResult(metadata={
        **{name: float(value) for name, value in primary.metrics.items() if name != "n"},
        "sampler": primary.sampler,
        "nfe": primary.nfe,
        "seconds": round(primary.seconds, 3),
        "n": result.n,
        "samplers": dg.MetadataValue.md(sampler_table(result.as_dict()["results"])),
        "run_name": result.run_name,
        "checkpoint_path": dg.MetadataValue.path(result.checkpoint_path),
        "checkpoint_sha256": result.sha256,
        "results_path": dg.MetadataValue.path(str(results_path)),
    })


def _history(checkpoint_path: str | None) -> tuple[list[dict], str]:
    """(per-epoch history, note): a checkpoint that no longer reads gives no curve and says why in the note."""
    if not checkpoint_path:
        return [], "no checkpoint path in the evaluation metadata"
    try:
        return list(load_checkpoint(checkpoint_path).get("history", [])), ""
    except CheckpointError as exc:
        return [], f"no loss curve: {exc}"


@dg.asset(
    deps=[dg.AssetDep(evaluation, partition_mapping=dg.AllPartitionMapping())],
    group_name="evaluation",
    owners=OWNERS,
    kinds={"pytorch"},
)
def ablation_report(context: dg.AssetExecutionContext, artifacts: ArtifactsResource) -> dg.MaterializeResult:
    """All evaluated partitions side by side: a Markdown table (arch, flow, params, best val loss, FD and its floor,
    precision, recall, coverage, memorisation, train copies, train time) sorted by FD / floor, the same rows as CSV, and a PNG
    with every partition's validation-loss curve and a bar chart of FD / floor."""
    rows, curves = [], {}
    for partition in ablation_partitions.get_partition_keys():
        evaluated = latest_metadata(context.instance, evaluation.key, partition)
        if evaluated is None:
            continue
        training = latest_metadata(context.instance, trained_checkpoint.key, partition)
        notes = []
        if training is None:
            training = {}
            notes.append("no trained_checkpoint materialization")
        elif training.get("sha256") != evaluated.get("checkpoint_sha256"):
            notes.append("trained again since this evaluation: re-materialize evaluation")
        curves[partition], curve_note = _history(evaluated.get("checkpoint_path"))
        notes += [curve_note] if curve_note else []
        ablation = ablation_for(partition)
        rows.append(build_row(partition, ablation.arch, ablation.flow, evaluated, training, note="; ".join(notes)))
    if not rows:
        raise dg.Failure(description="ablation_report: no partition of evaluation is materialized yet; "
                         "materialize evaluation for at least one partition first")
    files = write_report(rows, curves, artifacts.layout.reports_dir)
    context.log.info(f"ablation report over {len(rows)} partitions in {artifacts.layout.reports_dir}")
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(files.markdown),
        "primary_metric": PRIMARY_METRIC,
        "best_partition": files.rows[0]["partition"],
        "n_partitions": len(rows),
        "partitions": dg.MetadataValue.json([row["partition"] for row in files.rows]),
        "figure_png": dg.MetadataValue.path(str(files.png_path)),
        "csv_path": dg.MetadataValue.path(str(files.csv_path)),
        "markdown_path": dg.MetadataValue.path(str(files.markdown_path)),
    })
