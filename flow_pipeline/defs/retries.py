"""Recovery, part 1: the schedules ``retry_failed_training`` and ``retry_failed_evaluation`` re-run failed partitions.

Hourly by default, every partition of ``trained_checkpoint`` (of ``evaluation``) whose latest attempt failed for a
reason a retry can fix (see :mod:`flow_pipeline.defs.failures`) is re-run with the failed run's own config (a training
with ``resume: true``), until it has had ``max_attempts`` attempts since its last materialization. A killed evaluation
is retried like a killed training; an evaluation waits while its partition's training is not materialized. The
decision is the pure function :func:`plan_retries`; the schedules only read its inputs from the instance and explain
every partition they leave alone. Part 2, runs whose worker died, is :mod:`flow_pipeline.defs.orphans`.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

import dagster as dg

from flow_pipeline.defs.assets import ablation_partitions, trained_checkpoint
from flow_pipeline.defs.evaluation_assets import evaluation
from flow_pipeline.defs.failures import FAILURE_KIND_TAG, retry_verdict
from flow_pipeline.defs.materializations import latest_materialization

RERUN_CRON_ENV = "FLOW_PIPELINE_RERUN_CRON"
MAX_ATTEMPTS_ENV = "FLOW_PIPELINE_MAX_ATTEMPTS"
DEFAULT_RERUN_CRON = "0 * * * *"
DEFAULT_MAX_ATTEMPTS = 3

PARTITION_TAG = "dagster/partition"
ATTEMPT_TAG = "flow_pipeline/attempt"  # on a training retry: its attempt number
EVALUATION_ATTEMPT_TAG = "flow_pipeline/evaluation_attempt"  # on an evaluation retry (counted apart from training's)
RETRAIN_JOB_NAME = "retrain_trained_checkpoint"
REEVALUATE_JOB_NAME = "reevaluate_evaluation"

Status = dg.AssetPartitionStatus

# The training already runs in its own process (Pipes): a step subprocess per run would only add a Python start-up.
retrain_job = dg.define_asset_job(
    RETRAIN_JOB_NAME,
    selection=dg.AssetSelection.assets(trained_checkpoint),  # includes the asset's checks
    executor_def=dg.in_process_executor,
    description="Train one partition of trained_checkpoint (and run its checks); used by the retry schedule.",
)
reevaluate_job = dg.define_asset_job(
    REEVALUATE_JOB_NAME,
    selection=dg.AssetSelection.assets(evaluation),  # includes the asset's checks
    executor_def=dg.in_process_executor,
    description="Evaluate one partition again (and run its checks); used by the evaluation retry schedule.",
)


@dataclass(frozen=True)
class RetryTarget:
    """What a retry schedule re-runs: ``asset``'s failed partitions, in ``job``, each retry tagged ``attempt_tag``;
    ``resume``: with ``resume: true`` added to the op config; ``after``: an upstream asset whose partition must be
    materialized first."""

    schedule_name: str
    asset: dg.AssetsDefinition
    job: object  # what dg.define_asset_job returns
    attempt_tag: str
    resume: bool
    after: dg.AssetsDefinition | None = None


TRAINING = RetryTarget("retry_failed_training", trained_checkpoint, retrain_job, ATTEMPT_TAG, resume=True)
EVALUATION = RetryTarget("retry_failed_evaluation", evaluation, reevaluate_job, EVALUATION_ATTEMPT_TAG, resume=False,
                         after=trained_checkpoint)


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
                 failure_kinds: Mapping[str, str | None] | None = None,
                 waiting: Mapping[str, str] | None = None) -> RetryPlan:
    """Which partitions to re-run, and why each other one is left alone.

    statuses: partition -> its status (``get_status_by_partition``; None: never materialized).
    attempts: partition -> attempts made since its last materialization, the first run included (missing: 1).
    failure_kinds: partition -> the failure kind tag of its latest failed run (missing or None: untagged, retried).
    waiting: partition -> why a retry would not work yet (an upstream not materialized); not retried now.
    A FAILED partition is retried while attempts < max_attempts, unless its failure is one a retry cannot fix
    (:data:`flow_pipeline.defs.failures.NOT_RETRIED`) or it is waiting; nothing else is ever retried.
    """
    plan, failure_kinds, waiting = RetryPlan(), failure_kinds or {}, waiting or {}
    for partition, status in statuses.items():
        if status == Status.FAILED:
            made = max(1, attempts.get(partition, 1))
            not_retried = retry_verdict(failure_kinds.get(partition))
            if not_retried:
                plan.skipped[partition] = f"failed, not retried ({not_retried})"
            elif partition in waiting:
                plan.skipped[partition] = f"failed, waiting ({waiting[partition]})"
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


def last_materialization_time(instance: dg.DagsterInstance, asset: dg.AssetsDefinition,
                              partition: str) -> float | None:
    record = latest_materialization(instance, asset.key, partition)
    return None if record is None else record.timestamp


def attempts_since_materialization(instance: dg.DagsterInstance, target: RetryTarget, partition: str) -> int:
    """The highest attempt tag of the target among the partition's runs since the asset's last materialization; 1 when
    no retry was made yet (the first run carries no tag)."""
    since = last_materialization_time(instance, target.asset, partition)
    runs = instance.get_runs(filters=dg.RunsFilter(
        tags={PARTITION_TAG: partition},
        created_after=None if since is None else datetime.fromtimestamp(since, tz=timezone.utc),
    ))
    tag = target.attempt_tag
    return max([1, *(int(run.tags[tag]) for run in runs if run.tags.get(tag, "").isdigit())])


def latest_attempt(instance: dg.DagsterInstance, asset: dg.AssetsDefinition, partition: str) -> dg.DagsterRun | None:
    """The run that made the latest attempt at the asset's partition (None if there was none)."""
    planned = instance.get_latest_planned_materialization_info(asset.key, partition)
    return instance.get_run_by_id(planned.run_id) if planned else None


