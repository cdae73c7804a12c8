"""Recovery: a schedule that re-runs failed training partitions, and a sensor that fails runs whose worker died.

- ``retry_failed_training`` (hourly by default): every partition of ``trained_checkpoint`` whose latest attempt failed
  is re-run with ``resume: true`` and the failed run's own training config, until it has had ``max_attempts``
  attempts since its last materialization. The decision is the pure function :func:`plan_retries`; the schedule only
  reads its inputs from the instance and explains every partition it leaves alone.
- ``fail_orphaned_runs``: a run whose worker process was SIGKILLed (OOM killer, ``kill -9``, a crashed
  ``dagster asset materialize``) stays STARTED forever and keeps its ``gpu`` pool slot. When no code server is left
  to notice (runs launched by the CLI, or a daemon restarted since the launch), this sensor marks such runs failed;
  run monitoring (``free_slots_after_run_end_seconds`` in dagster.yaml) then frees their slots.
"""

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from flow_pipeline.defs.assets import RUN_HOST_TAG, ablation_partitions, trained_checkpoint

RERUN_CRON_ENV = "FLOW_PIPELINE_RERUN_CRON"
MAX_ATTEMPTS_ENV = "FLOW_PIPELINE_MAX_ATTEMPTS"
DEFAULT_RERUN_CRON = "0 * * * *"
DEFAULT_MAX_ATTEMPTS = 3

PARTITION_TAG = "dagster/partition"
ATTEMPT_TAG = "flow_pipeline/attempt"
RETRAIN_JOB_NAME = "retrain_trained_checkpoint"
ORPHAN_CHECK_INTERVAL_S = 10

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


def plan_retries(statuses: Mapping[str, Status | None], attempts: Mapping[str, int], max_attempts: int) -> RetryPlan:
    """Which partitions to re-run, and why each other one is left alone.

    statuses: partition -> its status (``get_status_by_partition``; None: never materialized).
    attempts: partition -> attempts made since its last materialization, the first run included (missing: 1).
    A FAILED partition is retried while attempts < max_attempts; nothing else is ever retried.
    """
    plan = RetryPlan()
    for partition, status in statuses.items():
        if status == Status.FAILED:
            made = max(1, attempts.get(partition, 1))
            if made < max_attempts:
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
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=trained_checkpoint.key, asset_partitions=[partition]), limit=1
    ).records
    return records[0].timestamp if records else None


def attempts_since_materialization(instance: dg.DagsterInstance, partition: str) -> int:
    """The highest ``flow_pipeline/attempt`` tag among the partition's runs since its last materialization;
    1 when no retry was made yet (the first run carries no tag)."""
    since = last_materialization_time(instance, partition)
    runs = instance.get_runs(filters=dg.RunsFilter(
        tags={PARTITION_TAG: partition},
        created_after=None if since is None else datetime.fromtimestamp(since, tz=timezone.utc),
    ))
    return max([1, *(int(run.tags[ATTEMPT_TAG]) for run in runs if run.tags.get(ATTEMPT_TAG, "").isdigit())])


def failed_training_config(instance: dg.DagsterInstance, partition: str) -> dict:
    """The ``trained_checkpoint`` op config of the run that made the latest attempt at the partition ({} when that
    run used the defaults): a resume must use the same config, or it would train another run directory."""
    planned = instance.get_latest_planned_materialization_info(trained_checkpoint.key, partition)
    run = instance.get_run_by_id(planned.run_id) if planned else None
    if run is None:
        return {}
    return dict(run.run_config.get("ops", {}).get(trained_checkpoint.op.name, {}).get("config", {}))


def retry_run_request(retry: Retry, config: dict) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{retry.partition}-attempt-{retry.attempt}",
        partition_key=retry.partition,
        run_config={"ops": {trained_checkpoint.op.name: {"config": {**config, "resume": True}}}},
        tags={ATTEMPT_TAG: str(retry.attempt)},
    )


