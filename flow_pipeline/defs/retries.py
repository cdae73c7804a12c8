"""Recovery, part 1: the schedule ``retry_failed_training`` re-runs failed training partitions.

Hourly by default, every partition of ``trained_checkpoint`` whose latest attempt failed for a reason a retry can fix
(see :mod:`flow_pipeline.defs.failures`) is re-run with ``resume: true`` and the failed run's own training config,
until it has had ``max_attempts`` attempts since its last materialization. The decision is the pure function
:func:`plan_retries`; the schedule only reads its inputs from the instance and explains every partition it leaves
alone. Part 2, runs whose worker died, is :mod:`flow_pipeline.defs.orphans`.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import dagster as dg

from flow_pipeline.defs.assets import ablation_partitions, trained_checkpoint
from flow_pipeline.defs.failures import FAILURE_KIND_TAG, retry_verdict
from flow_pipeline.defs.materializations import latest_materialization

RERUN_CRON_ENV = "FLOW_PIPELINE_RERUN_CRON"
MAX_ATTEMPTS_ENV = "FLOW_PIPELINE_MAX_ATTEMPTS"
DEFAULT_RERUN_CRON = "0 * * * *"
DEFAULT_MAX_ATTEMPTS = 3

PARTITION_TAG = "dagster/partition"
ATTEMPT_TAG = "flow_pipeline/attempt"
RETRAIN_JOB_NAME = "retrain_trained_checkpoint"

Status = dg.AssetPartitionStatus

# The training already runs in its own process (Pipes): a step subprocess per run would only add a Python start-up.
retrain_job = dg.define_asset_job(
    RETRAIN_JOB_NAME,
    selection=dg.AssetSelection.assets(trained_checkpoint),  # includes the asset's checks
    executor_def=dg.in_process_executor,
    description="Train one partition of trained_checkpoint (and run its checks); used by the retry schedule.",
)


# --- settings ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrySettings:
    """cron: when the schedule looks for failed partitions; max_attempts: runs per partition (the first included)
    before it gives up, counted since the partition's last materialization."""

    cron: str = DEFAULT_RERUN_CRON
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


def retry_settings_from_env(environ: Mapping[str, str]) -> RetrySettings:
    """Settings from FLOW_PIPELINE_RERUN_CRON and FLOW_PIPELINE_MAX_ATTEMPTS (unset or empty: the defaults)."""
    cron = environ.get(RERUN_CRON_ENV, "").strip() or DEFAULT_RERUN_CRON
    raw = environ.get(MAX_ATTEMPTS_ENV, "").strip()
    if not raw:
        return RetrySettings(cron=cron)
    try:
        max_attempts = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_ATTEMPTS_ENV}={raw!r}: not an integer") from None
    if max_attempts < 1:
        raise ValueError(f"{MAX_ATTEMPTS_ENV}={raw!r}: must be at least 1 (the first run is attempt 1)")
    return RetrySettings(cron=cron, max_attempts=max_attempts)


# --- the decision ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    partition: str
    attempt: int  # the number the new run gets; the partition's first run was attempt 1


@dataclass
class RetryPlan:
    retries: list[Retry] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # partition -> why no run is requested

    def explain(self) -> str:
        """One line per reason, e.g. ``in progress: dit-fm`` (partitions grouped by reason)."""
        by_reason: dict[str, list[str]] = {}
        for partition, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(partition)
        return "\n".join(f"{reason}: {', '.join(partitions)}" for reason, partitions in by_reason.items())


def plan_retries(statuses: Mapping[str, Status | None], attempts: Mapping[str, int], max_attempts: int,
                 failure_kinds: Mapping[str, str | None] | None = None) -> RetryPlan:
    """Which partitions to re-run, and why each other one is left alone.

    statuses: partition -> its status (``get_status_by_partition``; None: never materialized).
    attempts: partition -> attempts made since its last materialization, the first run included (missing: 1).
    failure_kinds: partition -> the failure kind tag of its latest failed run (missing or None: untagged, retried).
    A FAILED partition is retried while attempts < max_attempts, unless its failure is one a retry cannot fix
    (:data:`flow_pipeline.defs.failures.NOT_RETRIED`); nothing else is ever retried.
    """
    plan, failure_kinds = RetryPlan(), failure_kinds or {}
    for partition, status in statuses.items():
        if status == Status.FAILED:
            made = max(1, attempts.get(partition, 1))
            not_retried = retry_verdict(failure_kinds.get(partition))
            if not_retried:
                plan.skipped[partition] = f"failed, not retried ({not_retried})"
            elif made < max_attempts:
                plan.retries.append(Retry(partition, made + 1))
            else:
                plan.skipped[partition] = f"failed, gave up after {made} of {max_attempts} attempts"
        elif status == Status.IN_PROGRESS:
            plan.skipped[partition] = "in progress"
        elif status == Status.MATERIALIZED:
            plan.skipped[partition] = "materialized (latest attempt succeeded)"
        else:
            plan.skipped[partition] = "never materialized"
    return plan


