"""The retry schedule: the pure decision, its settings, and the schedule evaluated on a real sqlite instance with
real failed runs (training that fails for want of normalisation stats), a run in progress and materializations."""

import errno
import socket

import dagster as dg
import numpy as np
import pytest

from flow_pipeline.artifacts import ArtifactLayout
from flow_pipeline.core.data.normalization import Normalizer, save_normalizer
from flow_pipeline.definitions import defs
from flow_pipeline.defs.assets import trained_checkpoint
from flow_pipeline.defs.orphans import RUN_HOST_TAG
from flow_pipeline.defs.checks import verify_trained_checkpoint
from flow_pipeline.defs.failures import (CONFIG, DATA, DISK_FULL, DIVERGED, ERROR, FAILURE_KIND_TAG, KILLED,
                                         MISSING_INPUT, classify_training_failure)
from flow_pipeline.defs.retries import (ATTEMPT_TAG, DEFAULT_MAX_ATTEMPTS, DEFAULT_RERUN_CRON, EVALUATION_ATTEMPT_TAG,
                                        MAX_ATTEMPTS_ENV, REEVALUATE_JOB_NAME, RERUN_CRON_ENV, RETRAIN_JOB_NAME, Retry,
                                        RetrySettings, build_evaluation_retry_schedule, build_retry_schedule,
                                        plan_retries, retry_settings_from_env)
from flow_pipeline_tests.helpers import TINY_TRAIN, resources, run_config

FAILED, IN_PROGRESS, MATERIALIZED = (dg.AssetPartitionStatus.FAILED, dg.AssetPartitionStatus.IN_PROGRESS,
                                     dg.AssetPartitionStatus.MATERIALIZED)


# --- the pure decision -------------------------------------------------------------------------------------------


def test_plan_retries_requests_failed_partitions_below_the_cap_and_explains_the_others():
    statuses = {"a": FAILED, "b": FAILED, "c": IN_PROGRESS, "d": MATERIALIZED, "e": None, "f": FAILED}
    plan = plan_retries(statuses, attempts={"a": 1, "b": 3, "f": 2}, max_attempts=3)
    assert plan.retries == [Retry("a", 2), Retry("f", 3)]
    assert set(plan.skipped) == {"b", "c", "d", "e"}
    assert "gave up after 3 of 3 attempts" in plan.skipped["b"]
    assert plan.skipped["c"] == "in progress"
    assert plan.skipped["d"].startswith("materialized")
    assert plan.skipped["e"] == "never materialized"
    explanation = plan.explain().splitlines()
    assert "in progress: c" in explanation and len(explanation) == 4


def test_plan_retries_cap_counts_the_first_run():
    assert plan_retries({"a": FAILED}, {}, max_attempts=2).retries == [Retry("a", 2)]  # no attempt count: 1 made
    assert plan_retries({"a": FAILED}, {"a": 2}, max_attempts=2).retries == []
    assert plan_retries({"a": FAILED}, {"a": 1}, max_attempts=1).retries == []  # 1: never retried
    assert plan_retries({"a": FAILED}, {"a": 7}, max_attempts=3).skipped["a"].endswith("after 7 of 3 attempts")


def test_plan_retries_explains_groups_by_reason():
    plan = plan_retries({"a": IN_PROGRESS, "b": None, "c": IN_PROGRESS}, {}, max_attempts=3)
    assert plan.explain() == "in progress: a, c\nnever materialized: b"


# --- settings ----------------------------------------------------------------------------------------------------


def test_retry_settings_from_env_defaults_values_and_errors():
    assert retry_settings_from_env({}) == RetrySettings(DEFAULT_RERUN_CRON, DEFAULT_MAX_ATTEMPTS) == RetrySettings()
    assert DEFAULT_RERUN_CRON == "0 * * * *" and DEFAULT_MAX_ATTEMPTS == 3
    assert retry_settings_from_env({RERUN_CRON_ENV: "*/5 * * * *", MAX_ATTEMPTS_ENV: " 5 "}) == RetrySettings("*/5 * * * *", 5)
    for bad in ("three", "0", "-1", "2.5"):
        with pytest.raises(ValueError, match=MAX_ATTEMPTS_ENV):
            retry_settings_from_env({MAX_ATTEMPTS_ENV: bad})
    with pytest.raises(ValueError, match=RERUN_CRON_ENV):
        build_retry_schedule(RetrySettings(cron="every hour"))