def failed_op_config(instance: dg.DagsterInstance, asset: dg.AssetsDefinition, partition: str) -> dict:
    """The asset's op config in the run that made the latest attempt at the partition ({} when that run used the
    defaults): a training's resume must use the same config, or it would train another run directory."""
    run = latest_attempt(instance, asset, partition)
    if run is None:
        return {}
    return dict(run.run_config.get("ops", {}).get(asset.op.name, {}).get("config", {}))


def failure_kind(instance: dg.DagsterInstance, asset: dg.AssetsDefinition, partition: str) -> str | None:
    """The failure kind tag of the asset partition's latest attempt (None: untagged)."""
    run = latest_attempt(instance, asset, partition)
    return run.tags.get(FAILURE_KIND_TAG) if run is not None else None


def waiting_for_upstream(instance: dg.DagsterInstance, target: RetryTarget, partitions: list[str]) -> dict[str, str]:
    """partition -> why it waits: the target's upstream partition is not materialized (failed, in progress, never)."""
    if target.after is None or not partitions:
        return {}
    upstream = instance.get_status_by_partition(target.after.key, partitions, ablation_partitions) or {}
    name = target.after.key.to_user_string()
    return {partition: f"{name}[{partition}] is {_status_words(upstream.get(partition))}"
            for partition in partitions if upstream.get(partition) != Status.MATERIALIZED}


def _status_words(status: Status | None) -> str:
    return "never materialized" if status is None else status.value.lower().replace("_", " ")


def retry_run_request(target: RetryTarget, retry: Retry, config: dict) -> dg.RunRequest:
    config = {**config, "resume": True} if target.resume else config
    return dg.RunRequest(
        run_key=f"{target.asset.key.to_user_string()}-{retry.partition}-attempt-{retry.attempt}",
        partition_key=retry.partition,
        run_config={"ops": {target.asset.op.name: {"config": config}}},
        tags={target.attempt_tag: str(retry.attempt)},
    )


def plan_for(instance: dg.DagsterInstance, target: RetryTarget, max_attempts: int) -> RetryPlan:
    """:func:`plan_retries` over every partition of the target's asset, its inputs read from the instance."""
    partitions = ablation_partitions.get_partition_keys()
    statuses = instance.get_status_by_partition(target.asset.key, partitions, ablation_partitions) or {}
    statuses = {partition: statuses.get(partition) for partition in partitions}
    failed = [partition for partition, status in statuses.items() if status == Status.FAILED]
    attempts = {partition: attempts_since_materialization(instance, target, partition) for partition in failed}
    kinds = {partition: failure_kind(instance, target.asset, partition) for partition in failed}
    return plan_retries(statuses, attempts, max_attempts, kinds, waiting_for_upstream(instance, target, failed))


def _retry_schedule(settings: RetrySettings, target: RetryTarget, description: str) -> dg.ScheduleDefinition:
    name = target.asset.key.to_user_string()

    def retry_failed(context: dg.ScheduleEvaluationContext):
        plan = plan_for(context.instance, target, settings.max_attempts)
        if not plan.retries:
            yield dg.SkipReason(f"no failed partition of {name} to retry.\n{plan.explain()}")
            return
        context.log.info(f"retrying {', '.join(f'{r.partition} (attempt {r.attempt})' for r in plan.retries)}; "
                         f"left alone:\n{plan.explain()}")
        for retry in plan.retries:
            yield retry_run_request(target, retry, failed_op_config(context.instance, target.asset, retry.partition))

    try:
        return dg.ScheduleDefinition(
            name=target.schedule_name,
            cron_schedule=settings.cron,
            job=target.job,
            execution_fn=retry_failed,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description=f"{description}, at most {settings.max_attempts} attempts each (cron from {RERUN_CRON_ENV}, "
                        f"cap from {MAX_ATTEMPTS_ENV}); failures a retry cannot fix (bad config or data, divergence) "
                        "are left alone, each named with its reason in the tick.",
        )
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(f"{RERUN_CRON_ENV}={settings.cron!r} is not a valid cron string: {exc}") from exc


def build_retry_schedule(settings: RetrySettings) -> dg.ScheduleDefinition:
    """``retry_failed_training``, running on ``settings.cron`` (started by default)."""
    return _retry_schedule(settings, TRAINING, "Re-run failed trained_checkpoint partitions with resume: true")


def build_evaluation_retry_schedule(settings: RetrySettings) -> dg.ScheduleDefinition:
    """``retry_failed_evaluation``, running on ``settings.cron`` (started by default); a partition whose training is
    not materialized waits."""
    return _retry_schedule(settings, EVALUATION, "Re-run failed evaluation partitions whose training is materialized")
