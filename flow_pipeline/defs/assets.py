"""The pipeline's assets: thin wrappers that validate config, call the pure code and report metadata."""


import json
import math
import sys
from pathlib import Path

import dagster as dg
import torch
from pydantic import ValidationError

from flow_pipeline.ablations import PARTITION_KEYS
from flow_pipeline.core.data.normalization import load_normalizer
from flow_pipeline.config import TrainConfig, format_validation_error
from flow_pipeline.core.data import DataError
from flow_pipeline.core.data.split_store import load_run_splits
from flow_pipeline.core.run_identity import data_identity
from flow_pipeline.defs.data_assets import OWNERS, DatasetConfig, dataset_splits, normalization_stats  # noqa: F401
from flow_pipeline.defs.failures import (CONFIG, MISSING_INPUT, classify_training_failure, data_failure_kind,
                                         tagged_failure)
from flow_pipeline.defs.orphans import tag_run_host
from flow_pipeline.replicates import train_replicates
from flow_pipeline.defs.resources import ArtifactsResource, ComputeResource
from flow_pipeline.defs.run_config import TrainRunConfig
from flow_pipeline.defs.tracking import WandbResource
from flow_pipeline.artifacts import FAILURE_NAME, TrainJob

ablation_partitions = dg.StaticPartitionsDefinition(PARTITION_KEYS)
GPU_POOL = "gpu"  # limits concurrent trainings; its limit is the number of GPUs (1 on a CPU machine)
DIM_NOT_YET_KNOWN = 2**31 - 1  # the probe's embedding dimension: no dimension-bounded field fails on it
# Run tag read by dagster-k8s's K8sRunLauncher: extra Kubernetes config for the run's pod.
K8S_CONFIG_TAG = "dagster-k8s/config"


def k8s_gpu_run_tags(gpus: int) -> dict[str, str]:
    """Run tags that make K8sRunLauncher give the run's pod ``gpus`` NVIDIA GPUs (for extended resources the limit
    is also the request) and tolerate the usual ``nvidia.com/gpu`` taint of GPU nodes. Put them on the job that
    trains, or on a launch, with the same N as ``gpus_per_run``; other launchers ignore them."""
    if gpus < 1:
        raise ValueError(f"gpus: must be at least 1, got {gpus}")
    config = {
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}},
        "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    }
    return {K8S_CONFIG_TAG: json.dumps(config)}