def test_shipped_schedule_runs_hourly_and_is_on_by_default():
    schedule = defs.resolve_schedule_def("retry_failed_training")
    assert schedule.cron_schedule == DEFAULT_RERUN_CRON
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.job_name == RETRAIN_JOB_NAME
    job = defs.resolve_job_def(RETRAIN_JOB_NAME)
    # The retry job trains the partition and runs its checks, nothing else.
    assert {node.name for node in job.graph.node_defs} == {trained_checkpoint.op.name, verify_trained_checkpoint.op.name}
    assert defs.resolve_sensor_def("fail_orphaned_runs").default_status == dg.DefaultSensorStatus.RUNNING


# --- the schedule on a real instance -----------------------------------------------------------------------------


def failing_run(instance, partition: str, train: dict, tags: dict | None = None) -> None:
    """A real training run that fails: the artifact root has no normalisation stats."""
    result = dg.materialize([trained_checkpoint, verify_trained_checkpoint], instance=instance, resources=resources(),
                            partition_key=partition, run_config=run_config(train=train), tags=tags,
                            raise_on_error=False)
    assert not result.success


def report_materialized(instance, partition: str) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization(trained_checkpoint.key, partition=partition))


def evaluate(instance, max_attempts: int) :
    schedule = build_retry_schedule(RetrySettings(max_attempts=max_attempts))
    context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
    return schedule.evaluate_tick(context)


def requests_by_partition(data) -> dict[str, dg.RunRequest]:
    return {request.partition_key: request for request in data.run_requests or []}


def execute(instance, request: dg.RunRequest) -> None:
    """Run what the schedule asked for, as the daemon would (here in process): config, tags and partition."""
    assert not dg.materialize([trained_checkpoint, verify_trained_checkpoint], instance=instance, resources=resources(),
                              partition_key=request.partition_key, run_config=request.run_config,
                              tags=request.tags, raise_on_error=False).success


@pytest.mark.slow
def test_schedule_retries_exactly_the_failed_partitions_with_resume_until_the_cap(artifacts_root, tmp_path):
    five_k = {**TINY_TRAIN, "dataset": "5k"}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        # mlp-icfm: failed once, with its own config -> retried as attempt 2 with that config and resume.
        failing_run(instance, "mlp-icfm", five_k)
        # dit-fm: failed, then a run started that is still in progress -> left alone.
        failing_run(instance, "dit-fm", TINY_TRAIN)
        job = defs.resolve_job_def(RETRAIN_JOB_NAME)
        instance.create_run_for_job(job, run_config=run_config(train=TINY_TRAIN), status=dg.DagsterRunStatus.STARTED,
                                    tags={"dagster/partition": "dit-fm", RUN_HOST_TAG: socket.gethostname()})
        # unet-fm: failed, then materialized -> left alone.
        failing_run(instance, "unet-fm", TINY_TRAIN)
        report_materialized(instance, "unet-fm")
        # unet-vp: its third attempt failed (the attempt tag counts) -> gave up at a cap of 2.
        failing_run(instance, "unet-vp", {**TINY_TRAIN, "resume": True}, tags={ATTEMPT_TAG: "3"})
        # mlp-vp: attempt 3 failed before a materialization, a new run failed since -> its attempts restart at 1.
        failing_run(instance, "mlp-vp", TINY_TRAIN, tags={ATTEMPT_TAG: "3"})
        report_materialized(instance, "mlp-vp")
        failing_run(instance, "mlp-vp", TINY_TRAIN)

        statuses = instance.get_status_by_partition(trained_checkpoint.key, ["mlp-icfm", "dit-fm", "unet-fm", "unet-vp"],
                                                    trained_checkpoint.partitions_def)
        assert statuses == {"mlp-icfm": FAILED, "dit-fm": IN_PROGRESS, "unet-fm": MATERIALIZED, "unet-vp": FAILED}

        data = evaluate(instance, max_attempts=2)
        requests = requests_by_partition(data)
        assert set(requests) == {"mlp-icfm", "mlp-vp"}
        icfm = requests["mlp-icfm"]
        assert icfm.run_config == run_config(train={**five_k, "resume": True})
        assert icfm.tags[ATTEMPT_TAG] == "2" and icfm.tags["dagster/partition"] == "mlp-icfm"
        assert requests["mlp-vp"].run_config == run_config(train={**TINY_TRAIN, "resume": True})
        assert requests["mlp-vp"].tags[ATTEMPT_TAG] == "2"

        # Run the retry the schedule asks for: it fails again, and the cap of 2 stops further ones.
        execute(instance, icfm)
        data = evaluate(instance, max_attempts=2)
        assert set(requests_by_partition(data)) == {"mlp-vp"}
        assert requests_by_partition(evaluate(instance, max_attempts=3))["mlp-icfm"].tags[ATTEMPT_TAG] == "3"

        # With nothing left to request, the tick explains every partition it left alone.
        data = evaluate(instance, max_attempts=1)
        assert not data.run_requests
        lines = data.skip_message.splitlines()
        assert lines[0].startswith("no failed partition")
        assert "in progress: dit-fm" in lines
        assert "materialized (latest attempt succeeded): unet-fm" in lines
        assert "failed, gave up after 2 of 1 attempts: mlp-icfm" in lines
        assert "failed, gave up after 1 of 1 attempts: mlp-vp" in lines
        assert "failed, gave up after 3 of 1 attempts: unet-vp" in lines
        assert any(line.startswith("never materialized: ") and "dit-icfm" in line for line in lines)


