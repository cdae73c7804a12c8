"""Recovery, part 2: the sensor ``fail_orphaned_runs`` fails runs whose worker process died.

A run whose worker process was SIGKILLed (OOM killer, ``kill -9``, a crashed ``dagster asset materialize``) stays
STARTED forever and keeps its ``gpu`` pool slot. When no code server is left to notice (runs launched by the CLI, or
a daemon restarted since the launch), this sensor marks such runs failed and tags them ``killed``, a failure the
retry schedule (:mod:`flow_pipeline.defs.retries`) re-runs; run monitoring (``free_slots_after_run_end_seconds`` in
dagster.yaml) then frees their slots.
"""

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from flow_pipeline.defs.failures import FAILURE_KIND_TAG, KILLED

PARTITION_TAG = "dagster/partition"
ORPHAN_CHECK_INTERVAL_S = 10
# Run tag naming the host whose process executes the run: the sensor judges a run worker's pid only on that host.
RUN_HOST_TAG = "flow_pipeline/host"


def tag_run_host(context: dg.AssetExecutionContext) -> None:
    """Tag the run with this host, so that the sensor fails it if its worker process dies here."""
    context.instance.add_run_tags(context.run.run_id, {RUN_HOST_TAG: socket.gethostname()})


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
    description="Marks a STARTED run (training, evaluation, report) failed when its worker process on this host is "
                "gone (SIGKILL, OOM), so that run monitoring frees its gpu pool slot and the retry schedules can "
                "re-run it.",
)
def fail_orphaned_runs(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Only runs tagged with this host (:func:`tag_run_host`, by every asset that runs long) are judged: a pid means
    nothing on another machine."""
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
        instance.add_run_tags(run.run_id, {FAILURE_KIND_TAG: KILLED})
        instance.report_run_failed(run, message=message)
        context.log.warning(f"{run.run_id}: {message}")
        failed.append(f"{run.run_id} ({run.tags.get(PARTITION_TAG, 'unpartitioned')}, pid {worker.pid})")
    if failed:
        return dg.SkipReason(f"marked {len(failed)} orphaned run(s) failed: {'; '.join(failed)}; "
                             f"{alive} started run(s) on {host} have a live worker")
    return dg.SkipReason(f"no orphaned runs: {alive} started run(s) on {host}, all with a live worker")
