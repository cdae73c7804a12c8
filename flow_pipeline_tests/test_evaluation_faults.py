"""Evaluation and report under faults.

- SIGKILL at random moments and at every atomic write (before and after the rename) of an evaluation of a new
  partition, of an evaluated one again, and of the report (harness: evaluation_faults.py; the full run with more
  kills is ``python -m benchmarks.evaluation_faults``, figures in RELIABILITY.md).
- A killed ``dagster asset materialize`` of an evaluation: the orphan sensor fails it as ``killed``, the evaluation
  retry schedule asks for it again, and the retry completes.
- A full disk while an evaluation and the report write: the run fails naming the file (tagged ``disk_full`` for the
  evaluation), the old files stay byte for byte with no temp file left, and the run succeeds once space is back.
  The disk is a real tmpfs (root only; skipped where mounting is refused).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import dagster as dg
import pytest

from flow_pipeline.artifacts import EVALUATION_JSON, EVALUATION_PNG, REPORT_CSV, REPORT_MARKDOWN, REPORT_PNG
from flow_pipeline.core.atomic import TEMP_PREFIX
from flow_pipeline.definitions import defs
from flow_pipeline.defs.evaluation_assets import ablation_report, evaluation
from flow_pipeline.defs.failures import DISK_FULL, FAILURE_KIND_TAG, KILLED
from flow_pipeline.defs.orphans import fail_orphaned_runs
from flow_pipeline.defs.retries import EVALUATION_ATTEMPT_TAG, RetrySettings, build_evaluation_retry_schedule
from flow_pipeline_tests.evaluation_faults import (EVALUATE, PARTITIONS, FaultSettings, prepare, result_files,
                                                   run_faults)
from flow_pipeline_tests.helpers import REPO_ROOT, cli_env, dagster_cli, fill, resources, small_disk

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EVALUATE_RUN_CONFIG = {"ops": {"evaluation": {"config": EVALUATE}}}


def test_kills_at_random_moments_and_at_every_write_tear_nothing_and_keep_the_old_results(tmp_path):
    report = run_faults(FaultSettings(random_kills=1), tmp_path)
    explained = json.dumps(report.as_dict(), indent=1)
    # Every file each target writes was a kill point, before and after its rename.
    new, again = (f"{partition}-full-none-tiny" for partition in (PARTITIONS[1], PARTITIONS[0]))
    assert report.writes == {
        "evaluate-new": ["references/<key>.real-side.npz", "references/<key>.gaussian-mixture.npz",
                         "references/<key>.json", f"{new}/{EVALUATION_JSON}", f"{new}/{EVALUATION_PNG}"],
        "evaluate-again": [f"{again}/{EVALUATION_JSON}", f"{again}/{EVALUATION_PNG}"],
        "report": [f"reports/{name}" for name in (REPORT_MARKDOWN, REPORT_CSV, REPORT_PNG)]}, explained
    write_kills = [kill for kill in report.kills if "write" in kill]
    assert len(write_kills) == 2 * sum(len(files) for files in report.writes.values()), explained
    assert len(report.kills) + report.finished_before_the_kill == len(write_kills) + 3, explained
    assert report.killed_after_materializing <= 3, explained  # only a random moment can come that late
    assert report.torn_files == [] and report.old_files_changed == [], explained
    assert report.new_materializations == [], explained
    assert report.temp_files_left >= sum(kill["point"] == "before-rename" for kill in write_kills), explained
    assert report.temp_files_after_reruns == 0, explained
    assert report.reruns_succeeded == ["evaluate-new", "evaluate-again", "report"], explained


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_a_killed_evaluation_run_is_failed_as_killed_and_retried_by_the_schedule(tmp_path, monkeypatch):
    home, root = prepare(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    partition = PARTITIONS[0]
    cli = subprocess.Popen(
        [dagster_cli(), "asset", "materialize", "-m", "flow_pipeline.definitions", "--select", "evaluation",
         "--partition", partition, "--config-json", json.dumps(EVALUATE_RUN_CONFIG)],
        cwd=REPO_ROOT, env=cli_env(DAGSTER_HOME=str(home), FLOW_PIPELINE_ROOT=str(root), OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with dg.DagsterInstance.get() as instance:
            run = wait_for(lambda: next(iter(instance.get_runs(filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.STARTED], tags={"dagster/partition": partition}))), None),
                240, "the evaluation run to start")
            wait_for(lambda: instance.get_run_by_id(run.run_id).tags.get("flow_pipeline/host"), 120,
                     "the evaluation step to tag its host")
    finally:
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()
    with dg.DagsterInstance.get() as instance:
        fail_orphaned_runs(dg.build_sensor_context(instance=instance))
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(run.run_id).tags[FAILURE_KIND_TAG] == KILLED
        tick = build_evaluation_retry_schedule(RetrySettings()).evaluate_tick(
            dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()))
        assert [request.partition_key for request in tick.run_requests] == [partition]
        request = tick.run_requests[0]
        assert request.run_config == EVALUATE_RUN_CONFIG and request.tags[EVALUATION_ATTEMPT_TAG] == "2"
        retry = dg.materialize([evaluation], instance=instance, resources=resources(root), partition_key=partition,
                               run_config=request.run_config, tags=request.tags)
        assert retry.success


def step_failure(result: dg.ExecuteInProcessResult) -> str:
    failure = next(event for event in result.all_events if event.event_type_value == "STEP_FAILURE")
    data = failure.step_failure_data
    return (data.user_failure_data.description if data.user_failure_data else "") + data.error.message


def test_a_full_disk_fails_evaluation_and_report_naming_the_file_keeps_the_old_files_and_the_retry_succeeds(
        tmp_path):
    home, root = prepare(tmp_path)
    partition = PARTITIONS[0]
    with (dg.DagsterInstance.from_config(str(home)) as instance, small_disk(root / "evaluation", 64 * 1024),
          small_disk(root / "reports", 64 * 1024)):
        assert dg.materialize([evaluation], instance=instance, resources=resources(root), partition_key=partition,
                              run_config=EVALUATE_RUN_CONFIG).success
        assert dg.materialize([ablation_report], instance=instance, resources=resources(root)).success
        old = result_files(root)
        fillers = [fill(root / "evaluation"), fill(root / "reports")]

        failed = dg.materialize([evaluation], instance=instance, resources=resources(root), partition_key=partition,
                                run_config={"ops": {"evaluation": {"config": {**EVALUATE, "seed": 5}}}},
                                raise_on_error=False)
        assert not failed.success
        message = step_failure(failed)
        assert "No space left on device" in message and str(root / "evaluation") in message, message
        assert instance.get_run_by_id(failed.run_id).tags[FAILURE_KIND_TAG] == DISK_FULL
        failed_report = dg.materialize([ablation_report], instance=instance, resources=resources(root),
                                       raise_on_error=False)
        assert not failed_report.success
        report_message = step_failure(failed_report)
        assert "No space left on device" in report_message and str(root / "reports") in report_message
        assert instance.get_run_by_id(failed_report.run_id).tags[FAILURE_KIND_TAG] == DISK_FULL
        assert {path: digest for path, digest in result_files(root).items()
                if not path.endswith("/filler")} == old  # byte for byte
        assert not [path for top in ("evaluation", "reports") for path in (root / top).rglob(f"{TEMP_PREFIX}*")]

        tick = build_evaluation_retry_schedule(RetrySettings()).evaluate_tick(
            dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()))
        assert [request.partition_key for request in tick.run_requests] == [partition]
        for filler in fillers:
            filler.unlink()  # space is back
        request = tick.run_requests[0]
        assert dg.materialize([evaluation], instance=instance, resources=resources(root), partition_key=partition,
                              run_config=request.run_config, tags=request.tags).success
        assert dg.materialize([ablation_report], instance=instance, resources=resources(root)).success