# --- retry only what a retry can fix -------------------------------------------------------------------------------


def test_failure_kinds_of_training_reports():
    expected = {  # failure.json -> kind, written out independently of the module's table
        None: KILLED,
        ("TrainingDiverged", None): DIVERGED,
        ("DataError", None): DATA,
        ("CheckpointError", None): DATA,
        ("ValueError", None): CONFIG,
        ("AtomicWriteError", errno.ENOSPC): DISK_FULL,
        ("OSError", errno.ENOSPC): DISK_FULL,
        ("OSError", errno.EIO): ERROR,
        ("RuntimeError", None): ERROR,
    }
    for report, kind in expected.items():
        failure = None if report is None else {"error": report[0], "errno": report[1], "message": "..."}
        assert classify_training_failure(failure) == kind, report


def test_plan_retries_leaves_failures_a_retry_cannot_fix_and_says_why():
    statuses = {key: FAILED for key in ("config", "data", "diverged", "killed", "disk", "untagged")}
    kinds = {"config": CONFIG, "data": DATA, "diverged": DIVERGED, "killed": KILLED, "disk": DISK_FULL}
    plan = plan_retries(statuses, attempts={}, max_attempts=3, failure_kinds=kinds)
    assert sorted(retry.partition for retry in plan.retries) == ["disk", "killed", "untagged"]
    assert plan.skipped["config"].startswith("failed, not retried (bad config")
    assert plan.skipped["data"].startswith("failed, not retried (bad data")
    assert plan.skipped["diverged"].startswith("failed, not retried (diverged")