def training_command(job_path: Path, processes: int) -> list[str]:
    """The training process: one ``python -m flow_pipeline.train``, or ``processes`` of them under torchrun
    (``--standalone``: a single-node rendezvous on a free local port, so concurrent runs never collide)."""
    if processes == 1:
        return [sys.executable, "-m", "flow_pipeline.train", "--job", str(job_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "flow_pipeline.train", "--job", str(job_path)]


def gpu_pool_limit(instance: dg.DagsterInstance) -> int:
    """How many trainings may run at once: the ``gpu`` pool's limit on this instance (1 when none is set)."""
    try:
        slots = instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count
    except Exception:  # an instance storage without pools
        return 1
    return max(1, slots or 1)


def _visible_gpus(compute: ComputeResource) -> int:
    """GPUs the training processes will see: the compute resource's CUDA_VISIBLE_DEVICES list, else all here."""
    if compute.visible_devices:
        return len([device for device in compute.visible_devices.split(",") if device.strip()])
    return torch.cuda.device_count()


def _read_failure(run_dir: Path) -> tuple[str, str]:
    """(failure kind, message) of a training process that failed, from its ``failure.json``."""
    path = run_dir / FAILURE_NAME
    failure = json.loads(path.read_text()) if path.exists() else None
    kind = classify_training_failure(failure)
    if failure is None:
        return kind, "the training process exited without a failure report: killed (SIGKILL, OOM killer) or crashed"
    return kind, f"{failure['error']}: {failure['message']}"


@dg.asset(
    partitions_def=ablation_partitions,
    deps=[normalization_stats],
    pool=GPU_POOL,
    group_name="training",
    owners=OWNERS,
    kinds={"pytorch", "wandb"},
)
def trained_checkpoint(
    context: dg.AssetExecutionContext,
    config: TrainRunConfig,
    artifacts: ArtifactsResource,
    compute: ComputeResource,
    wandb: WandbResource,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """Flow-matching model of one ablation partition ({arch}-{flow}), trained in its own process via Dagster Pipes;
    best.pt (EMA selected on validation loss) with its sha256, training metadata and the tracking link."""
    layout = artifacts.layout
    tag_run_host(context)
    train_config, stats_path = _resolve_training(context, config, layout, compute)
    result = train_replicates(
        train_config, config.replicates, layout.run_dir,
        lambda replicate: _train_one(context, config, replicate, stats_path, layout, compute, wandb,
                                     pipes_subprocess_client),
        lambda message: context.log.info(f"{context.partition_key}: {message}"))
    # The first replicate's values stay at the top level (one-replicate readers keep working); the list has all.
    return dg.MaterializeResult(metadata={**_typed(result.first),
                                          **{key: _typed_value(value) for key, value in result.summary.items()}})


def _resolve_training(context: dg.AssetExecutionContext, config: TrainRunConfig, layout,
                      compute: ComputeResource) -> tuple[TrainConfig, Path]:
    """The validated training config of the partition and its normalisation statistics file; a tagged Failure
    (config, data or missing input) when either is not usable."""
    partition = context.partition_key
    try:
        device = compute.resolve_device(context.log)
        # Every field validated before any data is read; those bounded by the data's dimension (principal_dims)
        # again below, once the statistics say what it is.
        probe = config.to_train_config(partition, DIM_NOT_YET_KNOWN, device)
        try:
            # A subset the splits lack: names the ones they have.
            train_rows = load_run_splits(layout.splits_dir, probe.dataset).splits.train.shape[0]
        except DataError as exc:
            raise tagged_failure(context, data_failure_kind(exc), f"partition {partition}: {exc}") from exc
        stats_path = layout.stats_path(probe.dataset, probe.normalization)
        if not stats_path.exists():
            raise tagged_failure(context, MISSING_INPUT, f"normalization stats for dataset={probe.dataset!r}, "
                                 f"normalization={probe.normalization!r} not found at {stats_path}: materialize "
                                 f"normalization_stats (it writes one file per training subset the splits hold)")
        train_config = config.to_train_config(partition, load_normalizer(stats_path).dim, device, train_rows)
        if train_config.batch_size % config.gpus_per_run:
            raise ValueError(f"batch_size: {train_config.batch_size} is not a multiple of gpus_per_run="
                             f"{config.gpus_per_run} (every process takes an equal block of each batch)")
        if train_config.device.startswith("cuda") and _visible_gpus(compute) < config.gpus_per_run:
            raise ValueError(f"gpus_per_run: {config.gpus_per_run} GPUs requested, {_visible_gpus(compute)} visible")
    except ValidationError as exc:
        raise tagged_failure(context, CONFIG, f"partition {partition}: {format_validation_error(exc)}") from exc
    except ValueError as exc:
        raise tagged_failure(context, CONFIG, f"partition {partition}: {exc}") from exc
    return train_config, stats_path


def _typed_value(value):
    if isinstance(value, (list, dict)):
        return dg.MetadataValue.json(value)
    if isinstance(value, float) and math.isnan(value):
        return dg.MetadataValue.float(value)
    return value


def _typed(metadata: dict) -> dict:
    """Plain values (result.json) or Dagster metadata values (a Pipes report) -> Dagster metadata values."""
    kinds = {"checkpoint_path": dg.MetadataValue.path, "loss_curve_png": dg.MetadataValue.path,
             "loss_curve": dg.MetadataValue.md, "wandb_url": dg.MetadataValue.url}
    return {key: value if isinstance(value, dg.MetadataValue) else kinds.get(key, _typed_value)(value)
            for key, value in metadata.items()}


def _train_one(context, config: TrainRunConfig, train_config: TrainConfig, stats_path: Path, layout,
               compute: ComputeResource, wandb: WandbResource,
               pipes_subprocess_client: dg.PipesSubprocessClient) -> dict:
    """Train one replicate in its own process via Pipes; its reported materialization metadata."""
    partition = context.partition_key
    run_dir = layout.run_dir(train_config.run_name)
    job = TrainJob(
        config=train_config.model_dump(),
        splits_dir=str(layout.splits_dir),
        stats_path=str(stats_path),
        data_identity=data_identity(train_config.dataset, train_config.normalization, stats_path),
        run_dir=str(run_dir),
        partition_key=partition,
        tracking=wandb.job_settings(train_config, partition, layout.wandb_dir),
    )
    threads = compute.threads(gpu_pool_limit(context.instance), config.gpus_per_run)
    job_path = job.save()
    (run_dir / FAILURE_NAME).unlink(missing_ok=True)  # an earlier attempt's report must not explain this one
    context.log.info(f"training {train_config.run_name} on {train_config.device} "
                     f"({config.gpus_per_run} process(es), {threads} thread(s) each) in {run_dir}")
    try:
        # Under torchrun every rank inherits the Pipes environment; rank 0 alone opens Pipes (see train.main).
        invocation = pipes_subprocess_client.run(
            context=context,
            command=training_command(job_path, config.gpus_per_run),
            env={**compute.environment(threads), **wandb.environment()},
        )
    except Exception as exc:  # the process failed: report its own error, not Pipes' exit-code message
        kind, message = _read_failure(run_dir)
        raise tagged_failure(context, kind, f"partition {partition} ({train_config.run_name}): {message}") from exc
    return dict(invocation.get_materialize_result().metadata)
