"""A full disk while a partition trains: the run fails naming the file, tagged ``disk_full``; best.pt is untouched;
the retry schedule asks for a retry, and that retry succeeds once space is back. The disk is a real tmpfs mounted
at the run directory (root only; skipped where mounting is refused)."""

from __future__ import annotations

import dagster as dg
import pytest

from flow_pipeline.core.checkpoint import BEST_NAME, TEMP_PREFIX, load_checkpoint, sha256_file
from flow_pipeline.defs.assets import trained_checkpoint
from flow_pipeline.defs.checks import verify_trained_checkpoint
from flow_pipeline.defs.failures import DISK_FULL, FAILURE_KIND_TAG
from flow_pipeline.defs.retries import RetrySettings, build_retry_schedule
from flow_pipeline.definitions import defs
from flow_pipeline_tests.helpers import TINY_TRAIN, fill, run_config, small_disk
from flow_pipeline_tests.test_pipeline import materialize_data, resources

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PARTITION = "mlp-icfm"


def step_failure(result: dg.ExecuteInProcessResult) -> str:
    failure = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"][0]
    return failure.step_failure_data.user_failure_data.description


def test_a_full_disk_fails_the_run_clearly_keeps_best_and_the_retry_succeeds_once_space_is_back(artifacts_root, tmp_path):
    one_epoch = {**TINY_TRAIN, "max_epochs": 1}
    run_dir = artifacts_root / "checkpoints" / f"{PARTITION}-full-none-tiny"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance, small_disk(run_dir, size_kb=32 * 1024):
        assert materialize_data(instance).success
        first = dg.materialize([trained_checkpoint], instance=instance, resources=resources(), partition_key=PARTITION,
                               run_config=run_config(train=one_epoch))
        assert first.success
        best = run_dir / BEST_NAME
        best_sha = sha256_file(best)

        filler = fill(run_dir, leave_bytes=256 * 1024)  # room for job.json and failure.json, not for a checkpoint
        resumed = {**one_epoch, "max_epochs": 3, "resume": True}
        failed = dg.materialize([trained_checkpoint], instance=instance, resources=resources(), partition_key=PARTITION,
                                run_config=run_config(train=resumed), raise_on_error=False)
        assert not failed.success
        message = step_failure(failed)
        assert "No space left on device" in message and str(run_dir) in message, message
        assert instance.get_run_by_id(failed.run_id).tags[FAILURE_KIND_TAG] == DISK_FULL
        assert sha256_file(best) == best_sha
        assert not list(run_dir.glob(TEMP_PREFIX + "*"))

        schedule = build_retry_schedule(RetrySettings(max_attempts=3))
        context = dg.build_schedule_context(instance=instance, repository_def=defs.get_repository_def())
        requests = schedule.evaluate_tick(context).run_requests
        assert [request.partition_key for request in requests] == [PARTITION]

        filler.unlink()  # space is back
        retry = dg.materialize([trained_checkpoint, verify_trained_checkpoint], instance=instance, resources=resources(),
                               partition_key=PARTITION, run_config=requests[0].run_config, tags=requests[0].tags)
        assert retry.success
        assert retry.asset_materializations_for_node("trained_checkpoint")[0].metadata["epochs_run"].value == 3
        assert load_checkpoint(best)["config"]["max_epochs"] == 3