# --- reading the instance ----------------------------------------------------------------------------------------


def last_materialization_time(instance: dg.DagsterInstance, partition: str) -> float | None:
    record = latest_materialization(instance, trained_checkpoint.key, partition)
    return None if record is None else record.timestamp


def attempts_since_materialization(instance: dg.DagsterInstance, partition: str) -> int:
    """The highest ``flow_pipeline/attempt`` tag among the partition's runs since its last materialization;
    1 when no retry was made yet (the first run carries no tag)."""
    since = last_materialization_time(instance, partition)
    runs = instance.get_runs(filters=dg.RunsFilter(
        tags={PARTITION_TAG: partition},
        created_after=None if since is None else datetime.fromtimestamp(since, tz=timezone.utc),
    ))
    return max([1, *(int(run.tags[ATTEMPT_TAG]) for run in runs if run.tags.get(ATTEMPT_TAG, "").isdigit())])


def latest_attempt(instance: dg.DagsterInstance, partition: str) -> dg.DagsterRun | None:
    """The run that made the latest attempt at the partition (None if there was none)."""
    planned = instance.get_latest_planned_materialization_info(trained_checkpoint.key, partition)
    return instance.get_run_by_id(planned.run_id) if planned else None


def failed_training_config(instance: dg.DagsterInstance, partition: str) -> dict:
    """The ``trained_checkpoint`` op config of the run that made the latest attempt at the partition ({} when that
    run used the defaults): a resume must use the same config, or it would train another run directory."""
    run = latest_attempt(instance, partition)
    if run is None:
        return {}
    return dict(run.run_config.get("ops", {}).get(trained_checkpoint.op.name, {}).get("config", {}))


def failure_kind(instance: dg.DagsterInstance, partition: str) -> str | None:
    """The failure kind tag of the partition's latest attempt (None: untagged)."""
    run = latest_attempt(instance, partition)
    return run.tags.get(FAILURE_KIND_TAG) if run is not None else None


def retry_run_request(retry: Retry, config: dict) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{retry.partition}-attempt-{retry.attempt}",
        partition_key=retry.partition,
        run_config={"ops": {trained_checkpoint.op.name: {"config": {**config, "resume": True}}}},
        tags={ATTEMPT_TAG: str(retry.attempt)},
    )


def build_retry_schedule(settings: RetrySettings) -> dg.ScheduleDefinition:
    """The schedule of this module, running on ``settings.cron`` (started by default)."""

    def retry_failed_training(context: dg.ScheduleEvaluationContext):
        instance = context.instance
        partitions = ablation_partitions.get_partition_keys()
        statuses = instance.get_status_by_partition(trained_checkpoint.key, partitions, ablation_partitions) or {}
        statuses = {partition: statuses.get(partition) for partition in partitions}
        attempts = {partition: attempts_since_materialization(instance, partition)
                    for partition, status in statuses.items() if status == Status.FAILED}
        kinds = {partition: failure_kind(instance, partition) for partition in attempts}
        plan = plan_retries(statuses, attempts, settings.max_attempts, kinds)
        if not plan.retries:
            yield dg.SkipReason(f"no failed partition of trained_checkpoint to retry.\n{plan.explain()}")
            return
        context.log.info(f"retrying {', '.join(f'{r.partition} (attempt {r.attempt})' for r in plan.retries)}; "
                         f"left alone:\n{plan.explain()}")
        for retry in plan.retries:
            yield retry_run_request(retry, failed_training_config(instance, retry.partition))

    try:
        return dg.ScheduleDefinition(
            name="retry_failed_training",
            cron_schedule=settings.cron,
            job=retrain_job,
            execution_fn=retry_failed_training,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"Re-run failed trained_checkpoint partitions with resume: true, at most "
                        f"{settings.max_attempts} attempts each (cron from {RERUN_CRON_ENV}, cap from "
                        f"{MAX_ATTEMPTS_ENV}); failures a retry cannot fix (bad config or data, divergence) are "
                        "left alone, each named with its reason in the tick.",
        )
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(f"{RERUN_CRON_ENV}={settings.cron!r} is not a valid cron string: {exc}") from exc
