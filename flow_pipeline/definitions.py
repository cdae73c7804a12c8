"""The one ``dg.Definitions`` of the project: ``dagster dev`` / ``dagster asset materialize -m flow_pipeline.definitions``."""

import os

import dagster as dg

from flow_pipeline.defs.assets import dataset_splits, normalization_stats, trained_checkpoint
from flow_pipeline.defs.checks import trained_checkpoint_checks
from flow_pipeline.defs.evaluation_assets import ablation_report, evaluation
from flow_pipeline.defs.resources import ArtifactsResource, ComputeResource, default_root
from flow_pipeline.defs.orphans import fail_orphaned_runs
from flow_pipeline.defs.pipes_reader import WholeLineTempFileMessageReader
from flow_pipeline.defs.pool_claims import install as serialise_pool_claims
from flow_pipeline.defs.pool_wait import install as sleep_while_waiting_for_a_pool_slot
from flow_pipeline.defs.retries import (build_evaluation_retry_schedule, build_retry_schedule, reevaluate_job,
                                        retrain_job, retry_settings_from_env)
from flow_pipeline.defs.tracking import WandbResource

sleep_while_waiting_for_a_pool_slot()  # Dagster 1.13's run worker spins while it waits (see defs/pool_wait.py)
serialise_pool_claims()  # Dagster 1.13 lets simultaneous claims share one slot (see defs/pool_claims.py)

# FLOW_PIPELINE_RERUN_CRON / FLOW_PIPELINE_MAX_ATTEMPTS: when failed partitions are retried, and how often.
retry_settings = retry_settings_from_env(os.environ)

defs = dg.Definitions(
    assets=[dataset_splits, normalization_stats, trained_checkpoint, evaluation, ablation_report],
    asset_checks=trained_checkpoint_checks,
    jobs=[retrain_job, reevaluate_job],
    schedules=[build_retry_schedule(retry_settings), build_evaluation_retry_schedule(retry_settings)],
    sensors=[fail_orphaned_runs],
    # Training already runs in its own process (Pipes); a process per step would only add Python start-ups.
    executor=dg.in_process_executor,
    resources={
        "artifacts": ArtifactsResource(root=default_root()),
        "compute": ComputeResource(),
        "wandb": WandbResource(),
        # Dagster's own file reader can parse half a line and then drop every later message of the run.
        "pipes_subprocess_client": dg.PipesSubprocessClient(message_reader=WholeLineTempFileMessageReader()),
    },
)