def build_retry_schedule(settings: RetrySettings) -> dg.ScheduleDefinition:
    """The schedule of :mod:`flow_pipeline.defs.schedules`, running on ``settings.cron`` (started by default)."""

    def retry_failed_training(context: dg.ScheduleEvaluationContext):
        instance = context.instance
        partitions = ablation_partitions.get_partition_keys()
        statuses = instance.get_status_by_partition(trained_checkpoint.key, partitions, ablation_partitions) or {}
        statuses = {partition: statuses.get(partition) for partition in partitions}
        attempts = {partition: attempts_since_materialization(instance, partition)
                    for partition, status in statuses.items() if status == Status.FAILED}
        plan = plan_retries(statuses, attempts, settings.max_attempts)
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
                        f"{MAX_ATTEMPTS_ENV}).",
        )
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(f"{RERUN_CRON_ENV}={settings.cron!r} is not a valid cron string: {exc}") from exc


# --- orphaned runs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunWorker:
    pid: int
    seen_at: float  # when the run logged the pid (epoch seconds): the process was alive then


def run_worker(instance: dg.DagsterInstance, run_id: str) -> RunWorker | None:
    """The process that executes the run: the first engine event of the run that carries a ``pid``
    ("Started process for run" of a launched run, "Executing steps ..." of a CLI run)."""
    for record in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=20).records:
        pid = record.event_log_entry.dagster_event.engine_event_data.metadata.get("pid")
        if pid is not None and str(pid.value).isdigit():
            return RunWorker(int(pid.value), record.event_log_entry.timestamp)
    return None


def _proc_start_time(pid: int) -> tuple[str, float] | None:
    """(state, start time in epoch seconds) of a Linux process from /proc; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2 (the command name) may hold spaces and parentheses: the fields after the last ")" are fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start_ticks = fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime, clock ticks after boot)
    boot_time = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime"))
    return state, boot_time + start_ticks / os.sysconf("SC_CLK_TCK")


# /proc start times are rounded to whole seconds of boot time: a process is "the same" within this slack.
_START_TIME_SLACK_S = 5.0


def process_alive(worker: RunWorker) -> bool:
    """Whether the worker process still runs. A zombie, or a pid reused by a process started after the run logged
    it, counts as dead. Without /proc (macOS) only the pid's existence is checked."""
    if Path("/proc/self/stat").exists():
        found = _proc_start_time(worker.pid)
        if found is None:
            return False
        state, started_at = found
        return state not in ("Z", "X") and started_at <= worker.seen_at + _START_TIME_SLACK_S
    try:
        os.kill(worker.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dg.sensor(
    name="fail_orphaned_runs",
    minimum_interval_seconds=ORPHAN_CHECK_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks a STARTED training run failed when its worker process on this host is gone (SIGKILL, OOM), "
                "so that run monitoring frees its gpu pool slot and the retry schedule can resume it.",
)
def fail_orphaned_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Only runs tagged with this host by ``trained_checkpoint`` are judged: a pid means nothing on another machine."""
    instance = context.instance
    host = socket.gethostname()
    failed, alive = [], 0
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED],
                                                       tags={RUN_HOST_TAG: host})):
        worker = run_worker(instance, run.run_id)
        if worker is None or process_alive(worker):
            alive += 1
            continue
        message = (f"run worker process {worker.pid} on {host} is gone (killed or crashed) while the run was "
                   "STARTED; marked failed by the fail_orphaned_runs sensor")
        instance.report_run_failed(run, message=message)
        context.log.warning(f"{run.run_id}: {message}")
        failed.append(f"{run.run_id} ({run.tags.get(PARTITION_TAG, 'unpartitioned')}, pid {worker.pid})")
    if failed:
        return dg.SkipReason(f"marked {len(failed)} orphaned run(s) failed: {'; '.join(failed)}; "
                             f"{alive} started run(s) on {host} have a live worker")
    return dg.SkipReason(f"no orphaned runs: {alive} started training run(s) on {host}, all with a live worker")