@pytest.mark.slow
def test_a_config_failure_is_tagged_and_never_retried_while_a_missing_input_is(artifacts_root, tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        failing_run(instance, "mlp-icfm", TINY_TRAIN)  # no normalisation stats yet: fixed by materializing them
        save_normalizer(ArtifactLayout(artifacts_root).stats_path("full", "zscore"), Normalizer.fit(np.random.rand(9, 8)))
        failing_run(instance, "unet-fm", {**TINY_TRAIN, "lr": 5.0})  # lr must be <= 1: fails the same way again
        kinds = {partition: instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": partition}))[0]
                 .tags.get(FAILURE_KIND_TAG) for partition in ("mlp-icfm", "unet-fm")}
        assert kinds == {"mlp-icfm": MISSING_INPUT, "unet-fm": CONFIG}
        data = evaluate(instance, max_attempts=3)
        assert set(requests_by_partition(data)) == {"mlp-icfm"}
        tick = evaluate(instance, max_attempts=1)  # nothing requested: the tick explains every partition
        assert any(line.startswith("failed, not retried (bad config") and line.endswith(": unet-fm")
                   for line in tick.skip_message.splitlines()), tick.skip_message


def test_the_kind_of_a_data_problem_comes_from_its_exception_type(tmp_path):
    from flow_pipeline.core.data import DataError, DatasetChoiceError, MissingDataError
    from flow_pipeline.core.data.split_store import load_run_splits
    from flow_pipeline.defs.failures import data_failure_kind

    # The errors the data code raises for each case, not hand-built ones.
    with pytest.raises(MissingDataError) as missing:
        load_run_splits(tmp_path / "never_written", "full")
    with pytest.raises(DatasetChoiceError) as choice:
        load_run_splits(tmp_path, "2k")
    assert data_failure_kind(missing.value) == MISSING_INPUT
    assert data_failure_kind(choice.value) == CONFIG
    assert data_failure_kind(DataError("x.npy: cannot read .npy file (truncated or corrupt)")) == DATA
    # The same kinds in a training process's failure.json keep meaning bad data there (not retried).
    assert {classify_training_failure({"error": name}) for name in ("MissingDataError", "DatasetChoiceError")} == {DATA}


# --- evaluation retries --------------------------------------------------------------------------------------------


def test_failure_kinds_of_evaluation_errors(tmp_path):
    from flow_pipeline.core.atomic import write_atomic_with
    from flow_pipeline.core.checkpoint import CheckpointError, load_checkpoint
    from flow_pipeline.core.data import MissingDataError
    from flow_pipeline.core.data.split_store import load_run_splits
    from flow_pipeline.defs.failures import evaluation_failure_kind

    def raised(call) -> Exception:
        with pytest.raises(Exception) as caught:
            call()
        return caught.value

    torn = tmp_path / "best.pt"
    torn.write_bytes(b"PK\x03\x04 not a whole checkpoint")

    def no_space(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    errors = {  # each raised by the code that raises it in an evaluation
        DATA: raised(lambda: load_checkpoint(torn)),
        MISSING_INPUT: raised(lambda: load_run_splits(tmp_path / "never_written", "full")),
        DISK_FULL: raised(lambda: write_atomic_with(tmp_path / "evaluation.json", no_space)),
        CONFIG: ValueError("n_samples: must be at least 2"),
        ERROR: RuntimeError("anything else"),
    }
    assert isinstance(errors[DATA], CheckpointError) and isinstance(errors[MISSING_INPUT], MissingDataError)
    assert {kind: evaluation_failure_kind(error) for kind, error in errors.items()} == {kind: kind for kind in errors}
    assert evaluation_failure_kind(OSError(errno.EIO, "I/O error")) == ERROR


def test_plan_retries_leaves_waiting_partitions_and_says_for_what():
    plan = plan_retries({"a": FAILED, "b": FAILED}, {}, max_attempts=3,
                        waiting={"b": "trained_checkpoint[b] is failed"})
    assert plan.retries == [Retry("a", 2)]
    assert plan.skipped == {"b": "failed, waiting (trained_checkpoint[b] is failed)"}


def killed_evaluation(instance, partition: str, config: dict, tags: dict | None = None) -> None:
    """An evaluation run whose worker died: STARTED, then failed without a failure kind (as a lost worker leaves it)."""
    run = instance.create_run_for_job(defs.resolve_job_def(REEVALUATE_JOB_NAME), status=dg.DagsterRunStatus.STARTED,
                                      run_config={"ops": {"evaluation": {"config": config}}},
                                      tags={"dagster/partition": partition, **(tags or {})})
    instance.report_run_failed(run, message="run worker gone")


def test_the_evaluation_schedule_retries_a_killed_evaluation_once_its_training_is_materialized(artifacts_root, tmp_path):
    evaluate_config = {"solver": "euler", "steps": 4, "seed": 3}
    schedule = build_evaluation_retry_schedule(RetrySettings(max_attempts=3))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        report_materialized(instance, "mlp-icfm")  # trained
        for attempt in (None, "2"):  # the first run and its first retry were both killed
            killed_evaluation(instance, "mlp-icfm", evaluate_config, {EVALUATION_ATTEMPT_TAG: attempt} if attempt else {})
        failing_run(instance, "dit-fm", TINY_TRAIN)  # its training failed: the evaluation waits for it
        killed_evaluation(instance, "dit-fm", evaluate_config)
        report_materialized(instance, "unet-fm")
        killed_evaluation(instance, "unet-fm", evaluate_config)
        instance.add_run_tags(instance.get_runs(limit=1)[0].run_id, {FAILURE_KIND_TAG: CONFIG})  # not retried
        # Training retries of the same partition do not count as evaluation attempts.
        failing_run(instance, "mlp-icfm", TINY_TRAIN, tags={ATTEMPT_TAG: "3"})
        report_materialized(instance, "mlp-icfm")

        tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance,
                                                                repository_def=defs.get_repository_def()))
        assert [request.partition_key for request in tick.run_requests] == ["mlp-icfm"]
        request = tick.run_requests[0]
        assert request.run_config == {"ops": {"evaluation": {"config": evaluate_config}}}  # no resume key
        assert request.tags[EVALUATION_ATTEMPT_TAG] == "3" and ATTEMPT_TAG not in request.tags
        assert schedule.job_name == REEVALUATE_JOB_NAME
        capped = build_evaluation_retry_schedule(RetrySettings(max_attempts=2)).evaluate_tick(
            dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def()))
        lines = capped.skip_message.splitlines()
        assert "failed, gave up after 2 of 2 attempts: mlp-icfm" in lines, lines
        assert "failed, waiting (trained_checkpoint[dit-fm] is failed): dit-fm" in lines, lines
        assert any(line.startswith("failed, not retried (bad config") and line.endswith(": unet-fm")
                   for line in lines), lines
    job = defs.resolve_job_def(REEVALUATE_JOB_NAME)
    assert {node.name for node in job.graph.node_defs} == {"evaluation"}
    assert defs.resolve_schedule_def("retry_failed_evaluation").default_status == dg.DefaultScheduleStatus.RUNNING
