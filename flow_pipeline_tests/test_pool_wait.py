"""A run waiting for a pool slot sleeps until its next claim attempt instead of spinning (defs/pool_wait.py)."""

import time

import dagster as dg
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._core.storage.dagster_run import DagsterRun

import flow_pipeline.definitions  # noqa: F401  (installs the fix, as every run worker does by loading the code)


def test_a_step_blocked_on_the_gpu_pool_sleeps_until_its_next_claim_attempt():
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        assert storage.claim_concurrency_slot("gpu", "holding-run", "trained_checkpoint").is_claimed
        waiting_run = DagsterRun(job_name="__ASSET_JOB", run_id="waiting-run")
        with InstanceConcurrencyContext(instance, waiting_run) as context:
            assert context.interval_to_next_pending_claim_check() == 0.0  # nothing pending yet
            before = time.time()
            assert not context.claim("gpu", "trained_checkpoint")
            interval = context.interval_to_next_pending_claim_check()
            # Dagster's own back-off for the first retry is 1 s; the loop must sleep (nearly) that long.
            assert 0.5 < interval <= 1.0 + (time.time() - before)
            time.sleep(interval)
            assert context.interval_to_next_pending_claim_check() == 0.0  # due: the loop claims again
            storage.free_concurrency_slot_for_step("holding-run", "trained_checkpoint")
            assert context.claim("gpu", "trained_checkpoint")
            assert not context.has_pending_claims()
